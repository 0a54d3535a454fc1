"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step launches hundreds of small kernels; replaying them from a graph removes the CPU launch cost,
which at batch 1 is larger than the GPU work. Every input lives in a static buffer the graph reads; a step
of B sequences runs the smallest bucket >= B, its padding rows pointing at a scratch KV block that no
sequence owns, so they write and read nothing that matters. Collectives are captured inside the graphs, so
every rank must capture the same buckets in the same order (they do: the buckets depend only on config).
"""

from __future__ import annotations

from collections.abc import Callable
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
    """Context splits per (sequence, KV head), a power of two: about two programs per SM, at most one per 128 tokens."""
    want = min(-(-2 * sms // max(1, batch * kv_heads)), 16, -(-max_model_len // 128))
    splits = 1
    while splits * 2 <= want:
        splits *= 2
    return splits


class DecodeGraphs:
    def __init__(self, model, max_batch: int, max_model_len: int, block_size: int, scratch_block: int, device):
        self.model, self.block_size, self.scratch = model, block_size, scratch_block
        self.max_blocks = -(-max_model_len // block_size)
        self.buckets = graph_buckets(max_batch)
        n = self.n = self.buckets[-1]
        # Every input in one flat buffer: [ids | positions | slots | seq_lens | block tables], so a step is one copy
        # from one pinned host buffer. Padding rows are filled on the host too: no device work before the replay.
        self.buf = torch.zeros(n * (4 + self.max_blocks), dtype=torch.long, device=device)
        self.host = torch.zeros_like(self.buf, device="cpu").pin_memory()
        self.host_np = self.host.numpy()
        self.host_tables = self.host[4 * n :].view(n, self.max_blocks)
        self.copied = torch.cuda.Event()
        self.ids, self.positions, self.slots, self.seq_lens = self.buf[: 4 * n].view(4, n)
        self.tables = self.buf[4 * n :].view(n, self.max_blocks)
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
        self._fill(StepInputs([], [], [], [], [], []))
        self.buf.copy_(self.host)
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            self._forward(b)  # warm-up: Triton compiles and tunes, NCCL sets up, outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _fill(self, x: StepInputs) -> None:
        """Write the step (and padding rows that point at the scratch block) into the pinned host buffer."""
        n, k, h = len(x.ids), self.n, self.host_np
        for row, values, pad in ((0, x.ids, 0), (1, x.positions, 0), (2, x.slots, self.scratch * self.block_size),
                                 (3, x.seq_lens, 1)):
            h[row * k : row * k + n] = values
            h[row * k + n : (row + 1) * k] = pad
        tables = h[4 * k :].reshape(k, self.max_blocks)
        for i, t in enumerate(x.tables):
            tables[i, : len(t)] = t
        tables[n:, 0] = self.scratch

    def run(self, x: StepInputs, fill: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """B decode rows -> logits [B, vocab]. `fill(ids)` overwrites placeholder ids on the device (in place)
        after the copy and before the replay: the tokens sampled last step, which the host does not know yet."""
        self.copied.synchronize()  # the previous step's copy has left the host buffer
        self._fill(x)
        width = max(len(t) for t in x.tables)  # only the used columns of the tables travel
        k = self.n
        self.buf[: 4 * k].copy_(self.host[: 4 * k], non_blocking=True)
        self.tables[:, :width].copy_(self.host_tables[:, :width], non_blocking=True)
        self.copied.record()
        if fill is not None:
            fill(self.ids[: len(x.ids)])
        b = self.bucket_for(len(x.ids))
        self.graphs[b].replay()
        return self.logits[b][: len(x.ids)]
