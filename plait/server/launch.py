"""`plait serve`: bind the port, load the engine (in its own process, or in a thread with
`--no-frontend-multiprocessing`), run uvicorn; on SIGTERM drain, then exit 0.

The port is bound first, so a port in use fails at once instead of after minutes of loading; the engine loads
before uvicorn listens on it, so /health answers only once requests can be served. When the engine fails (a rank
died, or the engine's process), the requests in flight get their error, then the server stops and raises the
engine's error (the CLI names the rank, or the process, and exits 1), as vLLM's does: a supervisor sees the failure
and restarts it, instead of a server that stays up answering 500.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import time
from types import FrameType

import uvicorn

from plait.config import EngineConfig
from plait.server.app import build_app
from plait.server.config import ServerConfig
from plait.server.engine_process import LOG_FORMAT, EngineProcess
from plait.server.engine_thread import EngineThread
from plait.server.metrics import ServerMetrics
from plait.server.state import ServerState
from plait.server.tokenizer import ServerTokenizer

logger = logging.getLogger("plait.server")


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT drains: /v1 answers 503 while running requests finish, for at most
    `drain_timeout` seconds; then it exits as usual (and cancels what is left). A second signal exits at once.
    Once the engine has failed it exits as well, letting the requests in flight send their error first. It starts
    the engine loop's reports on its own event loop, which from then on applies them.

    uvicorn's own handler would stop listening straight away and re-raise the signal after shutdown, so the
    process would die of SIGTERM instead of exiting 0.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._deadline = 0.0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.state.loop.start(self.state.metrics, asyncio.get_running_loop())
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining:
            self.should_exit = self.force_exit = True
            return
        logger.info("%s: draining %d request(s), up to %.0f s", signal.Signals(sig).name, self.state.in_flight,
                    self.state.config.drain_timeout)
        self.state.draining = True
        self._deadline = time.monotonic() + self.state.config.drain_timeout

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter) or self.state.loop.error is not None:
            return True
        return self.state.draining and (self.state.in_flight == 0 or time.monotonic() >= self._deadline)


def bind(host: str, port: int) -> socket.socket:
    """The HTTP socket, bound (not yet listening: connections are refused until uvicorn listens) with the options
    uvicorn would use, or a ValueError naming host and port."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"--port {port} is already in use on {host}: stop what listens there or pick another "
                             f"--port") from None
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}): check --host and --port") from None
    return sock


def run_server(engine_cfg: EngineConfig, cfg: ServerConfig, profile_comm_dir: str = "comm-profile") -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    sock = bind(cfg.host, cfg.port)
    try:
        loop = (EngineProcess if cfg.frontend_multiprocessing else EngineThread)(engine_cfg, profile_comm_dir)
    except BaseException:
        sock.close()
        raise
    try:
        info = loop.info
        name = cfg.served_model_name or info.model_name
        metrics = ServerMetrics(name)
        state = ServerState(loop, ServerTokenizer(info.tokenizer, info.vocab_size), metrics, cfg, name)
        uv = uvicorn.Config(build_app(state), host=cfg.host, port=cfg.port, log_level=cfg.uvicorn_log_level,
                            access_log=not cfg.disable_uvicorn_access_log, timeout_graceful_shutdown=1)
        logger.info("serving %s on http://%s:%d", name, cfg.host, sock.getsockname()[1])
        DrainingServer(uv, state).run(sockets=[sock])
    finally:
        loop.stop()
    if loop.error is not None:
        raise loop.error
    return 0
