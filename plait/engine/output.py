"""The front end of the outputs: text, logprobs, stop strings and the RequestOutputs users see.

The step loop hands over token ids only (`StepOutputs`): it has already decided the stops a token id settles
(EOS, stop token ids, max_tokens, max_model_len; `plait.engine.stops`). Everything that needs the tokenizer
happens here: incremental detokenization, the decoded text of each logprob, and stop strings, which finish a
sequence at the token that completed the string. Because this can run in its own process, behind the step loop,
the loop may have computed a few more tokens of a sequence that a stop string has ended: they are ignored here
(each sequence's output keeps its own token list), and the engine frees the sequence when it reads the output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from plait.core import TokenLogprobs
from plait.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from plait.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class NewRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


class TokenDelta(NamedTuple):
    """One token the step loop accepted for one sequence, with the stop it decided from the id alone (a tuple: it
    crosses to the output process as a plain one, which pickles several times faster than a dataclass)."""

    request_id: str
    index: int
    token: int
    logprobs: TokenLogprobs | None
    finish_reason: str | None  # "stop" (EOS or a stop token id) | "length" | None
    stop_reason: int | None


@dataclass
class PromptDelta:
    request_id: str
    start: int  # logprobs[i] is the logprob of prompt token start + 1 + i
    logprobs: list[TokenLogprobs]


@dataclass
class StepOutputs:
    """What one step changed: the requests it touched (each gets a RequestOutput), new tokens, prompt logprobs."""

    touched: list[str] = field(default_factory=list)
    tokens: list[TokenDelta] = field(default_factory=list)
    prompts: list[PromptDelta] = field(default_factory=list)


Decode = Callable[[list[list[int]], bool], list[str]]  # (id lists, skip_special_tokens) -> their texts


def text_decoder(tokenizer) -> Decode:
    """The tokenizer's batch decode, called straight on its Rust backend where that gives the same text (no
    clean-up of spaces after decoding). A step's detokenization is one call for every sequence: transformers'
    wrapper costs ~5 us a call in conversions, and one batch call replaces two per sequence. Without a tokenizer
    every text is empty."""
    if tokenizer is None:
        return lambda batch, skip: [""] * len(batch)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda batch, skip: backend.decode_batch(batch, skip_special_tokens=skip)
    return lambda batch, skip: tokenizer.batch_decode(batch, skip_special_tokens=skip)


class IncrementalDetokenizer:
    """The text of a growing list of ids, decoding a short window per token instead of the whole list.

    vLLM's prefix/read offsets: decode(ids[prefix:]) minus decode(ids[prefix:read]) is the new text. Both windows
    start at the same token, so what a tokenizer does at a window's start cancels out; new text is held back while
    it ends in an incomplete UTF-8 character (U+FFFD) and released by a final decode when the sequence ends.
    The decoding itself is `new_texts`, for many detokenizers at once.
    """

    def __init__(self, skip_special_tokens: bool):
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0

    @property
    def has_new(self) -> bool:
        return self.read < len(self.ids)

    def windows(self) -> tuple[list[int], list[int]]:
        return self.ids[self.prefix : self.read], self.ids[self.prefix :]

    def settle(self, before: str, after: str, final: bool) -> str:
        """The new text, given the two windows decoded; advances the offsets past it."""
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


def new_texts(decode: Decode, detoks: list[IncrementalDetokenizer], final: bool) -> list[str]:
    """Each detokenizer's new text since the last call, from one decode call per skip_special_tokens setting."""
    texts = [""] * len(detoks)
    for skip in (True, False):
        idx = [i for i, d in enumerate(detoks) if d.skip is skip and d.has_new]
        if idx:
            decoded = decode([w for i in idx for w in detoks[i].windows()], skip)
            for j, i in enumerate(idx):
                texts[i] = detoks[i].settle(decoded[2 * j], decoded[2 * j + 1], final)
    return texts


@dataclass
class SeqOutput:
    """What the user sees of one sequence."""

    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0  # how much of it DELTA outputs have sent
    sent_chars: int = 0


@dataclass
class RequestState:
    request: NewRequest
    outs: list[SeqOutput]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    prompt_sent: bool = False  # a DELTA output has carried the prompt

    @property
    def finished(self) -> bool:
        return all(out.finish_reason is not None for out in self.outs)


