"""`plait serve`: load the engine, start its thread, run uvicorn; on SIGTERM drain, then exit 0.

The engine loads before uvicorn listens, so /health answers only once requests can be served.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from plait.config import EngineConfig
from plait.engine.data_parallel import make_engine
from plait.server.app import build_app
from plait.server.config import ServerConfig
from plait.server.engine_loop import EngineLoop
from plait.server.metrics import ServerMetrics
from plait.server.state import ServerState
from plait.server.tokenizer import ServerTokenizer

logger = logging.getLogger("plait.server")


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT drains: /v1 answers 503 while running requests finish, for at most
    `drain_timeout` seconds; then it exits as usual (and cancels what is left). A second signal exits at once.

    uvicorn's own handler would stop listening straight away and re-raise the signal after shutdown, so the
    process would die of SIGTERM instead of exiting 0.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._deadline = 0.0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining:
            self.should_exit = self.force_exit = True
            return
        logger.info("%s: draining %d request(s), up to %.0f s", signal.Signals(sig).name, self.state.in_flight,
                    self.state.config.drain_timeout)
        self.state.draining = True
        self._deadline = time.monotonic() + self.state.config.drain_timeout

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        return self.state.draining and (self.state.in_flight == 0 or time.monotonic() >= self._deadline)


def run_server(engine_cfg: EngineConfig, cfg: ServerConfig, profile_comm_dir: str = "comm-profile") -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    engine = make_engine(engine_cfg)
    name = cfg.served_model_name or engine.model_name
    metrics = ServerMetrics(name)
    loop = EngineLoop(engine, metrics)
    tokenizer = ServerTokenizer(engine.tokenizer, engine.model_config.vocab_size)
    state = ServerState(loop, tokenizer, metrics, cfg, name)
    uv = uvicorn.Config(build_app(state), host=cfg.host, port=cfg.port, log_level=cfg.uvicorn_log_level,
                        access_log=not cfg.disable_uvicorn_access_log, timeout_graceful_shutdown=1)
    loop.start()
    try:
        logger.info("serving %s on http://%s:%d", name, cfg.host, cfg.port)
        DrainingServer(uv, state).run()
    finally:
        loop.stop()
        if engine_cfg.profile_comm:  # every collective of the server's life (up to the profiler's cap)
            from plait.comm.trace import write_profile

            write_profile(engine, profile_comm_dir)
        engine.shutdown()
    return 0
