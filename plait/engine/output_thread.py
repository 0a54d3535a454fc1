"""Where the output processor runs: inline in the step loop, or on a thread of its own behind it.

On its thread (`async_output_proc`), detokenization and stop strings for step N run while the ranks compute
step N+1: the step loop hands over token ids and goes on. `take(lag)` returns the outputs that are ready once at
most `lag` handed-over steps are still unprocessed; the engine passes lag 1 while it has more steps to run, so
the outputs of a step come back, deterministically, one step later, and 0 when it runs out of work, to drain.
The tokenizer's decode holds the GIL only briefly and the step loop waits outside it (on the ranks' pipes or
the GPU), so the two overlap.
"""

from __future__ import annotations

import queue
import threading

from plait.engine.output import NewRequest, OutputProcessor, StepOutputs
from plait.outputs import RequestOutput


class InlineOutputs:
    """The output processor called in the caller's thread: outputs are ready as soon as a step is handed over."""

    def __init__(self, processor: OutputProcessor):
        self.processor = processor
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


_STOP = object()


class OutputThread:
    """The output processor on its own thread, fed in order through one queue; the processor is its alone."""

    def __init__(self, processor: OutputProcessor):
        self.processor = processor
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ready: list[RequestOutput] = []
        self._unprocessed = 0  # steps handed over and not yet processed
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="plait-output", daemon=True)
        self._thread.start()

    def add(self, req: NewRequest) -> None:
        self._inbox.put(req)

    def drop(self, request_id: str) -> None:
        self._inbox.put(request_id)

    def submit(self, step: StepOutputs) -> None:
        with self._cond:
            self._unprocessed += 1
        self._inbox.put(step)

    def take(self, lag: int) -> list[RequestOutput]:
        """The outputs ready once at most `lag` handed-over steps remain; a failure in the thread is raised here."""
        with self._cond:
            self._cond.wait_for(lambda: self._unprocessed <= lag or self._error is not None)
            if self._error is not None:
                raise RuntimeError("the output thread failed") from self._error
            ready, self._ready = self._ready, []
        return ready

    def close(self) -> None:
        self._inbox.put(_STOP)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (item := self._inbox.get()) is not _STOP:
            try:
                if isinstance(item, NewRequest):
                    self.processor.add(item)
                elif isinstance(item, str):
                    self.processor.drop(item)
                else:
                    outputs = self.processor.process(item)
                    with self._cond:
                        self._ready += outputs
                        self._unprocessed -= 1
                        self._cond.notify_all()
            except BaseException as e:  # noqa: BLE001 - handed to the step loop, which raises it
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return


def make_outputs(processor: OutputProcessor, threaded: bool) -> InlineOutputs | OutputThread:
    return OutputThread(processor) if threaded else InlineOutputs(processor)