class OutputProcessor:
    """Single-threaded: the engine calls it directly or it runs in `plait.engine.output_proc.OutputProcess`."""

    def __init__(self, tokenizer):
        self.decode = text_decoder(tokenizer)
        self.states: dict[str, RequestState] = {}

    def add(self, req: NewRequest) -> None:
        p = req.params
        outs = [SeqOutput(IncrementalDetokenizer(p.skip_special_tokens),
                          logprobs=[] if p.logprobs is not None else None,
                          cumulative_logprob=0.0 if p.logprobs is not None else None) for _ in range(p.n)]
        prompt_lps = [None] * len(req.prompt_token_ids) if p.prompt_logprobs is not None else None
        self.states[req.request_id] = RequestState(req, outs, prompt_lps)

    def drop(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def process(self, step: StepOutputs) -> list[RequestOutput]:
        """Apply one step (at most one token per sequence); returns an output per touched request that wants one
        (`RequestOutputKind`; a DELTA request only when a completion got tokens), a finished request once, then
        forgotten."""
        for d in step.prompts:
            state = self.states.get(d.request_id)
            if state is not None:
                for i, lp in enumerate(d.logprobs):
                    state.prompt_logprobs[d.start + 1 + i] = self._position(lp)
        live = [(state, state.outs[d.index], d) for d in step.tokens
                if (state := self.states.get(d.request_id)) is not None and state.outs[d.index].finish_reason is None]
        for state, out, d in live:
            self._append(state.request.params, out, d)
        ended_ids, flushed = set(), []
        for (state, out, d), text in zip(live, new_texts(self.decode, [out.detok for _, out, _ in live], final=False)):
            if self._settle(state.request.params, out, d, text):
                ended_ids.add(state.request.request_id)
                if not isinstance(out.stop_reason, str):  # a stop string cut the text; else the held-back text
                    flushed.append(out)
        for out, text in zip(flushed, new_texts(self.decode, [out.detok for out in flushed], final=True)):
            out.text += text
        outputs = []
        for request_id in dict.fromkeys(step.touched):
            state = self.states.get(request_id)
            if state is None:
                continue
            kind = state.request.params.output_kind
            if kind is RequestOutputKind.DELTA:
                if (delta := self._delta_output(state)) is not None:
                    outputs.append(delta)
            elif kind is RequestOutputKind.CUMULATIVE or request_id in ended_ids:
                outputs.append(self._request_output(state))
            if state.finished:
                del self.states[request_id]
        return outputs

    def _position(self, lp: TokenLogprobs) -> PositionLogprobs:
        texts = self.decode([[t] for t in lp.token_ids], False)
        return {t: Logprob(v, r, text) for t, v, r, text in zip(lp.token_ids, lp.logprobs, lp.ranks, texts)}

    def _append(self, p: SamplingParams, out: SeqOutput, d: TokenDelta) -> None:
        """Add one token's id and logprobs; it goes to the text unless it is a stop token and
        include_stop_str_in_output does not ask for it."""
        out.token_ids.append(d.token)
        if d.logprobs is not None:
            out.logprobs.append(self._position(d.logprobs))
            out.cumulative_logprob += d.logprobs.logprobs[0]
        if d.finish_reason != "stop" or p.include_stop_str_in_output:
            out.detok.ids.append(d.token)

    def _settle(self, p: SamplingParams, out: SeqOutput, d: TokenDelta, text: str) -> bool:
        """Add the token's new text and decide whether the sequence ends here; True when it does."""
        previous = len(out.text)
        out.text += text
        if d.finish_reason == "stop":
            out.finish_reason, out.stop_reason = "stop", d.stop_reason
        elif len(out.token_ids) > p.min_tokens and self._stop_string(p, out, previous):
            out.finish_reason = "stop"
        elif d.finish_reason is not None:
            out.finish_reason = d.finish_reason
        return out.finish_reason is not None

    @staticmethod
    def _stop_string(p: SamplingParams, out: SeqOutput, previous_len: int) -> bool:
        for stop in p.stop:
            at = out.text.find(stop, max(0, previous_len - len(stop) + 1))
            if at >= 0:
                out.text = out.text[: at + len(stop) if p.include_stop_str_in_output else at]
                out.stop_reason = stop
                return True
        return False

    @staticmethod
    def _request_output(state: RequestState) -> RequestOutput:
        outputs = [
            CompletionOutput(index=i, text=out.text, token_ids=list(out.token_ids),
                             cumulative_logprob=out.cumulative_logprob,
                             logprobs=list(out.logprobs) if out.logprobs is not None else None,
                             finish_reason=out.finish_reason, stop_reason=out.stop_reason)
            for i, out in enumerate(state.outs)
        ]
        req = state.request
        prompt_lps = list(state.prompt_logprobs) if state.prompt_logprobs is not None else None
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, prompt_lps, outputs, state.finished)

    @staticmethod
    def _delta_output(state: RequestState) -> RequestOutput | None:
        """What this step added to the request, or None when no completion got a token (a prefill chunk)."""
        stop = state.request.params.stop
        completions = [_delta(i, out, stop) for i, out in enumerate(state.outs) if out.sent_tokens < len(out.token_ids)]
        if not completions:
            return None
        req, first = state.request, not state.prompt_sent
        state.prompt_sent = True
        prompt_lps = list(state.prompt_logprobs) if first and state.prompt_logprobs is not None else None
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids if first else [], prompt_lps,
                             completions, state.finished)


def _delta(index: int, out: SeqOutput, stop: list[str]) -> CompletionOutput:
    """The completion's tokens and text since its last delta (which this one becomes). A trailing start of a stop
    string is held back until it settles or the sequence ends (the text is cut back if the stop completes); an
    unfinished UTF-8 character never reaches the text (`IncrementalDetokenizer.settle` holds it)."""
    end = len(out.text)
    if out.finish_reason is None:
        end = max(out.sent_chars, end - _unsettled_tail(out.text, stop))
    tokens = slice(out.sent_tokens, len(out.token_ids))
    delta = CompletionOutput(index, out.text[out.sent_chars : end], out.token_ids[tokens], out.cumulative_logprob,
                             out.logprobs[tokens] if out.logprobs is not None else None,
                             out.finish_reason, out.stop_reason)
    out.sent_tokens, out.sent_chars = tokens.stop, end
    return delta


def _unsettled_tail(text: str, stop: list[str]) -> int:
    """How many trailing characters may still change: the start of a stop string (the text is cut back once the
    stop completes)."""
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if s.startswith(text[-k:]):
                hold = k
                break
    return hold
