"""Next-token sampling with vLLM V1 semantics, vectorised over a mixed batch.

One call serves greedy and random rows, different penalties and seeded and unseeded rows together with
batched tensor ops, so it runs on the GPU without a host sync: the results stay device tensors
(`SampleOutput`, `LogprobTensors`) until the host lists them, which the step loop does a step later when it
schedules asynchronously. Per-row Python work touches only sampling parameters and token-id lists, never
the vocabulary. A history may end in a PLACEHOLDER (the token sampled last step, not yet known on the host):
penalties then count the device-side token given in `pending`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from plait.core import TokenLogprobs
from plait.sampling_params import SamplingParams

# (rows, tokens), both [P] on the device: row r's history ends in a PLACEHOLDER that stands for token t
PendingTokens = tuple[torch.Tensor, torch.Tensor]


@dataclass
class SampleInput:
    """One row of a batch, with the history that penalties and min_tokens look at."""

    seq_id: int
    params: SamplingParams
    token_ids: list[int]  # every token of the sequence so far (prompt first, then outputs)
    prompt_len: int

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]


@dataclass
class LogprobTensors:
    """Logprobs of N rows, on the device until listed: each row's chosen token (id, logprob, rank), then its
    top ks[r]."""

    chosen: torch.Tensor  # [N]
    chosen_lp: torch.Tensor  # [N]
    ranks: torch.Tensor  # [N]
    top_ids: torch.Tensor  # [N, K]
    top_lp: torch.Tensor  # [N, K]
    ks: list[int]

    def tensors(self) -> list[torch.Tensor]:
        return [self.chosen, self.chosen_lp, self.ranks, self.top_ids, self.top_lp]

    def replace(self, tensors: list[torch.Tensor]) -> LogprobTensors:
        return LogprobTensors(*tensors, self.ks)

    def tolist(self) -> list[TokenLogprobs]:
        """The chosen token may appear twice (chosen, and among the top k), as in vLLM."""
        rows = zip(self.chosen.tolist(), self.chosen_lp.tolist(), self.ranks.tolist(), self.top_ids.tolist(),
                   self.top_lp.tolist(), self.ks)
        out = []
        for tok, lp, rank, ids, lps, k in rows:
            ids, lps = ids[:k], lps[:k]
            out.append(TokenLogprobs([tok] + ids, [lp] + lps, [rank] + list(range(1, len(ids) + 1))))
        return out


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B]
    logprobs: LogprobTensors | None  # of the rows in logprob_rows
    logprob_rows: list[int]

    def tolist(self) -> tuple[list[int], list[TokenLogprobs | None]]:
        rows: list[TokenLogprobs | None] = [None] * self.tokens.shape[0]
        for r, row in zip(self.logprob_rows, self.logprobs.tolist() if self.logprobs is not None else []):
            rows[r] = row
        return self.tokens.tolist(), rows


class Sampler:
    """Lives on the rank that holds the full logits; keeps per-sequence state (seeded torch.Generators) across steps."""

    def __init__(self, device: torch.device | str, eos_token_ids: set[int], seed: int = 0) -> None:
        self.device = torch.device(device)
        self.eos_token_ids = set(eos_token_ids)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)
        # A seeded sequence draws only from its own generator, so its tokens do not depend on its batch.
        self._seq_generators: dict[int, torch.Generator] = {}

    def forget(self, seq_ids: Iterable[int]) -> None:
        for seq_id in seq_ids:
            self._seq_generators.pop(seq_id, None)

    def sample(self, logits: torch.Tensor, inputs: list[SampleInput],
               pending: PendingTokens | None = None) -> SampleOutput:
        """The next token of each row and, where asked, its logprobs from the raw distribution."""
        # logits: [B, V]
        assert logits.shape[0] == len(inputs), f"{logits.shape[0]} logit rows for {len(inputs)} inputs"
        # A contiguous copy: the steps below write in place, some through a flat view.
        logits = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        wanted = [r for r, inp in enumerate(inputs) if inp.params.logprobs is not None]
        if wanted:
            index = to_device(wanted, logits.device, torch.long)  # [W]
            raw_logprobs = torch.log_softmax(logits[index], dim=-1)  # [W, V], before anything changes logits

        self._mask_stop_tokens(logits, inputs)
        logits = _apply_penalties(logits, inputs, pending)
        tokens = self._choose(logits, inputs)  # [B]
        if not wanted:
            return SampleOutput(tokens, None, [])
        ks = [inputs[r].params.logprobs for r in wanted]
        return SampleOutput(tokens, _token_logprobs(raw_logprobs, tokens[index], ks), wanted)

    def _mask_stop_tokens(self, logits: torch.Tensor, inputs: list[SampleInput]) -> None:
        """Forbid every way of stopping while a sequence is still short of min_tokens."""
        # logits: [B, V], changed in place
        vocab = logits.shape[1]
        flat: list[int] = []  # row * V + token; index_fill_ on the flat view, unlike index_put_, needs no sync
        for r, inp in enumerate(inputs):
            p = inp.params
            if p.min_tokens and len(inp.token_ids) - inp.prompt_len < p.min_tokens:  # no slice: every row, every step
                stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
                flat += [r * vocab + t for t in sorted(stops)]
        if flat:
            logits.view(-1).index_fill_(0, to_device(flat, logits.device, torch.long), float("-inf"))

    def _choose(self, logits: torch.Tensor, inputs: list[SampleInput]) -> torch.Tensor:
        """Greedy rows take the argmax of the penalised logits; the rest are drawn after temperature and filters."""
        # logits: [B, V] -> tokens: [B]
        params = [inp.params for inp in inputs]
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy
        dev = logits.device
        temperature = to_device([1.0 if p.greedy else p.temperature for p in params], dev)
        logits = logits.div_(temperature.unsqueeze(1))
        if any(p.min_p > 0.0 for p in params):
            logits = _apply_min_p(logits, to_device([p.min_p for p in params], dev))
        if any(p.top_k != -1 or p.top_p < 1.0 for p in params):
            vocab = logits.shape[1]
            top_k = to_device([vocab if p.top_k == -1 else min(p.top_k, vocab) for p in params], dev)
            logits = _apply_top_k_top_p(logits, top_k, to_device([p.top_p for p in params], dev))
        # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i.
        probs = logits.softmax(dim=-1)
        drawn = probs.div_(self._exponential_noise(probs, inputs)).argmax(dim=-1)
        is_greedy = to_device([p.greedy for p in params], dev)
        return torch.where(is_greedy, greedy, drawn)

    def _exponential_noise(self, like: torch.Tensor, inputs: list[SampleInput]) -> torch.Tensor:
        # like: [B, V] -> noise: [B, V]
        noise = torch.empty_like(like).exponential_(generator=self._generator)
        for r, inp in enumerate(inputs):
            seed = inp.params.seed
            if seed is not None and not inp.params.greedy:
                if inp.seq_id not in self._seq_generators:
                    self._seq_generators[inp.seq_id] = torch.Generator(device=self.device).manual_seed(seed)
                noise[r].exponential_(generator=self._seq_generators[inp.seq_id])
        # A zero draw would turn a masked token's 0/0 into NaN, which argmax would pick.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def prompt_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> LogprobTensors:
    """Score the actual next tokens of a prompt: each target's logprob and rank first, then the top k."""
    # logits: [T, V], targets: [T]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return _token_logprobs(logprobs, targets.to(logits.device), [k] * logits.shape[0])


