"""All-reduce + residual add + RMSNorm in one pass over peer-to-peer symmetric memory (TokenWeave without multicast).

Every rank of the tensor-parallel group holds its partial sums in a buffer that all peers can address. Rank r owns
a contiguous 1/W of the token rows: it reads those rows from every peer's buffer, sums them, adds its residual,
normalises, and writes the normalised rows back into every peer's buffer at the same place. Each row is written by
exactly one rank, so the result is bit-identical on all ranks, and each row crosses NVLink once in each direction
(a two-shot all-reduce, with the norm folded into the middle instead of a separate pass over the data).

The residual is only updated on the rows a rank owns: the next fused op reads only those rows again, since the
split depends only on the token count, which is fixed within a forward pass.

Peers are passed as up to eight pointer arguments (`P0`..`P7`, the unused ones repeat `P0`); the loads and stores
unroll at compile time for the group size (`WORLD`). This is the form checked on the H200s (bit-identical across
ranks, equal inside a CUDA graph); under the Triton interpreter the CPU test stands all peers in one process.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_PEERS = 8


@triton.jit
def _load_peer(P, offs, mask):
    return tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _reduce_add_rms_norm_kernel(
    P0, P1, P2, P3, P4, P5, P6, P7, R, W, row_start, row_end, N, eps,
    WORLD: tl.constexpr, BLOCK: tl.constexpr,
):
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0)
    for row in range(row_start + tl.program_id(0), row_end, tl.num_programs(0)):
        offs = row * N + cols  # int32 is enough: tokens x hidden of one step stays far below 2**31
        acc = _load_peer(P0, offs, mask)
        if WORLD > 1:
            acc += _load_peer(P1, offs, mask)
        if WORLD > 2:
            acc += _load_peer(P2, offs, mask)
        if WORLD > 3:
            acc += _load_peer(P3, offs, mask)
        if WORLD > 4:
            acc += _load_peer(P4, offs, mask)
        if WORLD > 5:
            acc += _load_peer(P5, offs, mask)
        if WORLD > 6:
            acc += _load_peer(P6, offs, mask)
        if WORLD > 7:
            acc += _load_peer(P7, offs, mask)
        # Round where the unfused path rounds: the all-reduce's result, then the residual sum (as HF does).
        x = acc.to(R.dtype.element_ty).to(tl.float32) + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(R.dtype.element_ty)
        tl.store(R + offs, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
        y = (xf * rstd).to(R.dtype.element_ty) * w
        tl.store(P0 + offs, y, mask=mask)
        if WORLD > 1:
            tl.store(P1 + offs, y, mask=mask)
        if WORLD > 2:
            tl.store(P2 + offs, y, mask=mask)
        if WORLD > 3:
            tl.store(P3 + offs, y, mask=mask)
        if WORLD > 4:
            tl.store(P4 + offs, y, mask=mask)
        if WORLD > 5:
            tl.store(P5 + offs, y, mask=mask)
        if WORLD > 6:
            tl.store(P6 + offs, y, mask=mask)
        if WORLD > 7:
            tl.store(P7 + offs, y, mask=mask)


def owned_rows(num_tokens: int, world: int, rank: int) -> tuple[int, int]:
    """The token rows rank `rank` reduces and normalises: a contiguous 1/world share (the last may be short)."""
    per = -(-num_tokens // world)
    return min(rank * per, num_tokens), min((rank + 1) * per, num_tokens)


def reduce_add_rms_norm_(peers: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor, eps: float,
                         rows: tuple[int, int], num_blocks: int) -> None:
    """For rows[0] <= t < rows[1]: residual[t] += sum_p peers[p][t]; every peers[p][t] = rmsnorm(residual[t]).

    peers: [T, N] views of each rank's buffer (this rank's among them), all contiguous with the same shape;
    residual: [T, N] contiguous. `num_blocks` thread blocks share the rows (the SMs taken from the GEMMs).
    """
    assert 1 <= len(peers) <= MAX_PEERS, f"{len(peers)} peers; at most {MAX_PEERS}"
    if rows[1] <= rows[0]:
        return
    n = residual.shape[-1]
    args = peers + [peers[0]] * (MAX_PEERS - len(peers))
    _reduce_add_rms_norm_kernel[(num_blocks,)](
        *args, residual, weight, rows[0], rows[1], n, eps,
        WORLD=len(peers), BLOCK=triton.next_power_of_2(n), num_warps=8 if n >= 4096 else 4,
    )
