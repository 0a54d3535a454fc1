"""The stops a token id decides, checked in the step loop as soon as a token is known.

EOS, stop token ids, max_tokens and max_model_len need no tokenizer, so the engine frees a sequence that hits
one before it plans the next step. Stop strings need text: the output processor finds them (plait.engine.output).
"""

from __future__ import annotations

from plait.core import Sequence


def token_stop(seq: Sequence, token: int, eos_token_ids: set[int], max_model_len: int) -> None:
    """Set seq.finish_reason ("stop" or "length") and stop_reason if `token`, just appended, ends the sequence."""
    p = seq.params
    n_out = seq.num_output_tokens
    if n_out > p.min_tokens and (token in p.stop_token_ids or (not p.ignore_eos and token in eos_token_ids)):
        seq.finish_reason, seq.stop_reason = "stop", token if token in p.stop_token_ids else None
    elif n_out >= p.max_tokens or seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"
