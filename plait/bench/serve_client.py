"""The benchmark's side of the wire: one streamed request with its timings, and the calls made before the run.

Any OpenAI-compatible server works: only /v1/models and the chosen endpoint are needed; vLLM's /tokenize and
/detokenize, where the server has them, make prompt lengths exact.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import aiohttp

from plait.bench.datasets import SampleRequest

TIMEOUT = aiohttp.ClientTimeout(total=6 * 60 * 60)  # as vLLM's: a long run must not time out its slowest request


@dataclass
class Target:
    url: str  # base URL + endpoint
    chat: bool  # /v1/chat/completions shapes (messages in, delta.content out)
    model: str
    headers: dict[str, str]
    temperature: float
    ignore_eos: bool


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0  # the server's usage count when it sent one, else the dataset's
    output_tokens: int = 0
    start: float = 0.0  # seconds after the benchmark began
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # gaps between text chunks after the first, seconds
    latency: float = 0.0  # seconds, send to last byte
    error: str = ""


def _payload(target: Target, req: SampleRequest) -> dict:
    body = {"model": target.model, "temperature": target.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if target.chat:
        body |= {"messages": [{"role": "user", "content": req.prompt}], "max_completion_tokens": req.output_len}
    else:
        body |= {"prompt": req.prompt, "max_tokens": req.output_len}
    if target.ignore_eos:
        body["ignore_eos"] = True
    return body


def _text(chunk: dict, chat: bool) -> str:
    if not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    return (choice.get("delta", {}).get("content") or "") if chat else (choice.get("text") or "")


async def _events(resp: aiohttp.ClientResponse):
    """The `data:` payloads of a server-sent event stream, however the bytes are cut into reads."""
    buf = b""
    async for piece in resp.content.iter_any():
        buf += piece
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.splitlines():
                if line.startswith(b"data:"):
                    yield line[5:].strip()


async def send_request(session: aiohttp.ClientSession, target: Target, req: SampleRequest, t0: float) -> RequestResult:
    result = RequestResult(prompt_len=req.prompt_len)
    sent = last = time.perf_counter()
    result.start = sent - t0
    chunks = 0
    try:
        async with session.post(target.url, json=_payload(target, req), headers=target.headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return result
            async for data in _events(resp):
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))
                    return result
                now = time.perf_counter()
                if _text(chunk, target.chat):
                    if chunks == 0:
                        result.ttft = now - sent
                    else:
                        result.itl.append(now - last)
                    chunks, last = chunks + 1, now
                if chunk.get("usage"):
                    result.prompt_len = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
        result.latency = time.perf_counter() - sent
        result.output_tokens = result.output_tokens or chunks  # a server without usage: one token per chunk
        result.success = True
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def _call(url: str, headers: dict[str, str], body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={**headers, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)


def first_model(base_url: str, headers: dict[str, str]) -> str:
    try:
        models = _call(f"{base_url}/v1/models", headers)["data"]
    except (urllib.error.URLError, OSError, KeyError) as e:
        raise ValueError(f"cannot list the models of {base_url} (is the server up? is the key right?): {e}") from None
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model: pass --model")
    return models[0]["id"]


class ServerTokenizer:
    """The server's tokenizer through vLLM's /tokenize and /detokenize (special tokens left to the server)."""

    def __init__(self, base_url: str, model: str, headers: dict[str, str]):
        self.base_url, self.model, self.headers = base_url, model, headers

    @classmethod
    def probe(cls, base_url: str, model: str, headers: dict[str, str]) -> ServerTokenizer | None:
        tok = cls(base_url, model, headers)
        try:
            tok.encode("probe")
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            return None
        return tok

    def encode(self, text: str) -> list[int]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        return _call(f"{self.base_url}/tokenize", self.headers, body)["tokens"]

    def decode(self, ids: list[int]) -> str:
        return _call(f"{self.base_url}/detokenize", self.headers, {"model": self.model, "tokens": ids})["prompt"]
