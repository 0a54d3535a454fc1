"""Attention over the paged KV cache (plain PyTorch reference path).

The cache of one layer on one rank is `[2, num_blocks, block_size, kv_heads, head_dim]`; a sequence's
position p lives in block `block_table[p // block_size]` at offset `p % block_size`. One code path serves
prefill, chunked prefill against a cached prefix, and decode: queries are the step's new tokens, keys are
every cached token of the sequence up to and including them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AttentionMetadata:
    """Per-step layout of the flattened batch, built once per step by the model runner and shared by all layers."""

    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    query_start: torch.Tensor  # [B + 1] offsets of each sequence's new tokens in the flat batch
    seq_lens: torch.Tensor  # [B] tokens in the cache after this step (prefix + new)
    block_tables: torch.Tensor  # [B, max_blocks] padded with 0
    max_query_len: int
    max_seq_len: int
    backend: str = "torch"  # "torch" (reference, any device) | "triton" (GPU kernels, or the Triton interpreter)
    num_splits: int = 1  # context splits of the decode kernel
    fresh_query_start: list[int] | None = None  # host offsets: whole new prompts attended one by one (flash)
    prefill_work: torch.Tensor | None = None  # the paged prefill kernel's tiles (kernels.attention.prefill_work)

    @property
    def decode(self) -> bool:
        """One new token per sequence: the GQA-aware split-KV decode kernel applies."""
        return self.max_query_len == 1
    # Derived once per step for the reference path: padded gather indices and the causal/validity mask.
    key_slots: torch.Tensor | None = None  # [B, max_seq_len]
    query_index: torch.Tensor | None = None  # [B, max_query_len] flat index of each padded query (or T for padding)
    mask: torch.Tensor | None = None  # [B, 1, max_query_len, max_seq_len] True where attention is allowed

    def prepare_reference(self, block_size: int) -> "AttentionMetadata":
        device = self.seq_lens.device
        q_lens = self.query_start[1:] - self.query_start[:-1]  # [B]
        k_pos = torch.arange(self.max_seq_len, device=device)
        blocks = self.block_tables.gather(1, (k_pos // block_size).expand(len(self.seq_lens), -1))
        self.key_slots = blocks * block_size + k_pos % block_size
        q_off = torch.arange(self.max_query_len, device=device)
        valid_q = q_off < q_lens[:, None]
        total = int(self.query_start[-1])
        self.query_index = torch.where(valid_q, self.query_start[:-1, None] + q_off, total)
        q_pos = self.seq_lens[:, None] - q_lens[:, None] + q_off  # [B, max_q] absolute position of each query
        self.mask = ((k_pos[None, None, :] <= q_pos[:, :, None]) & valid_q[:, :, None]).unsqueeze(1)
        return self


def reference_attention(q, k_cache, v_cache, meta: AttentionMetadata, kv_index: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain PyTorch: gather each sequence's keys into a padded batch and run masked SDPA.
    q: [T, heads, D]; caches: [num_blocks, block_size, kv_heads, D] -> [T, heads, D]."""
    keys = k_cache.flatten(0, 1)[meta.key_slots][:, :, kv_index]  # [B, S, heads, D]
    values = v_cache.flatten(0, 1)[meta.key_slots][:, :, kv_index]
    q_pad = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[meta.query_index]  # [B, Q, heads, D]
    out = nn.functional.scaled_dot_product_attention(
        q_pad.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=meta.mask, scale=scale
    ).transpose(1, 2)  # [B, Q, heads, D]
    flat = out.new_empty(q.shape[0] + 1, *q.shape[1:])
    flat[meta.query_index] = out
    return flat[:-1]


