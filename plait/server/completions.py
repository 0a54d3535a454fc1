"""POST /v1/completions: one engine request per prompt, n choices each; streamed as server-sent events or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from plait.outputs import CompletionOutput
from plait.server.engine_loop import RequestStream
from plait.server.errors import APIError
from plait.server.protocol import CompletionRequest
from plait.server.state import ServerState
from plait.server.streaming import Usage, choice_deltas, collect, event_stream, top_logprobs
from plait.server.tokenizer import ServerTokenizer

router = APIRouter()


def _prompt_ids(prompt: str | list, tokenizer: ServerTokenizer) -> list[list[int]]:
    """OpenAI's four prompt shapes: a text, texts, token ids, lists of token ids."""
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if not prompt:
        raise APIError(400, "the prompt is empty: give a text, a list of texts or token ids", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


def _logprobs(c: CompletionOutput, offset: int, k: int) -> tuple[dict, int]:
    """OpenAI's legacy logprobs object for the tokens of `c` (a delta, or the whole completion), and the offset
    after them (the next delta's); text offsets count from the completion's start, `offset` being the characters
    of its tokens before these."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, position in zip(c.token_ids, c.logprobs):
        chosen = position[token_id]
        tokens.append(chosen.decoded_token)
        token_logprobs.append(chosen.logprob)
        tops.append({lp.decoded_token: lp.logprob for lp in top_logprobs(position, k)})
        offsets.append(offset)
        offset += len(chosen.decoded_token or "")
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}, offset


def _choice(index: int, c: CompletionOutput, logprobs: dict | None) -> dict:
    return {"index": index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason}


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, raw: Request) -> Response:
    arrival = time.monotonic()
    server: ServerState = raw.app.state.server
    server.check_model(body.model)
    params = body.sampling_params()
    prompts = [server.check_prompt(ids) for ids in _prompt_ids(body.prompt, server.tokenizer)]
    server.admit(len(prompts))
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": server.model_name}
    streams = [server.loop.generate(f"{head['id']}-{i}", ids, params, arrival) for i, ids in enumerate(prompts)]
    if body.stream:
        return event_stream(_chunks(head, streams, params.n, body.logprobs, body.include_usage), streams)
    finals = await collect(raw, streams)
    usage, choices, k = Usage(), [], body.logprobs
    for i, out in enumerate(finals):
        usage.add(out)
        for c in out.outputs:
            choices.append(_choice(i * params.n + c.index, c, _logprobs(c, 0, k)[0] if k is not None else None))
    return JSONResponse({**head, "choices": choices, "usage": usage.as_dict()})


async def _chunks(head: dict, streams: list[RequestStream], n: int, k: int | None,
                  include_usage: bool) -> AsyncIterator[dict]:
    usage, offsets = Usage(), {}  # offsets: each choice's characters so far, for text_offset
    async with aclosing(choice_deltas(streams, n, usage)) as deltas:
        async for d in deltas:
            logprobs = None
            if k is not None:
                logprobs, offsets[d.index] = _logprobs(d.output, offsets.get(d.index, 0), k)
            yield {**head, "choices": [_choice(d.index, d.output, logprobs)]}
    if include_usage:
        yield {**head, "choices": [], "usage": usage.as_dict()}