def _token_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, ks: list[int]) -> LogprobTensors:
    """Row r: its chosen token's logprob and rank, and its top ks[r] alternatives."""
    # logprobs: [N, V], chosen: [N]
    chosen_lp = logprobs.gather(1, chosen.long().unsqueeze(1))  # [N, 1]
    ranks = (logprobs > chosen_lp).sum(dim=-1) + 1  # [N]
    top_lp, top_ids = logprobs.topk(min(max(ks, default=0), logprobs.shape[1]), dim=-1)  # [N, K]
    return LogprobTensors(chosen.long(), chosen_lp.squeeze(1), ranks, top_ids, top_lp, ks)


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Copy per-row values to the device from pinned memory: a pageable copy would wait for the GPU."""
    cpu = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        cpu = cpu.pin_memory()
    return cpu.to(device, non_blocking=True)


def _bin_counts(token_lists: list[list[int]], vocab: int, device: torch.device,
                pending: PendingTokens | None = None) -> torch.Tensor:
    """Count tokens per row; padding and placeholders go to an extra bin that is cut off, and each pending
    (device-side) token is counted in its row instead of its placeholder."""
    # -> counts: [B, V]
    width = max((len(t) for t in token_lists), default=0)
    padded = to_device([t + [vocab] * (width - len(t)) for t in token_lists], device, torch.long)
    padded.masked_fill_(padded < 0, vocab)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    if pending is not None:
        rows, tokens = pending
        counts.view(-1).index_add_(0, rows * (vocab + 1) + tokens, torch.ones_like(tokens, dtype=counts.dtype))
    return counts[:, :vocab]


def has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def _apply_penalties(logits: torch.Tensor, inputs: list[SampleInput], pending: PendingTokens | None) -> torch.Tensor:
    """Repetition over prompt and output (HF style), then frequency and presence over output only."""
    # logits: [B, V]
    params = [inp.params for inp in inputs]
    if not any(has_penalties(p) for p in params):
        return logits  # the common case skips building [B, V] counts
    dev, vocab = logits.device, logits.shape[1]
    output_counts = _bin_counts([inp.output_token_ids for inp in inputs], vocab, dev, pending)  # [B, V]
    in_output = output_counts > 0
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = in_output | (_bin_counts([inp.token_ids[: inp.prompt_len] for inp in inputs], vocab, dev) > 0)
        repetition = to_device([p.repetition_penalty for p in params], dev).unsqueeze(1)  # [B, 1]
        scale = torch.where(seen, repetition, 1.0)
        logits = torch.where(logits > 0, logits / scale, logits * scale)
    frequency = to_device([p.frequency_penalty for p in params], dev).unsqueeze(1)  # [B, 1]
    presence = to_device([p.presence_penalty for p in params], dev).unsqueeze(1)  # [B, 1]
    return logits - frequency * output_counts - presence * in_output


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    # logits: [B, V], min_p: [B]
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [B, 1]
    return logits.masked_fill_(probs < threshold, float("-inf"))


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sort ascending once so both filters drop a prefix; the top token always survives."""
    # logits: [B, V], top_k: [B] (V = off), top_p: [B] (1.0 = off)
    sorted_logits, order = logits.sort(dim=-1)
    kth_largest = sorted_logits.gather(1, (logits.shape[1] - top_k).unsqueeze(1))  # [B, 1]
    sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    # Drop the low tail while its mass is <= 1 - top_p: what remains is the smallest set with mass >= top_p.
    tail_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    drop = tail_mass <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
