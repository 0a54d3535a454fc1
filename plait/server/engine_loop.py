"""The engine's step loop and the HTTP side's handle on it, wherever the loop runs.

The loop runs in a process of its own (engine_process.py, the default) or in a thread of the HTTP process
(engine_thread.py, `--no-frontend-multiprocessing`). Both are the same two halves joined differently:

- `StepLoop`, beside the engine: the only code that touches it (the engine is not thread-safe). It applies the
  adds and aborts of its inbox in arrival order between steps, steps while there is work, blocks on the inbox when
  there is none, and after each round hands one `StepReport` (the outputs, the load, the time) to the other side.
- `EngineLoop`, in the HTTP process: what the routes call. `generate` queues an add and returns the request's
  `RequestStream`; the thread that receives the reports hands each whole one to the event loop (one
  `call_soon_threadsafe` a step, not one an output), which feeds the streams and records the metrics with the
  step's own timestamp.

An engine failure fails every request in flight with `EngineDeadError`, and every later one: the server stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from plait.engine.engine import check_prompt
from plait.outputs import RequestOutput
from plait.sampling_params import RequestOutputKind, SamplingParams
from plait.server.errors import APIError
from plait.server.metrics import Load, ServerMetrics

logger = logging.getLogger("plait.server")
T = TypeVar("T")


class EngineDeadError(APIError):
    """The engine raised in a step (a rank died, say) or its process died; every request in it, and every later
    one until the server has stopped, fails with this."""

    def __init__(self, cause: BaseException):
        super().__init__(500, f"the engine has failed ({type(cause).__name__}: {cause}); the server is stopping")


@dataclass(frozen=True)
class EngineInfo:
    """What the HTTP side knows of the engine, sent once it has loaded."""

    model_name: str
    model: str | None  # the --model given (a path or a preset), /v1/models's `root`
    max_model_len: int
    max_num_seqs: int
    vocab_size: int
    tokenizer: object  # the HTTP side's own copy of the engine's tokenizer; None for a preset with dummy weights

    @classmethod
    def of(cls, engine) -> EngineInfo:
        return cls(engine.model_name, engine.cfg.model, engine.sched_config.max_model_len,
                   engine.sched_config.max_num_seqs, engine.model_config.vocab_size, engine.tokenizer)

    def check_prompt(self, ids: list[int]) -> None:
        check_prompt(ids, self.max_model_len, self.vocab_size)


# The inbox's commands: plain data, so they cross a pipe as well as a queue.
@dataclass
class Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Abort:
    request_id: str


@dataclass
class Stop:
    """End the loop after its current step."""


@dataclass
class StepReport:
    """One round of the step loop: its commands applied and, if there was work, one step run."""

    load: Load
    time: float  # time.monotonic() when the step returned (one clock for every process of the machine)
    num_added: int = 0  # adds taken from the inbox, the rejected ones included
    rejected: list[tuple[str, ValueError]] = field(default_factory=list)  # the engine's own last word on an add
    outputs: list[RequestOutput] = field(default_factory=list)


class StepLoop:
    """Beside the engine: commands from `inbox` (a queue.SimpleQueue), one StepReport to `report` per round, until
    Stop or an engine failure, which is logged here (where its traceback is, whichever process this is) and then
    handed to `fail`: the HTTP side fails every request in flight, then the server stops."""

    def __init__(self, engine, inbox: queue.SimpleQueue, report: Callable[[StepReport], None],
                 fail: Callable[[Exception], None]):
        self.engine, self.inbox, self.report, self.fail = engine, inbox, report, fail

    def run(self) -> None:
        try:
            while True:
                commands = self._take(block=not self.engine.has_unfinished_requests())
                if any(isinstance(cmd, Stop) for cmd in commands):
                    return
                rejected = self._apply(commands)
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                now = time.monotonic()
                num_added = sum(isinstance(cmd, Add) for cmd in commands)
                self.report(StepReport(self._load(), now, num_added, rejected, outputs))
        except Exception as e:  # the engine is broken
            logger.exception("the engine failed: the server stops")
            self.fail(e)

    def _take(self, block: bool) -> list:
        commands = [self.inbox.get()] if block else []
        while True:
            try:
                commands.append(self.inbox.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, commands: list) -> list[tuple[str, ValueError]]:
        """Adds and aborts in arrival order; the adds the engine refused."""
        rejected = []
        for cmd in commands:
            if isinstance(cmd, Abort):
                self.engine.abort_request(cmd.request_id)  # frees its KV blocks now; unknown ids are ignored
                continue
            try:
                self.engine.add_request(cmd.prompt_ids, cmd.params, cmd.request_id)
            except ValueError as e:  # the HTTP side validated already; this is the engine's own last word
                rejected.append((cmd.request_id, e))
        return rejected

    def _load(self) -> Load:
        running, waiting = self.engine.request_counts()
        return Load(running, waiting, self.engine.kv_cache_usage(), *self.engine.prefix_cache_tokens())


def shut_down(engine, profile_comm_dir: str) -> None:
    """Stop the engine's ranks and output process, after writing the communication profile if one was asked."""
    try:
        if engine.cfg.profile_comm:  # every collective of the server's life (up to the profiler's cap)
            from plait.comm.trace import write_profile

            write_profile(engine, profile_comm_dir)
    finally:
        engine.shutdown()


