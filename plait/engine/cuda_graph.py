"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step launches hundreds of small kernels; replaying them from a graph removes the CPU launch cost,
which at batch 1 is larger than the GPU work. Every input lives in a static buffer the graph reads; a step
of B sequences runs the smallest bucket >= B, its padding rows pointing at a scratch KV block that no
sequence owns, so they write and read nothing that matters. Collectives are captured inside the graphs, so
every rank must capture the same buckets in the same order (they do: the buckets depend only on config).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.layers.attention import AttentionMetadata


@dataclass
class StepInputs:
    """A step's flattened batch as host lists, built once and fed to the eager path or a graph."""

    ids: list[int]
    positions: list[int]
    slots: list[int]  # cache slot of each new token
    seq_lens: list[int]  # per sequence: tokens in the cache after this step
    query_lens: list[int]  # per sequence: new tokens this step
    tables: list[list[int]]  # per sequence: its block table


def graph_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 16, 16))
    return sorted({min(s, max_batch) for s in sizes})


def decode_splits(batch: int, kv_heads: int, max_model_len: int, sms: int) -> int:
    """Context splits per (sequence, KV head) so that about two programs run per SM, at most one per 256 tokens."""
    want = -(-2 * sms // max(1, batch * kv_heads))
    return max(1, min(want, 16, -(-max_model_len // 256)))


class DecodeGraphs:
    def __init__(self, model, max_batch: int, max_model_len: int, block_size: int, scratch_block: int, device):
        self.model, self.block_size, self.scratch = model, block_size, scratch_block
        self.max_blocks = -(-max_model_len // block_size)
        self.buckets = graph_buckets(max_batch)
        n = self.buckets[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.zeros(n, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.long, device=device)
        self.tables = torch.full((n, self.max_blocks), scratch_block, dtype=torch.long, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        attn = model.attention_layers()[0]
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.splits = {b: decode_splits(b, attn.num_kv_heads, max_model_len, sms) for b in self.buckets}

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:b], query_start=self.query_start[: b + 1], seq_lens=self.seq_lens[:b],
            block_tables=self.tables[:b], max_query_len=1, max_seq_len=self.max_blocks * self.block_size,
            backend="triton", num_splits=self.splits[b],
        )

    def _forward(self, b: int) -> torch.Tensor:
        hidden = self.model(self.ids[:b], self.positions[:b], self._meta(b))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        self._reset_padding(0)
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            self._forward(b)  # warm-up: Triton compiles, NCCL sets up, outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _reset_padding(self, start: int) -> None:
        self.ids[start:] = 0
        self.positions[start:] = 0
        self.slots[start:] = self.scratch * self.block_size
        self.seq_lens[start:] = 1
        self.tables[start:] = self.scratch

    def run(self, x: StepInputs) -> torch.Tensor:
        """B decode rows -> logits [B, vocab]."""
        n = len(x.ids)
        b = self.bucket_for(n)
        width = max(len(t) for t in x.tables)
        host = torch.tensor([x.ids, x.positions, x.slots, x.seq_lens], dtype=torch.long).pin_memory()
        padded = torch.tensor([t + [self.scratch] * (width - len(t)) for t in x.tables], dtype=torch.long)
        self.ids[:n].copy_(host[0], non_blocking=True)
        self.positions[:n].copy_(host[1], non_blocking=True)
        self.slots[:n].copy_(host[2], non_blocking=True)
        self.seq_lens[:n].copy_(host[3], non_blocking=True)
        self.tables[:n, :width].copy_(padded.pin_memory(), non_blocking=True)
        self._reset_padding(n)
        self.graphs[b].replay()
        return self.logits[b][:n]
