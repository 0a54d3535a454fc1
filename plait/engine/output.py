"""The front end of the outputs: text, logprobs, stop strings and the RequestOutputs users see.

The step loop hands over token ids only (`StepOutputs`): it has already decided the stops a token id settles
(EOS, stop token ids, max_tokens, max_model_len; `plait.engine.stops`). Everything that needs the tokenizer
happens here: incremental detokenization, the decoded text of each logprob, and stop strings, which finish a
sequence at the token that completed the string. Because this can run on its own thread, behind the step loop,
the loop may have computed a few more tokens of a sequence that a stop string has ended: they are ignored here
(each sequence's output keeps its own token list), and the engine frees the sequence when it reads the output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from plait.core import TokenLogprobs
from plait.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from plait.sampling_params import SamplingParams


@dataclass
class NewRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class TokenDelta:
    """One token the step loop accepted for one sequence, with the stop it decided from the id alone."""

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


Decode = Callable[[list[int], bool], str]  # (ids, skip_special_tokens) -> text


def text_decoder(tokenizer) -> Decode:
    """The tokenizer's decode, called straight on its Rust backend where that gives the same text (no clean-up of
    spaces after decoding): transformers' wrapper costs ~5 us a call in conversions, and detokenization makes two
    calls per token per sequence, on the host, every step. Without a tokenizer every text is empty."""
    if tokenizer is None:
        return lambda ids, skip: ""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


class IncrementalDetokenizer:
    """The text of a growing list of ids, decoding a short window per token instead of the whole list.

    vLLM's prefix/read offsets: decode(ids[prefix:]) minus decode(ids[prefix:read]) is the new text. Both windows
    start at the same token, so what a tokenizer does at a window's start cancels out; new text is held back while
    it ends in an incomplete UTF-8 character (U+FFFD) and released by `flush` when the sequence ends.
    """

    def __init__(self, decode: Decode, skip_special_tokens: bool):
        self.decode, self.skip = decode, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self.decode(self.ids[self.prefix : self.read], self.skip)
        after = self.decode(self.ids[self.prefix :], self.skip)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


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


@dataclass
class RequestState:
    request: NewRequest
    outs: list[SeqOutput]
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(out.finish_reason is not None for out in self.outs)


class OutputProcessor:
    """Single-threaded: the engine calls it directly or through `plait.engine.output_thread.OutputThread`."""

    def __init__(self, tokenizer):
        self.decode = text_decoder(tokenizer)
        self.states: dict[str, RequestState] = {}

    def add(self, req: NewRequest) -> None:
        p = req.params
        outs = [SeqOutput(IncrementalDetokenizer(self.decode, p.skip_special_tokens),
                          logprobs=[] if p.logprobs is not None else None,
                          cumulative_logprob=0.0 if p.logprobs is not None else None) for _ in range(p.n)]
        prompt_lps = [None] * len(req.prompt_token_ids) if p.prompt_logprobs is not None else None
        self.states[req.request_id] = RequestState(req, outs, prompt_lps)

    def drop(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def process(self, step: StepOutputs) -> list[RequestOutput]:
        """Apply one step; returns an output per touched request (a finished one once, then forgotten)."""
        for d in step.prompts:
            state = self.states.get(d.request_id)
            if state is not None:
                for i, lp in enumerate(d.logprobs):
                    state.prompt_logprobs[d.start + 1 + i] = self._position(lp)
        for d in step.tokens:
            state = self.states.get(d.request_id)
            if state is not None and state.outs[d.index].finish_reason is None:
                self._append(state.request.params, state.outs[d.index], d)
        outputs = []
        for request_id in dict.fromkeys(step.touched):
            state = self.states.get(request_id)
            if state is not None:
                outputs.append(self._request_output(state))
                if state.finished:
                    del self.states[request_id]
        return outputs

    def _position(self, lp: TokenLogprobs) -> PositionLogprobs:
        return {t: Logprob(v, r, self.decode([t], False)) for t, v, r in zip(lp.token_ids, lp.logprobs, lp.ranks)}

    def _append(self, p: SamplingParams, out: SeqOutput, d: TokenDelta) -> None:
        """Add one token; a stop token is left out of the text unless include_stop_str_in_output asks for it."""
        out.token_ids.append(d.token)
        if d.logprobs is not None:
            out.logprobs.append(self._position(d.logprobs))
            out.cumulative_logprob += d.logprobs.logprobs[0]
        stop_token = d.finish_reason == "stop"
        previous = len(out.text)
        if not stop_token or p.include_stop_str_in_output:
            out.text += out.detok.add(d.token)
        if stop_token:
            out.finish_reason, out.stop_reason = "stop", d.stop_reason
        elif len(out.token_ids) > p.min_tokens and self._stop_string(p, out, previous):
            out.finish_reason = "stop"
        elif d.finish_reason is not None:
            out.finish_reason = d.finish_reason
        if out.finish_reason is not None and not isinstance(out.stop_reason, str):  # a stop string cut the text
            out.text += out.detok.flush()

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