_CLOSED = object()  # a stream's queue: the request was closed from the event loop


class RequestStream:
    """One request's outputs, put by the EngineLoop as each report reaches the event loop; iterate it for them.

    Whoever submitted the request closes it when done with it (the response ended, the client left): closing an
    unfinished request aborts it in the engine, whether or not anyone ever iterated.
    """

    def __init__(self, request_id: str, abort: Callable[[str], None]):
        self.request_id, self._abort = request_id, abort
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | Exception) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        """What the request gained since the last call: the DELTA outputs that piled up while the client was slow
        come added into one (as vLLM's front end does), so a slow client gets fewer, bigger chunks."""
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            later = self._queue.get_nowait()
            if isinstance(later, RequestOutput):
                item.add(later)
            else:  # an error, or closed: what piled up no longer matters
                item = later
        if item is _CLOSED:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        """Abort the request unless it finished, and wake anyone still waiting on it."""
        if not self.finished:
            self.finished = True
            self._abort(self.request_id)
            self._queue.put_nowait(_CLOSED)


class EngineLoop:
    """The HTTP side of the step loop. A subclass gives the thread that receives its reports (`thread`, started by
    `start`), carries commands to the loop (`_send`), and ends it (`stop`); that thread passes each report to
    `_post(self._on_report, ...)`, and the engine's end to `_post(self._fail, ...)`.

    Streams, metrics, load and `error` belong to the event loop alone: the routes' adds, aborts and admission run
    on it, and `_post` runs the reports and the failure there too, so no lock is needed, and a request is either
    failed by `_fail` or refused by `generate`.
    """

    def __init__(self, info: EngineInfo, thread: threading.Thread):
        self.info = info
        self.metrics: ServerMetrics | None = None  # set by start()
        self.load = Load()  # the load of the latest report
        self.error: BaseException | None = None
        self._thread = thread
        self._event_loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._streams: dict[str, RequestStream] = {}  # requests not yet finished or aborted
        self._queued = 0  # adds sent that no report has counted yet

    def start(self, metrics: ServerMetrics, event_loop: asyncio.AbstractEventLoop) -> None:
        """Start receiving reports, for `event_loop` (the server's, running) to apply."""
        self.metrics, self._event_loop = metrics, event_loop
        self._thread.start()

    def stop(self) -> None:
        """Let the loop end after its current step and shut the engine down (its ranks, its output process)."""
        raise NotImplementedError

    def _send(self, command: Add | Abort | Stop) -> None:
        raise NotImplementedError

    def would_wait(self, new: int) -> int:
        """How many requests would wait if `new` more came now: those queued in the engine or on their way to it,
        plus the new ones, less the free sequence slots the next step fills."""
        return max(0, self.load.waiting + self._queued + new - (self.info.max_num_seqs - self.load.running))

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 arrival: float) -> RequestStream:
        """Queue the request now (so admission counts it at once); the caller must close the stream it gets."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        # DELTA: a step sends each request's new tokens only, wherever the loop runs; the streams (adding up the
        # outputs that piled up), the metrics and the routes' final outputs and usage all count on it.
        params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
        stream = self._streams[request_id] = RequestStream(request_id, self._abort)
        self._queued += 1
        self.metrics.on_added(request_id, arrival, len(prompt_ids))
        self._send(Add(request_id, prompt_ids, params))
        return stream

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is None:  # finished meanwhile, or the engine failed
            return
        self.metrics.on_aborted(request_id)
        self._send(Abort(request_id))

    def _post(self, handler: Callable[[T], None], arg: T) -> None:
        """From the receiving thread: `handler(arg)` on the event loop; dropped once that has closed (nobody is
        listening any more)."""
        try:
            self._event_loop.call_soon_threadsafe(self._guarded, handler, arg)
        except RuntimeError:
            pass

    def _guarded(self, handler: Callable[[T], None], arg: T) -> None:
        """A report that cannot be applied fails the server like an engine failure would: left to asyncio's
        handler, it would only be logged, and the requests it carried would wait forever."""
        try:
            handler(arg)
        except Exception as e:
            logger.exception("a step's report could not be applied: the server stops")
            self._fail(e)

    def _on_report(self, report: StepReport) -> None:
        self._queued -= report.num_added
        self.load = report.load
        self.metrics.set_load(report.load)
        for request_id, error in report.rejected:
            if (stream := self._streams.pop(request_id, None)) is not None:
                self.metrics.on_aborted(request_id)
                stream.put(error)
        for out in report.outputs:
            if (stream := self._streams.get(out.request_id)) is None:  # aborted while the step ran
                continue
            self.metrics.on_output(out, report.time)
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail(self, cause: BaseException) -> None:
        """Fail every request in flight and refuse every later one; `error` is set last, once the requests in
        flight have their error, because the server stops when it sees it (DrainingServer.on_tick, on this same
        event loop)."""
        dead = EngineDeadError(cause)
        for stream in self._streams.values():
            stream.put(dead)
        self._streams.clear()
        self.error = cause
