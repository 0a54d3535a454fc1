"""POST /v1/chat/completions: the conversation through the model's chat template, n choices, streamed or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from plait.outputs import CompletionOutput, Logprob
from plait.server.engine_loop import RequestStream
from plait.server.protocol import ChatCompletionRequest, conversation
from plait.server.state import ServerState
from plait.server.streaming import Usage, choice_deltas, collect, event_stream, top_logprobs

router = APIRouter()


def _token(lp: Logprob) -> dict:
    text = lp.decoded_token or ""
    return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8"))}


def _logprobs(c: CompletionOutput, k: int) -> dict:
    """The chat API's logprobs for the tokens of `c` (a delta, or the whole completion): per token, its own
    logprob and the k most likely alternatives."""
    return {"content": [{**_token(position[token_id]), "top_logprobs": [_token(lp) for lp in top_logprobs(position, k)]}
                        for token_id, position in zip(c.token_ids, c.logprobs)]}


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Response:
    arrival = time.monotonic()
    server: ServerState = raw.app.state.server
    server.check_model(body.model)
    params = body.sampling_params()
    ids = server.check_prompt(server.tokenizer.chat(conversation(body.messages), body.add_generation_prompt))
    server.admit(1)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
    k = params.logprobs
    streams = [server.loop.generate(head["id"], ids, params, arrival)]
    if body.stream:
        return event_stream(_chunks({**head, "object": "chat.completion.chunk"}, streams, params.n, k,
                                    body.include_usage), streams)
    (out,) = await collect(raw, streams)
    usage = Usage()
    usage.add(out)
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": _logprobs(c, k) if k is not None else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage.as_dict()})


async def _chunks(head: dict, streams: list[RequestStream], n: int, k: int | None,
                  include_usage: bool) -> AsyncIterator[dict]:
    usage = Usage()
    async with aclosing(choice_deltas(streams, n, usage)) as deltas:
        async for d in deltas:
            text = d.output.text
            delta = {"role": "assistant", "content": text} if d.first else {"content": text}
            choice = {"index": d.index, "delta": delta,
                      "logprobs": _logprobs(d.output, k) if k is not None else None,
                      "finish_reason": d.output.finish_reason, "stop_reason": d.output.stop_reason}
            yield {**head, "choices": [choice]}
    if include_usage:
        yield {**head, "choices": [], "usage": usage.as_dict()}
