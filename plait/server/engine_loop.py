"""The engine thread: one background thread owns the LLMEngine and steps it whenever there is work.

Why a thread: `LLMEngine.step()` blocks for a whole forward pass, and meanwhile the HTTP event loop must keep
accepting requests and streaming tokens. The engine is not thread-safe, so this thread is the only one that
touches it: the event loop sends adds and aborts through `inbox` (a thread-safe queue), and each request's
outputs come back through its `RequestStream` (an asyncio queue fed with `call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from plait.engine.engine import LLMEngine
from plait.outputs import RequestOutput
from plait.sampling_params import SamplingParams
from plait.server.errors import APIError
from plait.server.metrics import Load, ServerMetrics

logger = logging.getLogger("plait.server")


class EngineDeadError(APIError):
    """The engine raised in a step (a rank died, say); every request in it, and every later one until the server
    has stopped, fails with this."""

    def __init__(self, cause: BaseException):
        super().__init__(500, f"the engine has failed ({type(cause).__name__}: {cause}); the server is stopping")


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    arrival: float


@dataclass
class _Abort:
    request_id: str


_STOP = object()  # inbox: end the engine thread
_CLOSED = object()  # a stream's queue: the request was closed from the event loop


class RequestStream:
    """One request's outputs on their way from the engine thread to the event loop; iterate it for them.

    Whoever submitted the request closes it when done with it (the response ended, the client left): closing an
    unfinished request aborts it in the engine, whether or not anyone ever iterated.
    """

    def __init__(self, request_id: str, inbox: queue.SimpleQueue):
        self.request_id, self._inbox = request_id, inbox
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | Exception) -> None:
        """Called on the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        """The newest output; outputs are cumulative, so ones that piled up while the client was slow are skipped."""
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            item = self._queue.get_nowait()
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
            self._inbox.put(_Abort(self.request_id))
            self._queue.put_nowait(_CLOSED)


class EngineLoop:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics):
        self.engine, self.metrics = engine, metrics
        self.load = Load()  # replaced (never mutated) by the engine thread, so a reader sees one consistent load
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="plait-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort whatever is left and end the thread (after its current step)."""
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    def would_wait(self, new: int) -> int:
        """How many requests would wait if `new` more came now: those queued in the engine or still in the inbox,
        plus the new ones, less the free sequence slots the next step fills."""
        load = self.load
        free_slots = self.engine.sched_config.max_num_seqs - load.running
        return max(0, load.waiting + self._inbox.qsize() + new - free_slots)

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 arrival: float) -> RequestStream:
        """Queue the request now (so admission counts it at once); the caller must close the stream it gets."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        stream = RequestStream(request_id, self._inbox)
        self._inbox.put(_Add(request_id, prompt_ids, params, stream, arrival))
        return stream

    def _run(self) -> None:
        try:
            while self._apply(self._take(block=not self.engine.has_unfinished_requests())):
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
                self._publish_load()
        except Exception as e:  # the engine is broken: fail everyone, refuse everything; the server then stops
            logger.exception("the engine failed: the server stops")
            dead = EngineDeadError(e)
            for stream in self._streams.values():
                stream.put(dead)
            self._streams.clear()
            self.error = e  # set once the requests in flight have their error: the server stops when it sees it
            self._refuse_all(dead)

    def _take(self, block: bool) -> list:
        commands = [self._inbox.get()] if block else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, commands: list) -> bool:
        """Apply adds and aborts in arrival order; False once asked to stop."""
        for cmd in commands:
            if cmd is _STOP:
                for request_id in list(self._streams):
                    self._abort(request_id)
                return False
            if isinstance(cmd, _Abort):
                self._abort(cmd.request_id)
                continue
            try:
                self.engine.add_request(cmd.prompt_ids, cmd.params, cmd.request_id)
            except ValueError as e:  # the HTTP side validated already; this is the engine's own last word
                cmd.stream.put(e)
                continue
            self._streams[cmd.request_id] = cmd.stream
            self.metrics.on_added(cmd.request_id, cmd.arrival, len(cmd.prompt_ids))
        if commands:
            self._publish_load()
        return True

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.engine.abort_request(request_id)  # frees its KV blocks now
            self.metrics.on_aborted(request_id)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            self.metrics.on_output(out, now)
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _publish_load(self) -> None:
        running, waiting = self.engine.request_counts()
        self.load = Load(running, waiting, self.engine.kv_cache_usage(), *self.engine.prefix_cache_tokens())
        self.metrics.set_load(self.load)

    def _refuse_all(self, dead: EngineDeadError) -> None:
        """Until told to stop, answer every request that reached the inbox with the engine's error."""
        while (cmd := self._inbox.get()) is not _STOP:
            if isinstance(cmd, _Add):
                cmd.stream.put(dead)
