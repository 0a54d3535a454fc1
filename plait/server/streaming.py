"""From the engine's DELTA outputs to what each endpoint sends: per-choice deltas, usage, server-sent events.

Both endpoints stream the same way (only the chunk's shape differs), and both wait on several engine requests
at once: a completions call may carry many prompts, each an engine request with n choices.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from plait.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from plait.server.engine_loop import RequestStream
from plait.server.errors import APIError, error_body

logger = logging.getLogger("plait.server")
T = TypeVar("T")


def top_logprobs(position: PositionLogprobs, k: int) -> list[Logprob]:
    """The k most likely tokens at one position (the engine also keeps the sampled one, whatever its rank)."""
    return sorted(position.values(), key=lambda lp: lp.rank or 0)[:k]


@dataclass
class ChoiceDelta:
    index: int  # the choice's index in the response: prompt * n + choice
    output: CompletionOutput  # what the choice gained: new text, token ids and logprobs; its finish reason
    first: bool  # the first delta of this choice (chat sends the role with it)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        """Count a DELTA output (a request's prompt comes with its first one only) or a whole one."""
        self.prompt_tokens += len(out.prompt_token_ids)
        self.completion_tokens += sum(len(c.token_ids) for c in out.outputs)

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def choice_deltas(streams: list[RequestStream], n: int, usage: Usage) -> AsyncIterator[ChoiceDelta]:
    """Each choice's deltas as the engine's outputs arrive (it holds back text a stop string may still cut);
    `usage` counts them."""
    seen: set[int] = set()
    async with aclosing(merge(streams)) as outputs:
        async for prompt_index, out in outputs:
            usage.add(out)
            for c in out.outputs:
                index = prompt_index * n + c.index
                yield ChoiceDelta(index, c, index not in seen)
                seen.add(index)


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several streams as their items arrive, each item with its stream's index."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item))
        except Exception as e:
            queue.put_nowait((i, e))
        queue.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def final_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    """Each request's whole output, its deltas added up, in the order of `streams`."""
    whole: list[RequestOutput | None] = [None] * len(streams)
    async with aclosing(merge(streams)) as outputs:
        async for i, out in outputs:
            if whole[i] is None:
                whole[i] = out
            else:
                whole[i].add(out)
    return whole


async def collect(request: Request, streams: list[RequestStream]) -> list[RequestOutput]:
    """A non-streamed answer: each request's final output; the client leaving aborts them all."""
    try:
        return await until_disconnected(request, final_outputs(streams))
    finally:
        close_all(streams)


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await a non-streaming request's work, cancelling it (which aborts its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise APIError(499, "the client closed the request")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def event_stream(chunks: AsyncIterator[dict], streams: list[RequestStream]) -> StreamingResponse:
    """Server-sent events ending in `[DONE]`; an error after the 200 went out becomes an error event."""

    async def body() -> AsyncIterator[str]:
        try:
            async with aclosing(chunks) as events:
                async for chunk in events:
                    yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception as e:
            logger.error("internal error while streaming", exc_info=e)
            yield f"data: {json.dumps(error_body(500, f'internal server error ({type(e).__name__})'))}\n\n"
        yield "data: [DONE]\n\n"

    async def close() -> None:
        close_all(streams)

    # However the response ends (finished, client gone), the background task aborts whatever still runs.
    return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(close))


def close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()