class PagedAttention(nn.Module):
    """Causal attention of the step's queries over each sequence's cached keys and values."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, kv_index: list[int], rope=None):
        super().__init__()
        self.rope = rope  # rotary embedding applied to q and k before the cache write (None: already applied)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        # Query head -> local KV head; uneven head splits make this an arbitrary (but monotone) map, not a repeat.
        self.register_buffer("kv_index", torch.tensor(kv_index, dtype=torch.long), persistent=False)
        counts = torch.bincount(self.kv_index, minlength=num_kv_heads)
        self.register_buffer("q_count", counts.int(), persistent=False)
        self.register_buffer("q_first", (counts.cumsum(0) - counts).int(), persistent=False)
        self.max_group = int(counts.max())
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, block_size, kv_heads, D], set by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, heads, D], k/v: [T, kv_heads, D], positions: [T] -> [T, heads * D]."""
        k_cache, v_cache = self.kv_cache[0], self.kv_cache[1]
        if q.is_cuda and self.rope is not None:
            from plait.kernels.fused import rope_store_kv

            rope_store_kv(q, k, v, k_cache, v_cache, self.rope.cos, self.rope.sin, positions, meta.slot_mapping)
        else:
            if self.rope is not None:
                q, k = self.rope(positions, q, k)
            k_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = k
            v_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = v
        if meta.backend == "torch":
            out = reference_attention(q, k_cache, v_cache, meta, self.kv_index, self.scale)
        elif meta.fresh_query_start is not None:
            out = _fresh_prompts_attention(q, k, v, meta.fresh_query_start, self.kv_index, self.scale)
        elif meta.decode:
            from plait.kernels.attention import paged_decode

            out = paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.q_first, self.q_count,
                               self.max_group, self.scale, meta.num_splits)
        else:
            from plait.kernels.attention import paged_prefill

            out = paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.query_start, meta.seq_lens,
                                self.kv_index, meta.prefill_work, self.scale)
        return out.flatten(1)


WORK_SEQS = 1 << 16  # a paged-prefill work item is tile * WORK_SEQS + sequence; padding items are -1


def prefill_block_m(cuda: bool) -> int:
    """Queries per tile of the paged prefill kernel (smaller under the CPU interpreter, slow on big tiles)."""
    return 64 if cuda else 16


def prefill_work(query_lens: list[int], cuda: bool) -> list[int]:
    """The paged prefill kernel's work list (plait.kernels.attention): one item per tile of each sequence's new
    queries. Built on the host, so the launch is sized by the step's tiles."""
    block_m = prefill_block_m(cuda)
    return [tile * WORK_SEQS + b for b, n in enumerate(query_lens) for tile in range(-(-n // block_m))]


ONE_LAUNCH_MAX_PROMPT = 512  # several whole new prompts of at most this many tokens attend in one launch


def attends_prompt_by_prompt(query_lens: list[int], seq_lens: list[int]) -> bool:
    """Whether a step's attention runs flash prompt by prompt: its sequences are whole new prompts (no cached
    prefix), one prompt or some longer than ONE_LAUNCH_MAX_PROMPT. Anything else runs the paged prefill kernel in
    one launch (several short new prompts: it reads the keys the step has just cached). Flash is the faster
    kernel, but each call costs ~85 us of Python (slices, transposes, launch): for several prompts of up to 512 tokens the one
    launch wins (Llama-3.1-8B heads on an H200: 32 prompts of 128, 2.85 -> 0.11 ms a layer; 8 of 512, 0.41 ->
    0.24 ms), while on longer prompts the paged kernel falls behind flash (2 of 2048: 0.34 -> 0.71 ms;
    benchmarks/results/fresh_attention_h200x1.json)."""
    return query_lens == seq_lens and (len(query_lens) == 1 or max(query_lens) > ONE_LAUNCH_MAX_PROMPT)


def _fresh_prompts_attention(q, k, v, starts: list[int], kv_index: torch.Tensor, scale: float) -> torch.Tensor:
    """Whole new prompts need no cache reads: PyTorch's flash attention, causal, one sequence at a time.
    q: [T, heads, D], k/v: [T, kv_heads, D] (rotated) -> [T, heads, D]."""
    k, v = k[:, kv_index], v[:, kv_index]  # [T, heads, D]: each query head's KV head (any uneven split)
    out = torch.empty_like(q)
    for a, b in zip(starts, starts[1:]):
        # [1, heads, n, D]: the 4-D layout that PyTorch's flash kernel takes (3-D falls back to the math path)
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out[a:b] = nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)[0].transpose(0, 1)
    return out
