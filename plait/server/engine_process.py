"""The step loop in a process of its own (`plait serve`'s default), as vLLM's front-end/engine split.

Why a process: the HTTP side is Python (JSON, pydantic, server-sent events to many clients), and in one process
it holds the GIL the step loop needs, so a busy server would slow every step. Here the engine process only steps;
the HTTP process only serves. Two pipes join them:

- commands (Add, Abort, Stop) go in; a thread of the engine process moves them to the step loop's inbox as they
  come, so the event loop's `send` never waits for a step to end;
- one StepReport per round comes out (outputs, load, time), received by a thread of the HTTP process that hands
  it to the event loop. The start-up result (EngineInfo and the tokenizer, or the exception) and an engine failure
  come the same way.

The engine process spawns the ranks and the output process, if any, as its own children. It ignores SIGINT (a
Ctrl-C reaches the whole process group; the HTTP process decides when the engine stops: a drain still needs
it), and the ranks it spawns inherit that. When the HTTP process goes away, its pipe's end closes, and the
engine stops as if told to.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import queue
import signal
import threading
import traceback
from multiprocessing.connection import Connection, wait

from plait.config import EngineConfig
from plait.engine.data_parallel import make_engine
from plait.executor.executor import EngineFailure, RankFailure
from plait.server.engine_loop import EngineInfo, EngineLoop, StepLoop, Stop, shut_down

LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"  # both processes' (launch.py's too)


class EngineProcessDied(EngineFailure):
    """The engine's process ended without saying why (killed, crashed)."""


class EngineProcess(EngineLoop):
    def __init__(self, engine_cfg: EngineConfig, profile_comm_dir: str):
        ctx = mp.get_context("spawn")
        child_commands, self._commands = ctx.Pipe(duplex=False)
        self._reports, child_reports = ctx.Pipe(duplex=False)
        # Not a daemon: daemonic processes may not start the ranks. stop() ends it, or the closed pipe does.
        self._proc = ctx.Process(target=_engine_main, name="plait-engine",
                                 args=(engine_cfg, profile_comm_dir, child_commands, child_reports))
        self._proc.start()
        child_commands.close()
        child_reports.close()
        try:
            info = self._await_start()
        except BaseException:
            self._kill()
            raise
        self._stopping = False
        super().__init__(info, threading.Thread(target=self._receive, name="plait-engine-receiver", daemon=True))

    def _await_start(self) -> EngineInfo:
        """The engine's info once it has loaded, or its start-up error raised here (a ValueError stays one, so the
        CLI prints its one line); loading takes minutes, so this waits as long as the process lives."""
        if self._reports in wait([self._reports, self._proc.sentinel]):
            try:
                kind, value = self._reports.recv()
            except EOFError:
                pass
            else:
                if kind == "ready":
                    return value
                self._proc.join(timeout=30)
                raise value
        self._proc.join(timeout=5)
        raise EngineProcessDied(f"the engine process exited with code {self._proc.exitcode} while loading")

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the loop, and wait while the engine process shuts its ranks down (and writes the profile)."""
        self._stopping = True
        self._send(Stop())
        self._proc.join(timeout)
        self._kill()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._commands.close()

    def _send(self, command) -> None:
        try:
            self._commands.send(command)
        except OSError:  # the engine process is gone: the receiver turns that into every request's error
            pass

    def _receive(self) -> None:
        try:
            while True:
                kind, value = self._reports.recv()
                if kind == "report":
                    self._post(self._on_report, value)
                else:  # "failed": the engine raised; its process has logged why and shuts down
                    self._post(self._fail, value)
                    return
        except (EOFError, OSError):
            if not self._stopping:
                self._proc.join(timeout=5)
                self._post(self._fail, EngineProcessDied(f"the engine process exited with code {self._proc.exitcode}"))
        finally:
            self._reports.close()

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)


def _engine_main(cfg: EngineConfig, profile_comm_dir: str, commands: Connection, reports: Connection) -> None:
    """The engine process: load, say so (or send the start-up error), then run the step loop until Stop, the
    HTTP process's end closing, or an engine failure (sent, then the engine shuts down)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        engine = make_engine(cfg)
    except BaseException as e:  # noqa: BLE001 - the HTTP process raises it
        if not isinstance(e, (ValueError, RankFailure)):  # not a user error: keep its traceback in the log
            traceback.print_exc()
        reports.send(("error", _picklable(e)))
        return
    try:
        reports.send(("ready", EngineInfo.of(engine)))
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_forward, args=(commands, inbox), name="plait-engine-inbox", daemon=True).start()

        def send(message: tuple) -> None:
            try:
                reports.send(message)
            except OSError:  # the HTTP process is gone: stop as if told to
                inbox.put(Stop())

        StepLoop(engine, inbox, lambda r: send(("report", r)), lambda e: send(("failed", _picklable(e)))).run()
    finally:
        shut_down(engine, profile_comm_dir)


def _forward(commands: Connection, inbox: queue.SimpleQueue) -> None:
    """Move commands to the step loop's inbox as they arrive; the HTTP process's end closing means Stop."""
    try:
        while True:
            inbox.put(commands.recv())
    except (EOFError, OSError):
        inbox.put(Stop())


def _picklable(e: BaseException) -> BaseException:
    """`e` itself when it crosses a pipe (ValueError and RankFailure do), else a RuntimeError saying what it was."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any failure to pickle means: send its text instead
        return RuntimeError(f"{type(e).__name__}: {e}")
