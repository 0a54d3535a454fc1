"""Token-split overlap (TokenWeave): a big step's tokens in two halves, one half's all-reduce under the other's compute.

With the tensor-parallel all-reduces deferred to the norms (plait.layers.norm.AllReduceRMSNorm), a decoder is a chain
of seams: norm (finishes the communication of the body before it) then body (attention or MLP: compute). A step
split into halves A and B issues the seams A, B, A, B, ...: a half's norm runs on a communication stream while the
other half's body runs on the compute stream, and each waits only for its own half's previous work (CUDA events).
Every norm runs on the one communication stream, in the same order on every rank, so at most one collective is in
flight at a time (two collectives on two streams can deadlock across ranks).

On GPU the norms are the fused symmetric-memory op (plait.comm.fused_norm), which takes only a few SMs and needs no
allocation, each half in its own rows of the buffer; so no tensor changes stream except the residuals, which live
for the whole forward. On CPU the same schedule runs in order (gloo all-reduce, then the norm): the tests check that
splitting changes no token.

The cut is at a token, so one prompt may be split: its second half reads the first half's keys and values from the
paged cache, written earlier in the same layer, exactly as a chunked prefill does.
"""

from __future__ import annotations

import contextlib

import torch

from plait.comm.communicator import Communicator
from plait.engine.cuda_graph import StepInputs


def split_inputs(x: StepInputs, k: int) -> tuple[StepInputs, StepInputs]:
    """The first k tokens and the rest, each a step of its own. The sequence cut at k (if any) appears in both: its
    first part as a chunk ending at token k, its second part as the next chunk (its earlier tokens in the cache)."""
    assert 0 < k < len(x.ids), f"cut {k} outside a step of {len(x.ids)} tokens"
    first = StepInputs(x.ids[:k], x.positions[:k], x.slots[:k], [], [], [])
    second = StepInputs(x.ids[k:], x.positions[k:], x.slots[k:], [], [], [])
    start = 0
    for seq_len, q, table in zip(x.seq_lens, x.query_lens, x.tables):
        before = max(0, min(q, k - start))  # this sequence's new tokens that fall in the first half
        if before:
            _append(first, seq_len - q + before, before, table)
        if q - before:
            _append(second, seq_len, q - before, table)
        start += q
    return first, second


def _append(x: StepInputs, seq_len: int, query_len: int, table: list[int]) -> None:
    x.seq_lens.append(seq_len)
    x.query_lens.append(query_len)
    x.tables.append(table)


class TokenSplitOverlap:
    def __init__(self, comm: Communicator, device: torch.device, min_tokens: int):
        self.comm, self.min_tokens = comm, min_tokens
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def takes(self, num_tokens: int) -> bool:
        """Big enough to pay, and (on GPU) the fused op has rows for both halves."""
        if num_tokens < max(self.min_tokens, 2):
            return False
        return self.stream is None or (self.comm.fused_norm is not None and num_tokens <= self.comm.fused_norm.max_tokens)

    def forward(self, model, halves: list[tuple[torch.Tensor, torch.Tensor, object]]) -> torch.Tensor:
        """halves: (ids, positions, attention metadata) of each half, in token order -> final hidden states [T, hidden]."""
        states = [(model.embed_tokens(ids), None) for ids, _, _ in halves]
        offsets = [0, len(halves[0][0])]
        done = [self._event() for _ in halves]  # each half's last compute so far
        for norm, body in model.seams():
            for h, (_, positions, meta) in enumerate(halves):
                x, residual = states[h]
                with self._region(offsets[h]):
                    if residual is None:  # the embedding: whole already, nothing to reduce
                        x, residual = norm(x), x
                    else:
                        x, residual = self._on_comm_stream(norm, x, residual, done[h])
                    if body is not None:
                        x = body(x, positions, meta)
                        done[h] = self._event()
                states[h] = (x, residual)
        return torch.cat([x for x, _ in states])

    def _region(self, offset: int):
        fused = self.comm.fused_norm
        return fused.region(offset) if fused is not None else contextlib.nullcontext()

    def _event(self) -> torch.cuda.Event | None:
        return torch.cuda.current_stream().record_event() if self.stream is not None else None

    def _on_comm_stream(self, norm, x: torch.Tensor, residual: torch.Tensor, after: torch.cuda.Event | None):
        """norm(x, residual) on the communication stream once `after` (its input's compute) is done; the compute
        stream waits for it before the body that reads its output."""
        if self.stream is None:
            return norm(x, residual)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(after)
            out = norm(x, residual)
            ready = self.stream.record_event()
        torch.cuda.current_stream().wait_event(ready)
        return out
