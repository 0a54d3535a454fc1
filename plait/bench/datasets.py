"""Workloads for `plait bench serve`: random prompts of chosen lengths, ShareGPT conversations, timed traces.

Lengths are counted with the server's own tokenizer when it has vLLM's /tokenize; against a server without it,
prompts are random words and lengths are estimates (the server's usage counts replace them in the results).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Random "words" from consonant-vowel syllables: pronounceable, never a real phrase the model could continue.
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
_TOKENS_PER_WORD = 1.3  # the usual English estimate, for servers that cannot count for us


@dataclass
class SampleRequest:
    prompt: str
    prompt_len: int  # tokens (server-counted when the server tokenizes, else an estimate)
    output_len: int  # max_tokens to ask for
    timestamp: float | None = None  # seconds after the trace's first request; None: arrivals come from the rate


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def _count(text: str, tokenizer: Tokenizer | None) -> int:
    return len(tokenizer.encode(text)) if tokenizer else math.ceil(len(text.split()) * _TOKENS_PER_WORD)


def random_prompt(num_tokens: int, rng: np.random.Generator, tokenizer: Tokenizer | None) -> tuple[str, int]:
    """A prompt of `num_tokens` tokens: random words cut to length by the server's tokenizer when there is one."""
    words = ["".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4))) for _ in range(num_tokens)]
    text = " ".join(words)
    if tokenizer is None:
        return " ".join(words[: max(1, round(num_tokens / _TOKENS_PER_WORD))]), num_tokens
    ids = tokenizer.encode(text)[:num_tokens]  # every word is at least one token, so there are enough
    return tokenizer.decode(ids), len(ids)


def _lengths(mean: int, range_ratio: float, n: int, rng: np.random.Generator) -> list[int]:
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n).tolist()


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float, rng: np.random.Generator,
                    tokenizer: Tokenizer | None, prefix_len: int = 0) -> list[SampleRequest]:
    """`prefix_len` > 0 starts every prompt with the same random text of that many tokens (a shared system prompt,
    as vLLM's --random-prefix-len), before its own `input_len` (+- the range) tokens."""
    if input_len < 1 or output_len < 1 or prefix_len < 0:
        raise ValueError(f"--random-input-len and --random-output-len must be >= 1 and --random-prefix-len >= 0, got "
                         f"{input_len}, {output_len}, {prefix_len}")
    prefix, counted = random_prompt(prefix_len, rng, tokenizer) if prefix_len else ("", 0)
    ins, outs = _lengths(input_len, range_ratio, n, rng), _lengths(output_len, range_ratio, n, rng)
    requests = []
    for i, o in zip(ins, outs):
        text, count = random_prompt(i, rng, tokenizer)
        requests.append(SampleRequest(f"{prefix} {text}" if prefix else text, counted + count, o))
    return requests


def sharegpt_requests(path: str, n: int, rng: np.random.Generator, tokenizer: Tokenizer | None,
                      output_len: int | None = None) -> list[SampleRequest]:
    """First human turn as the prompt, the answer's length as max_tokens; vLLM's filters for too short/long."""
    with open(path) as f:
        data = json.load(f)
    convs = [d["conversations"] for d in data if len(d.get("conversations", [])) >= 2]
    out: list[SampleRequest] = []
    for i in rng.permutation(len(convs)):
        if len(out) == n:
            break
        prompt, answer = convs[i][0]["value"], convs[i][1]["value"]
        p_len = _count(prompt, tokenizer)
        o_len = output_len if output_len is not None else _count(answer, tokenizer)
        if p_len < 4 or o_len < 4 or p_len > 1024 or p_len + o_len > 2048:
            continue
        out.append(SampleRequest(prompt, p_len, o_len))
    if not out:
        raise ValueError(f"{path}: no conversation of 2+ turns with a prompt of 4..1024 tokens and an answer of 4+")
    return out


def trace_requests(path: str, n: int, rng: np.random.Generator, tokenizer: Tokenizer | None) -> list[SampleRequest]:
    """One request per JSONL line, `{"timestamp": s, "input_len": tokens, "output_len": tokens}`, kept in time."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"timestamp", "input_len", "output_len"} - set(row)
            if missing:
                raise ValueError(f"{path}:{number}: missing {sorted(missing)}; each line needs timestamp, input_len, output_len")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: the trace is empty")
    rows = sorted(rows, key=lambda r: r["timestamp"])[:n]
    t0 = rows[0]["timestamp"]
    return [SampleRequest(*random_prompt(int(r["input_len"]), rng, tokenizer), int(r["output_len"]),
                          float(r["timestamp"] - t0)) for r in rows]
