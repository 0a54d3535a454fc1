"""The step loop in a thread of the HTTP process (`--no-frontend-multiprocessing`): no second process, so one
debugger and one stack trace see both halves; the step loop and the event loop (JSON, server-sent events) take
turns on one GIL, which measured slower than engine_process.py's pipe at saturation (docs/serving.md, "Where the
step loop runs").
"""

from __future__ import annotations

import logging
import queue
import threading

from plait.config import EngineConfig
from plait.engine.data_parallel import make_engine
from plait.server.engine_loop import EngineInfo, EngineLoop, StepLoop, Stop, shut_down
from plait.server.metrics import ServerMetrics

logger = logging.getLogger("plait.server")


class EngineThread(EngineLoop):
    def __init__(self, engine_cfg: EngineConfig, profile_comm_dir: str):
        self.engine = make_engine(engine_cfg)
        super().__init__(EngineInfo.of(self.engine))
        self._profile_comm_dir = profile_comm_dir
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="plait-engine", daemon=True)

    def start(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._inbox.put(Stop())
        if self._thread.is_alive():
            self._thread.join(timeout)
        shut_down(self.engine, self._profile_comm_dir)

    def _send(self, command) -> None:
        self._inbox.put(command)

    def _run(self) -> None:
        try:
            StepLoop(self.engine, self._inbox, self._on_report).run()
        except Exception as e:  # the engine is broken: fail everyone, refuse everything; the server then stops
            logger.exception("the engine failed: the server stops")
            self._fail(e)
