"""The step loop in a thread of the HTTP process (`--no-frontend-multiprocessing`): no second process, so one
debugger and one stack trace see both halves; the step loop and the event loop (JSON, server-sent events) take
turns on one GIL, which measured slower than engine_process.py's pipe at saturation (docs/serving.md, "Where the
step loop runs").
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import threading
from functools import partial

from plait.config import EngineConfig
from plait.engine.data_parallel import make_engine
from plait.server.engine_loop import EngineInfo, EngineLoop, StepLoop, Stop, shut_down


class EngineThread(EngineLoop):
    def __init__(self, engine_cfg: EngineConfig, profile_comm_dir: str):
        self.engine = make_engine(engine_cfg)
        self._profile_comm_dir = profile_comm_dir
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        step_loop = StepLoop(self.engine, self._inbox, partial(self._post, self._on_report),
                             partial(self._post, self._fail))
        info = EngineInfo.of(self.engine)
        # The HTTP side's own tokenizer: a Hugging Face fast tokenizer shared between two threads can fail with
        # "Already borrowed", and the step loop decodes with the engine's while the routes encode.
        info = dataclasses.replace(info, tokenizer=copy.deepcopy(info.tokenizer))
        super().__init__(info, threading.Thread(target=step_loop.run, name="plait-engine", daemon=True))

    def stop(self, timeout: float = 30.0) -> None:
        self._inbox.put(Stop())
        if self._thread.is_alive():
            self._thread.join(timeout)
        shut_down(self.engine, self._profile_comm_dir)

    def _send(self, command) -> None:
        self._inbox.put(command)
