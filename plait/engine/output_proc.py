"""Where the output processor runs: inline in the step loop, or in a process of its own behind it.

In its process (`async_output_proc`), detokenization, stop strings and the RequestOutputs of step N are made
while the step loop plans and runs step N+1: the loop hands over token ids and goes on. A thread would not do:
the processor is Python, which holds the GIL the step loop needs (on one H200, SmolLM2 at 256 sequences lost
throughput with a thread; docs/step_loop.md). What crosses the pipes is kept small: a step's token deltas as
plain tuples, and back only the outputs the requests asked for (`RequestOutputKind`).

`take(lag)` returns the outputs that are ready once at most `lag` handed-over steps are still unprocessed; the
engine passes lag 1 while it has more steps to run, so the outputs of a step come back, deterministically, one
step later, and 0 when it runs out of work, to drain. A thread of the step loop's process receives the child's
answers as they come, so neither side blocks on a full pipe, and it turns the child's failure or death into an
error raised by the next `take`.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import traceback
from multiprocessing.connection import Connection, wait

from plait.engine.heap import freeze_startup_heap
from plait.engine.output import NewRequest, OutputProcessor, StepOutputs, TokenDelta
from plait.outputs import RequestOutput


_START_TIMEOUT_S = 120  # spawning imports torch and unpickles the tokenizer: seconds on a busy machine


class InlineOutputs:
    """The output processor called in the caller's thread: outputs are ready as soon as a step is handed over."""

    def __init__(self, tokenizer):
        self.processor = OutputProcessor(tokenizer)
        self._ready: list[RequestOutput] = []

    def add(self, req: NewRequest) -> None:
        self.processor.add(req)

    def drop(self, request_id: str) -> None:
        self.processor.drop(request_id)

    def submit(self, step: StepOutputs) -> None:
        self._ready += self.processor.process(step)

    def take(self, lag: int) -> list[RequestOutput]:
        ready, self._ready = self._ready, []
        return ready

    def close(self) -> None:
        pass


class OutputProcess:
    """The output processor in a spawned process, fed in order through one pipe and answering through another."""

    def __init__(self, tokenizer):
        ctx = mp.get_context("spawn")
        child_in, self._inbox = ctx.Pipe(duplex=False)
        self._outbox, child_out = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_serve, args=(child_in, child_out), name="plait-output", daemon=True)
        self._proc.start()
        child_in.close()
        child_out.close()
        self._await_start()
        self._send(("tokenizer", tokenizer))
        self._ready: list[RequestOutput] = []
        self._unprocessed = 0  # steps handed over and not yet answered
        self._error: str | None = None
        self._closing = False
        self._cond = threading.Condition()
        self._receiver = threading.Thread(target=self._receive, name="plait-output-receiver", daemon=True)
        self._receiver.start()

    def add(self, req: NewRequest) -> None:
        self._send(("add", req))

    def drop(self, request_id: str) -> None:
        self._send(("drop", request_id))

    def submit(self, step: StepOutputs) -> None:
        with self._cond:
            self._unprocessed += 1
        self._send(("step", (step.touched, [tuple(d) for d in step.tokens], step.prompts)))

    def take(self, lag: int) -> list[RequestOutput]:
        """The outputs ready once at most `lag` handed-over steps remain; a failure of the process is raised here."""
        with self._cond:
            self._cond.wait_for(lambda: self._unprocessed <= lag or self._error is not None)
            if self._error is not None:
                raise RuntimeError(f"the output process failed: {self._error}")
            ready, self._ready = self._ready, []
        return ready

    def close(self) -> None:
        with self._cond:
            self._closing = True
        try:
            self._inbox.send(("close", None))
        except OSError:
            pass  # already gone
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
        self._receiver.join(timeout=10)
        self._inbox.close()

    def _await_start(self) -> None:
        """Wait for the child's hello. Until it has unpickled its pipe ends, this process keeps copies of them for
        it, so a child that dies earlier (typically re-running an unguarded script) would never be noticed; and the
        tokenizer goes through the pipe afterwards, not with the process's arguments, whose write would block for
        good on a child that died before reading them (multiprocessing's spawn keeps the pipe's read end open)."""
        try:
            if self._outbox in wait([self._outbox, self._proc.sentinel], timeout=_START_TIMEOUT_S):
                self._outbox.recv()
                return
        except EOFError:
            pass
        self._proc.kill()
        self._proc.join(timeout=10)
        raise RuntimeError(
            f"the output process (async_output_proc) did not start (exit code {self._proc.exitcode}); processes are "
            "spawned, so a script that starts plait must do so under `if __name__ == '__main__':`")

    def _send(self, message: tuple) -> None:
        try:
            self._inbox.send(message)
        except OSError as e:
            raise RuntimeError(f"the output process is gone (exit code {self._proc.exitcode})") from e

    def _receive(self) -> None:
        try:
            while True:
                answer = self._outbox.recv()
                with self._cond:
                    if isinstance(answer, str):  # the child's traceback: it has stopped
                        self._error = answer
                    else:
                        self._ready += answer
                        self._unprocessed -= 1
                    self._cond.notify_all()
                if isinstance(answer, str):
                    return
        except (EOFError, OSError):
            with self._cond:
                if not self._closing:
                    self._error = f"it exited (exit code {self._proc.exitcode})"
                self._cond.notify_all()
        finally:
            self._outbox.close()


def _serve(inbox: Connection, outbox: Connection) -> None:
    """The child: say hello, take the tokenizer, then apply messages in order until told to close (or the parent
    is gone). Ctrl-C reaches every process of the terminal's group; the parent decides when this one ends (a
    draining server still needs it), so it ignores SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    outbox.send(None)
    try:
        _, tokenizer = inbox.recv()
        processor = OutputProcessor(tokenizer)
        freeze_startup_heap()
        while True:
            kind, item = inbox.recv()
            if kind == "add":
                processor.add(item)
            elif kind == "drop":
                processor.drop(item)
            elif kind == "step":
                touched, tokens, prompts = item
                outbox.send(processor.process(StepOutputs(touched, [TokenDelta(*t) for t in tokens], prompts)))
            else:
                return
    except EOFError:
        return
    except BaseException:  # noqa: BLE001 - reported to the step loop, which raises it
        outbox.send(traceback.format_exc())


def make_outputs(tokenizer, in_process: bool) -> InlineOutputs | OutputProcess:
    return OutputProcess(tokenizer) if in_process else InlineOutputs(tokenizer)
