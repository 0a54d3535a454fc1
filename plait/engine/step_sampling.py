"""A step's logits -> its answer: sampled on one rank or spread over the ranks, kept on the device until asked.

Gathered (the default): the LM head gathers every logits row on each rank of the last stage, and tensor rank 0
samples the batch. Spread (`sampling_parallel`): the head keeps each rank's vocabulary columns; each rank takes
a share of the sequences, receives their rows' other columns in one all-to-all of logit blocks (1/R of the
bytes the gather moves to each rank), samples them and answers for them; the driver merges the answers. A
seeded sequence is always sampled by rank seq_id % R, where its generator lives, so it draws the same tokens
as on the gathered path; the other sequences are balanced by logits rows.

The answer is a `PendingResult`: its device-to-host copies queue behind the step's GPU work and `resolve()`
waits for them, so a rank can launch the next step before the host has this one's tokens. With asynchronous
scheduling every rank also keeps every sampled token on its device (`SampledTokens`) for the next step's
inputs: broadcast from the sampler rank, or all-gathered when sampling is spread.
"""

from __future__ import annotations

import torch
from torch import nn

from plait.config import EngineConfig
from plait.core import PLACEHOLDER, StepResult
from plait.engine.sampled_tokens import SampledTokens
from plait.engine.sampler import (LogprobTensors, SampleInput, SampleOutput, Sampler, has_penalties, prompt_logprobs,
                                  to_device)
from plait.layers.embedding import ParallelLMHead
from plait.parallel.context import RankContext

Mirrors = dict[int, tuple[list[int], object, int]]  # the runner's seq_id -> (tokens, params, prompt_len)


class PendingResult:
    """A rank's answer to one step while its tensors may still be on the device; `resolve()` lists them."""

    def __init__(self, seq_ids: list[int], out: SampleOutput | None, prompt: dict[int, LogprobTensors],
                 device: torch.device):
        self.seq_ids = seq_ids
        # The sampled ids where they were made: the next step's inputs read them there (asynchronous scheduling).
        self.tokens = out.tokens if out is not None else None
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        host = _to_host if self.event is not None else (lambda t: t)
        if out is not None:
            lps = out.logprobs.replace([host(t) for t in out.logprobs.tensors()]) if out.logprobs is not None else None
            out = SampleOutput(host(out.tokens), lps, out.logprob_rows)
        self.out = out
        self.prompt = {seq_id: lt.replace([host(t) for t in lt.tensors()]) for seq_id, lt in prompt.items()}
        if self.event is not None:
            self.event.record()

    def resolve(self) -> StepResult:
        if self.event is not None:
            self.event.synchronize()  # releases the GIL while the GPU finishes the step
        result = StepResult()
        if self.out is not None:
            tokens, logprobs = self.out.tolist()
            for seq_id, token, lp in zip(self.seq_ids, tokens, logprobs):
                result.sampled[seq_id] = token
                if lp is not None:
                    result.logprobs[seq_id] = lp
        result.prompt_logprobs = {seq_id: lt.tolist() for seq_id, lt in self.prompt.items()}
        return result


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Queue a copy into pinned memory behind the work that makes t; valid once the result's event has fired."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


