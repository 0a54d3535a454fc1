"""Turning sampled tokens into what users see: text, logprobs, stop decisions, RequestOutputs.

Owned by the engine on the driver. Detokenization and stop-string checks happen here, off the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plait.core import Sequence, TokenLogprobs
from plait.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput


@dataclass
class SeqOutput:
    """What the user sees of one sequence; the Sequence itself holds the token ids."""

    text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    outs: list[SeqOutput]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    finished_seqs: set[int] = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return len(self.finished_seqs) == len(self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer, self.eos_token_ids, self.max_model_len = tokenizer, eos_token_ids, max_model_len

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) if self.tokenizer else ""

    def to_position(self, lp: TokenLogprobs) -> PositionLogprobs:
        return {t: Logprob(v, r, self.decode([t], False)) for t, v, r in zip(lp.token_ids, lp.logprobs, lp.ranks)}

    def add_prompt_logprobs(self, state: RequestState, start: int, lps: list[TokenLogprobs]) -> None:
        """lps[i] is the logprob of prompt token start + 1 + i; index 0 stays None as in vLLM."""
        for i, lp in enumerate(lps):
            state.prompt_logprobs[start + 1 + i] = self.to_position(lp)

    def append_token(self, seq: Sequence, out: SeqOutput, token: int, lp: TokenLogprobs | None) -> None:
        """Extend the sequence by one token and decide whether it has finished (sets seq.finish_reason)."""
        seq.append_token(token)
        if lp is not None:
            out.logprobs.append(self.to_position(lp))
            out.cumulative_logprob += lp.logprobs[0]
        p = seq.params
        n_out = seq.num_output_tokens
        stop_token = n_out > p.min_tokens and (
            token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)
        )
        previous = out.text
        if self.tokenizer is not None:
            shown = seq.output_token_ids[:-1] if stop_token and not p.include_stop_str_in_output else seq.output_token_ids
            out.text = self.decode(shown, p.skip_special_tokens)
        if stop_token:
            seq.finish_reason, seq.stop_reason = "stop", token if token in p.stop_token_ids else None
        elif n_out > p.min_tokens and self._stop_string(seq, out, len(previous)):
            seq.finish_reason = "stop"
        elif n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    def _stop_string(self, seq: Sequence, out: SeqOutput, previous_len: int) -> bool:
        for stop in seq.params.stop:
            at = out.text.find(stop, max(0, previous_len - len(stop) + 1))
            if at >= 0:
                out.text = out.text[: at + len(stop) if seq.params.include_stop_str_in_output else at]
                seq.stop_reason = stop
                return True
        return False

    def request_output(self, state: RequestState) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=seq.index,
                text=out.text,
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=out.cumulative_logprob,
                logprobs=out.logprobs,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for seq, out in zip(state.seqs, state.outs)
        ]
        return RequestOutput(
            state.request_id, state.prompt, state.prompt_token_ids, state.prompt_logprobs, outputs, state.finished
        )
