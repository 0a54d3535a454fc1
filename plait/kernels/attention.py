"""Triton kernels for attention over the paged KV cache.

Cache layout per layer: k, v each `[num_blocks, block_size, kv_heads, head_dim]`; token p of a sequence lives
in block `block_table[p // block_size]`, row `p % block_size`. Both kernels gather keys through the block table,
so any mix of prefix-cached, chunked and fresh prompts runs through one path.

- `paged_decode`: one query token per sequence. A program owns (sequence, KV head, split of the context) and
  handles every query head that reads that KV head as one tile, so each KV byte is read once (GQA-aware), and
  long contexts are split over programs (flash-decoding) then merged by their log-sum-exp.
- `paged_prefill`: any number of query tokens per sequence, causal against the cached prefix and themselves. A
  program owns (tile of a sequence's queries, query head); the tiles come as a work list built on the host
  (`prefill_work`), so the launch is sized by the step's tiles, not by its longest sequence times its count, and
  a CUDA graph can hold a fixed-size list whose padding items do nothing (plait.engine.cuda_graph.MixedGraphs).

Both are checked against the PyTorch reference in `plait.layers.attention` (CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from plait.layers.attention import WORK_SEQS, prefill_block_m


@triton.jit
def _attend_block(q, K, V, table, n, nmask, valid, d, dmask, kvh, m_i, l_i, acc, scale,
                  stride_kb, stride_ks, stride_kh, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr):
    """One step of online softmax over key positions `n`, gathered through the block `table`.
    q: [rows, DP]; valid: [rows, BLOCK_N] which scores count. Returns the updated (max, sum, accumulator)."""
    blk = tl.load(table + n // BLOCK_SIZE, mask=nmask, other=0)
    off = blk.to(tl.int64) * stride_kb + (n % BLOCK_SIZE) * stride_ks + kvh * stride_kh
    k = tl.load(K + off[:, None] + d[None, :], mask=nmask[:, None] & dmask, other=0.0)  # [BLOCK_N, DP]
    v = tl.load(V + off[:, None] + d[None, :], mask=nmask[:, None] & dmask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [rows, BLOCK_N]
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    Q, K, V, BT, SEQ_LENS, Q_FIRST, Q_COUNT, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    scale,
    BLOCK_SIZE: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)
    q_first, q_count = tl.load(Q_FIRST + kvh), tl.load(Q_COUNT + kvh)
    g, d = tl.arange(0, G), tl.arange(0, DP)  # head dim padded to a power of two >= 16 (tl.dot's minimum)
    dmask = d[None, :] < D
    heads = q_first + g
    gmask = g < q_count
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None] & dmask, other=0.0)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    m_i = tl.full([G], float("-inf"), tl.float32)
    l_i = tl.zeros([G], tl.float32)
    acc = tl.zeros([G, DP], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        m_i, l_i, acc = _attend_block(q, K, V, BT + b * stride_bt, n, nmask, nmask[None, :], d, dmask, kvh, m_i, l_i,
                                      acc, scale, stride_kb, stride_ks, stride_kh, BLOCK_SIZE, PRECISION)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    o_ptr = O_PART + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o_ptr, out, mask=gmask[:, None] & dmask)
    tl.store(LSE_PART + b * stride_lb + heads * stride_lh + split, lse, mask=gmask)


# On the GPU the decode kernel's tile is tuned once per shape (outside graph capture: the first, warm-up call).
# The interpreter has no device to time, so it runs one fixed tile.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st) for n, w, st in ((32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 8, 2))
]
_decode = _decode_kernel if _INTERPRET else triton.autotune(_DECODE_CONFIGS, key=["G", "D", "BLOCK_SIZE", "NUM_SPLITS"])(_decode_kernel)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    q_first: torch.Tensor,
    q_count: torch.Tensor,
    max_group: int,
    scale: float,
    num_splits: int,
) -> torch.Tensor:
    """q: [B, heads, D] (one token per sequence) -> [B, heads, D]. Shapes are static for a given B, so it captures
    in a CUDA graph. `q_first[j]`/`q_count[j]`: the local query heads that read local KV head j."""
    B, H, D = q.shape
    _, block_size, num_kv, _ = k_cache.shape
    out = torch.empty_like(q)
    # One split needs no merge: the kernel writes the output itself (its store casts to the output's dtype).
    o_part = out.unsqueeze(2) if num_splits == 1 else torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    _decode[(B, num_kv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, q_first, q_count, o_part, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        scale,
        BLOCK_SIZE=block_size, D=D, DP=_padded(D), G=max(16, triton.next_power_of_2(max_group)), NUM_SPLITS=num_splits,
        PRECISION=_precision(q), **({"BLOCK_N": 32} if _INTERPRET else {}),
    )
    if num_splits > 1:
        _merge_splits_kernel[(B, H)](o_part, lse, out, o_part.stride(0), o_part.stride(1), o_part.stride(2),
                                     lse.stride(0), lse.stride(1), out.stride(0), out.stride(1), D=D, DP=_padded(D),
                                     NUM_SPLITS=num_splits)
    return out


@triton.jit
def _merge_splits_kernel(O_PART, LSE, OUT, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_b, stride_h,
                         D: tl.constexpr, DP: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Combine the splits of one (sequence, head) by their log-sum-exp; empty splits (lse = -inf) weigh 0."""
    b, h = tl.program_id(0), tl.program_id(1)
    sp, d = tl.arange(0, NUM_SPLITS), tl.arange(0, DP)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + sp)
    w = tl.exp(lse - tl.max(lse, 0))
    o = tl.load(O_PART + b * stride_ob + h * stride_oh + sp[:, None] * stride_os + d[None, :], mask=d[None, :] < D, other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(OUT + b * stride_b + h * stride_h + d, out.to(OUT.dtype.element_ty), mask=d < D)


def _padded(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(q: torch.Tensor) -> str:
    """fp32 runs must stay fp32 (parity tests); Triton's default would use TF32 on the GPU."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


@triton.jit
def _prefill_kernel(
    Q, K, V, O, BT, QUERY_START, SEQ_LENS, KV_INDEX, WORK,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
    scale,
    BLOCK_SIZE: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, WORK_SEQS: tl.constexpr,
):
    item, h = tl.load(WORK + tl.program_id(0)), tl.program_id(1)
    if item < 0:
        return
    tile, b = item // WORK_SEQS, item % WORK_SEQS
    q_start = tl.load(QUERY_START + b)
    q_len = tl.load(QUERY_START + b + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(SEQ_LENS + b)
    prefix = seq_len - q_len
    kvh = tl.load(KV_INDEX + h)
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DP)
    dmask = d[None, :] < D
    mmask = m < q_len
    q = tl.load(Q + (q_start + m)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=mmask[:, None] & dmask, other=0.0)
    q_pos = prefix + m
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    end = tl.minimum(seq_len, prefix + (tile + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        causal = nmask[None, :] & (n[None, :] <= q_pos[:, None])
        m_i, l_i, acc = _attend_block(q, K, V, BT + b * stride_bt, n, nmask, causal, d, dmask, kvh, m_i, l_i,
                                      acc, scale, stride_kb, stride_ks, stride_kh, BLOCK_SIZE, PRECISION)
    out = acc / l_i[:, None]
    tl.store(O + (q_start + m)[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(O.dtype.element_ty), mask=mmask[:, None] & dmask)


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_index: torch.Tensor,
    work: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [T, heads, D] flattened over sequences -> [T, heads, D]; causal over each sequence's cache. `work`: the
    tiles to compute (`prefill_work`, on q's device); rows no item covers (a graph's padding) are left unwritten."""
    T, H, D = q.shape
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    _prefill_kernel[(work.numel(), H)](
        q, k_cache, v_cache, out, block_tables, query_start, seq_lens, kv_index, work,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        scale,
        BLOCK_SIZE=block_size, D=D, DP=_padded(D), BLOCK_M=prefill_block_m(q.is_cuda), BLOCK_N=64 if q.is_cuda else 16,
        PRECISION=_precision(q), WORK_SEQS=WORK_SEQS,
        **({"num_warps": 8, "num_stages": 3} if q.is_cuda else {}),
    )
    return out