class StepSampler:
    """On every rank of the last stage; only the ranks that sample answer (`answers`)."""

    def __init__(self, cfg: EngineConfig, ctx: RankContext, device: torch.device, eos_token_ids: set[int],
                 model: nn.Module, sampled: SampledTokens):
        self.comm, self.sampled, self.device = ctx.stage_group, sampled, device  # every rank holding the logits
        self.spread = cfg.sampling_parallel and self.comm.size > 1
        self.answers = self.spread or ctx.is_sampler
        # every rank feeds the next step's inputs
        self.share_tokens = cfg.resolved_async_scheduling() and self.comm.size > 1
        seed = cfg.seed + (self.comm.rank if self.spread else 0)  # spread ranks draw unseeded noise independently
        self.sampler = Sampler(device, eos_token_ids, seed) if self.answers else None
        heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
        for head in heads:
            head.gather = not self.spread
        self.vocab_sizes = heads[0].sizes if heads else []  # each rank's columns; one entry when logits are whole
        assert not self.spread or len(self.vocab_sizes) in (1, self.comm.size), (
            f"the LM head splits the vocabulary {len(self.vocab_sizes)} ways over a group of {self.comm.size} ranks")

    def forget(self, seq_ids: list[int]) -> None:
        if self.sampler is not None:
            self.sampler.forget(seq_ids)

    def run(self, order: list[int], logits: torch.Tensor | None, sample_rows: dict[int, int],
            prompt_spans: dict[int, tuple[int, int, int]], mirrors: Mirrors) -> PendingResult | None:
        """order: the step's sequences; sample_rows: seq_id -> its row in logits; prompt_spans: seq_id ->
        (first row, rows, first position) of its prompt logprobs. logits: [N, vocab] ([N, own columns] if spread)."""
        if not sample_rows and not prompt_spans:
            return None
        if self.spread:
            return self._spread(order, logits, sample_rows, prompt_spans, mirrors)
        seq_ids = list(sample_rows)
        result = self._sample(logits, sample_rows, prompt_spans, mirrors) if self.answers else None
        tokens = result.tokens if result is not None else None
        if self.share_tokens and seq_ids:
            if tokens is None:
                tokens = torch.empty(len(seq_ids), dtype=torch.long, device=self.device)
            tokens = self.comm.broadcast(tokens, src=0)
        if tokens is not None:
            self.sampled.keep(seq_ids, tokens)
        return result

    def _sample(self, logits: torch.Tensor, sample_rows: dict[int, int],
                prompt_spans: dict[int, tuple[int, int, int]], mirrors: Mirrors) -> PendingResult:
        prompt = {}
        for seq_id, (first, count, start) in prompt_spans.items():
            tokens, params, _ = mirrors[seq_id]
            targets = to_device(tokens[start + 1 : start + 1 + count], self.device, torch.long)
            prompt[seq_id] = prompt_logprobs(logits[first : first + count], targets, params.prompt_logprobs)
        if not sample_rows:
            return PendingResult([], None, prompt, self.device)
        inputs = [SampleInput(s, mirrors[s][1], mirrors[s][0], mirrors[s][2]) for s in sample_rows]
        pending = [r for r, inp in enumerate(inputs) if inp.token_ids[-1] == PLACEHOLDER and has_penalties(inp.params)]
        tail = None
        if pending:  # penalties count last step's token, still only on the device
            ids = [inputs[r].seq_id for r in pending]
            tail = (to_device(pending, self.device, torch.long), self.sampled.lookup(ids))
        rows = logits.index_select(0, to_device(list(sample_rows.values()), self.device, torch.long))
        return PendingResult(list(sample_rows), self.sampler.sample(rows, inputs, tail), prompt, self.device)

    def _owners(self, order: list[int], sample_rows: dict[int, int], prompt_spans: dict,
                mirrors: Mirrors) -> list[list[int]]:
        """Each rank's sequences: seeded sampled ones on rank seq_id % R, the rest to the rank with fewest rows.
        Every rank computes the same split from the same plan."""
        size = self.comm.size
        shares, load = [[] for _ in range(size)], [0] * size
        weight = {s: (s in sample_rows) + prompt_spans.get(s, (0, 0, 0))[1] for s in order}
        pinned = [s for s in order if s in sample_rows and mirrors[s][1].seed is not None and not mirrors[s][1].greedy]
        for s in pinned:
            shares[s % size].append(s)
            load[s % size] += weight[s]
        for s in order:
            if weight[s] and s not in pinned:
                r = load.index(min(load))
                shares[r].append(s)
                load[r] += weight[s]
        return shares

    def _spread(self, order: list[int], logits: torch.Tensor, sample_rows: dict[int, int],
                prompt_spans: dict[int, tuple[int, int, int]], mirrors: Mirrors) -> PendingResult:
        shares = self._owners(order, sample_rows, prompt_spans, mirrors)
        groups, my_rows, my_spans = [], {}, {}
        for r, share in enumerate(shares):
            rows: list[int] = []
            for s in share:
                if s in prompt_spans:  # a sequence's logits rows are contiguous: its prompt rows, then its sample row
                    first, count, start = prompt_spans[s]
                    if r == self.comm.rank:
                        my_spans[s] = (len(rows), count, start)
                    rows += range(first, first + count)
                if s in sample_rows:
                    if r == self.comm.rank:
                        my_rows[s] = len(rows)
                    rows.append(sample_rows[s])
            groups.append(rows)
        result = self._sample(self._exchange(logits, groups), my_rows, my_spans, mirrors)
        if self.share_tokens:
            counts = [sum(s in sample_rows for s in share) for share in shares]
            if sum(counts):
                empty = torch.empty(0, dtype=torch.long, device=self.device)
                tokens = self.comm.all_gather(result.tokens if result.tokens is not None else empty, counts, dim=0)
                self.sampled.keep([s for share in shares for s in share if s in sample_rows], tokens)
        return result

    def _exchange(self, logits: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
        """Rank j gets the rows groups[j] with every vocabulary column: [len(groups[me]), vocab]."""
        me, width = self.comm.rank, logits.shape[1]
        if len(self.vocab_sizes) == 1:  # the head is whole on every rank: the rows are here already
            return logits.index_select(0, to_device(groups[me], self.device, torch.long))
        send = logits.index_select(0, to_device([r for g in groups for r in g], self.device, torch.long))
        n = len(groups[me])
        recv_sizes = [n * v for v in self.vocab_sizes]
        recv = self.comm.all_to_all(send.reshape(-1), [len(g) * width for g in groups], recv_sizes)
        blocks = recv.split(recv_sizes)
        return torch.cat([b.view(n, v) for b, v in zip(blocks, self.vocab_sizes)], dim=1)
