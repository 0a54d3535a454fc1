"""Steps replayed from CUDA graphs: decode steps per batch-size bucket, short fresh prompts per length bucket.

A decode step, or the prefill of a short prompt, launches hundreds of small kernels; replaying them from a graph
removes the CPU launch cost, which there is larger than the GPU work (Llama-3.1-8B on an H200: a 128-token
prefill is ~4 ms of kernels and ~14 ms launched eagerly). Every input lives in a static buffer the graph reads;
a step runs the smallest bucket that holds it, its padding pointing at a scratch KV block that no sequence owns,
so it writes and reads nothing that matters. Collectives are captured inside the graphs, so every rank must
capture the same buckets in the same order (they do: the buckets depend only on config).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from plait.layers.attention import AttentionMetadata, attends_prompt_by_prompt, prefill_block_m, prefill_work
from plait.parallel.pipeline import PipelineStage
from plait.parallel.sequence import SequenceParallel


@dataclass
class StepInputs:
    """A step's flattened batch as host lists, built once and fed to the eager path or a graph."""

    ids: list[int]
    positions: list[int]
    slots: list[int]  # cache slot of each new token
    seq_lens: list[int]  # per sequence: tokens in the cache after this step
    query_lens: list[int]  # per sequence: new tokens this step
    tables: list[list[int]]  # per sequence: its block table


def graph_buckets(max_batch: int, multiple: int = 1, above: int = 0) -> list[int]:
    """Batch sizes that hold every batch in (above, max_batch], each a multiple of `multiple` (sequence parallelism
    splits a step's rows evenly over its ranks); none when no batch is in that range."""
    if above >= max_batch:
        return []
    sizes = {min(s, max_batch) for s in [1, 2, 4, 8, *range(16, max_batch + 16, 16)]}
    rounded = {-(-s // multiple) * multiple for s in sizes}
    return sorted(b for b in rounded if b > above)


def graph_output_bytes(max_batch: int, vocab_size: int, multiple: int = 1) -> int:
    """Memory the graphs keep after capture: every decode bucket's own fp32 logits (1.1 GB for 256 sequences and a
    128k vocabulary; under Shift the TP-mode and SP-mode buckets share the range, so this bounds both sets), and the
    mixed graphs' one buffer of as many rows."""
    return (sum(graph_buckets(max_batch, multiple)) + max_batch) * vocab_size * 4


def decode_splits(batch: int, kv_heads: int, max_model_len: int, sms: int) -> int:
    """Context splits per (sequence, KV head), a power of two: about two programs per SM, at most one per 128 tokens."""
    want = min(-(-2 * sms // max(1, batch * kv_heads)), 16, -(-max_model_len // 128))
    splits = 1
    while splits * 2 <= want:
        splits *= 2
    return splits


class _GraphSet:
    """One graph per bucket, all reading one flat device buffer that a step fills with one copy from a pinned host
    buffer. Subclasses say what a bucket runs (`_forward`) and how a step fills the host buffer (`_fill`)."""

    def __init__(self, model, buckets: list[int], width: int, device, block_size: int, scratch_block: int):
        """width: the flat buffer's length, in rows of the largest bucket `n` (and what else a subclass keeps)."""
        self.model, self.buckets, self.n = model, buckets, buckets[-1]
        self.block_size, self.scratch = block_size, scratch_block
        self.buf = torch.zeros(width, dtype=torch.long, device=device)
        self.host = torch.zeros_like(self.buf, device="cpu").pin_memory()
        self.host_np = self.host.numpy()
        self.copied = torch.cuda.Event()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, object] = {}  # each bucket's static outputs: logits, or a pipeline stage's (x, residual)

    def _forward(self, b: int) -> torch.Tensor:
        raise NotImplementedError

    def _fill(self, x: StepInputs) -> None:
        raise NotImplementedError

    def _fill_rows(self, x: StepInputs) -> None:
        """The first rows of the host buffer, `n` wide each: ids, positions and cache slots (the step's, then padding
        that writes its keys and values to the scratch block: nothing that matters)."""
        n, k, h = self.n, len(x.ids), self.host_np
        for row, values, pad in ((0, x.ids, 0), (1, x.positions, 0), (2, x.slots, self.scratch * self.block_size)):
            h[row * n : row * n + k] = values
            h[row * n + k : (row + 1) * n] = pad

    @torch.inference_mode()
    def capture(self, pool) -> None:
        """Largest bucket first, so the smaller graphs reuse its memory in the shared pool."""
        self._fill(StepInputs([], [], [], [], [], []))
        self.buf.copy_(self.host)
        for b in reversed(self.buckets):
            self._forward(b)  # warm-up: Triton compiles and tunes, NCCL sets up, outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _load(self, x: StepInputs) -> None:
        """Fill the host buffer once the previous step's copy has left it, and queue this step's copy."""
        self.copied.synchronize()
        self._fill(x)
        self._copy()
        self.copied.record()

    def _copy(self) -> None:
        self.buf.copy_(self.host, non_blocking=True)


class DecodeGraphs(_GraphSet):
    """Decode steps per batch bucket. On a pipeline stage (`stage`) a graph holds only the stage's body: the stage
    before's activations are received eagerly into a static input, and the outputs are sent on eagerly after the
    replay (`PipelineStage.body`). In sequence-parallel mode (`sequence`) a graph holds the SP forward: each rank
    runs its share of the bucket's rows, the head exchanges and the final gather captured with it."""

    def __init__(self, model, buckets: list[int], max_model_len: int, block_size: int, scratch_block: int, device,
                 stage: PipelineStage | None = None, sequence: SequenceParallel | None = None):
        self.stage, self.sequence = stage, sequence
        self.max_blocks = -(-max_model_len // block_size)
        n = buckets[-1]
        # [ids | positions | slots | seq_lens | block tables]; padding rows are filled on the host too: no device
        # work before the replay.
        super().__init__(model, buckets, n * (4 + self.max_blocks), device, block_size, scratch_block)
        self.host_tables = self.host[4 * n :].view(n, self.max_blocks)
        self.ids, self.positions, self.slots, self.seq_lens = self.buf[: 4 * n].view(4, n)
        self.tables = self.buf[4 * n :].view(n, self.max_blocks)
        self.query_start = torch.arange(n + 1, dtype=torch.long, device=device)
        attn = model.attention_layers()[0]
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.splits = {b: decode_splits(b, attn.num_kv_heads, max_model_len, sms) for b in self.buckets}
        self.width = 1
        self.carried = None  # a later stage's static input: the stage before's (x, residual) rows
        if stage is not None and not stage.first:
            dtype = next(stage.parameters()).dtype
            self.carried = torch.zeros(2, n, stage.cfg.hidden_size, dtype=dtype, device=device)

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:b], query_start=self.query_start[: b + 1], seq_lens=self.seq_lens[:b],
            block_tables=self.tables[:b], max_query_len=1, max_seq_len=self.max_blocks * self.block_size,
            backend="triton", num_splits=self.splits[b],
        )

    def _forward(self, b: int):
        if self.sequence is not None:
            hidden = self.sequence.forward(self.model, self.ids[:b], self.positions[:b], self._meta(b))
            return self.model.compute_logits(hidden)
        if self.stage is None:
            return self.model.compute_logits(self.model(self.ids[:b], self.positions[:b], self._meta(b)))
        carried = None if self.carried is None else (self.carried[0, :b], self.carried[1, :b])
        out = self.stage.body(self.ids[:b], carried, self.positions[:b], self._meta(b))
        return self.stage.compute_logits(out) if self.stage.last else out

    def _fill(self, x: StepInputs) -> None:
        """Write the step (and padding rows that point at the scratch block) into the pinned host buffer."""
        n, k, h = len(x.ids), self.n, self.host_np
        self._fill_rows(x)
        h[3 * k : 3 * k + n] = x.seq_lens
        h[3 * k + n : 4 * k] = 1  # a padding row is a one-token sequence in the scratch block
        tables = h[4 * k :].reshape(k, self.max_blocks)
        for i, t in enumerate(x.tables):
            tables[i, : len(t)] = t
        tables[n:, 0] = self.scratch
        self.width = max((len(t) for t in x.tables), default=1)

    def _copy(self) -> None:
        k = self.n  # only the used columns of the tables travel
        self.buf[: 4 * k].copy_(self.host[: 4 * k], non_blocking=True)
        self.tables[:, : self.width].copy_(self.host_tables[:, : self.width], non_blocking=True)

    def run(self, x: StepInputs, fill: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor | None:
        """B decode rows -> logits [B, vocab] (None on a pipeline stage before the last). `fill(ids)` overwrites
        placeholder ids on the device (in place) after the copy and before the replay: the tokens sampled last
        step, which the host does not know yet."""
        n = len(x.ids)
        self._load(x)
        if fill is not None:
            fill(self.ids[:n])
        if self.carried is not None:  # copied in on the compute stream: after the last replay has read them
            for buf, t in zip(self.carried, self.stage.receive(n, self.ids.device)):
                buf[:n].copy_(t)
        b = self.bucket_for(n)
        self.graphs[b].replay()
        if self.stage is not None and not self.stage.last:  # copies: the next replay overwrites the outputs
            self.stage.send_on(*(t[:n].clone() for t in self.outputs[b]))
            return None
        return self.outputs[b][:n]


def prefill_buckets(max_tokens: int) -> list[int]:
    return [b for b in (16, 32, 64, 128, 256, 512, 1024) if b <= max_tokens]


def graph_token_cap(max_prefill_graph_tokens: int, max_num_batched_tokens: int, shift_threshold: int | None) -> int:
    """The most tokens a step with prompt tokens replays from a graph (prefill and mixed graphs): the setting, no
    more than a step holds, and under Shift its tensor-parallel mode's steps only (at threshold 0, none)."""
    cap = min(max_prefill_graph_tokens, max_num_batched_tokens)
    return cap if shift_threshold is None else min(cap, shift_threshold)


def prefill_graph_tokens(max_tokens: int) -> int:
    """The longest prompt the prefill graphs hold: the largest bucket within `max_tokens` (0: none are captured)."""
    return max(prefill_buckets(max_tokens), default=0)


class PrefillGraphs(_GraphSet):
    """The prefill of one whole new prompt of up to `max_tokens` tokens, padded at its end to a length bucket.

    Attention is causal, so the padding tokens (after the prompt) change none of the prompt's rows; their keys
    and values go to the scratch block. Logits come for the prompt's last row only, picked on the device."""

    def __init__(self, model, max_tokens: int, block_size: int, scratch_block: int, device):
        buckets = prefill_buckets(max_tokens)
        n = buckets[-1]
        super().__init__(model, buckets, 3 * n + 1, device, block_size, scratch_block)  # [ids | positions | slots | last row]
        self.ids, self.positions, self.slots = self.buf[: 3 * n].view(3, n)
        self.last = self.buf[3 * n :]
        self.zero = torch.zeros(1, dtype=torch.long, device=device)

    def _forward(self, t: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:t], query_start=self.zero, seq_lens=self.zero, block_tables=self.zero[None],
            max_query_len=t, max_seq_len=t, backend="triton", fresh_query_start=[0, t],
        )
        hidden = self.model(self.ids[:t], self.positions[:t], meta)
        return self.model.compute_logits(hidden.index_select(0, self.last))

    def _fill(self, x: StepInputs) -> None:
        self._fill_rows(x)
        self.host_np[3 * self.n] = max(len(x.ids) - 1, 0)

    def run(self, x: StepInputs) -> torch.Tensor:
        """One fresh prompt of T tokens -> the logits of its last token [1, vocab]."""
        self._load(x)
        b = self.bucket_for(len(x.ids))
        self.graphs[b].replay()
        return self.outputs[b]


def mixed_buckets(max_tokens: int) -> list[int]:
    return [b for b in (32, 64, 128, 256, 512, 1024, 2048) if b <= max_tokens]


def takes_mixed(query_lens: list[int], seq_lens: list[int]) -> bool:
    """Whether a step of several sequences suits a mixed graph, whose attention is the paged prefill kernel: any
    step but one of new prompts that flash attends prompt by prompt because one is long (the paged kernel falls
    behind flash there: plait.layers.attention.attends_prompt_by_prompt)."""
    return len(query_lens) > 1 and not attends_prompt_by_prompt(query_lens, seq_lens)


class MixedGraphs(_GraphSet):
    """Steps of several sequences with new tokens (new prompts, chunks of them, decodes mixed in) per token bucket.

    Attention is the paged prefill kernel over a work list of fixed length whose padding items do nothing. A bucket
    of T tokens holds up to min(T, max_seqs) sequences: padding tokens (after the step's) write their keys and
    values to the scratch block and no work item reads them; padding sequences own no tokens. Logits come for the
    rows the sampler needs (each sampling sequence's last token), copied into one buffer that every bucket shares,
    so no bucket keeps logits of its own."""

    def __init__(self, model, buckets: list[int], max_seqs: int, max_model_len: int, block_size: int,
                 scratch_block: int, device):
        self.max_seqs, self.max_blocks = max_seqs, -(-max_model_len // block_size)
        self.block_m = prefill_block_m(True)
        n = buckets[-1]
        s, w = self.seqs_for(n), self.work_for(n)
        sizes = {"ids": n, "positions": n, "slots": n, "query_start": s + 1, "seq_lens": s, "rows": s, "work": w,
                 "tables": s * self.max_blocks}  # ids, positions, slots first: _fill_rows writes them
        super().__init__(model, buckets, sum(sizes.values()), device, block_size, scratch_block)
        starts = dict(zip(sizes, itertools.accumulate([0, *sizes.values()])))
        self.dev = {k: self.buf[starts[k] : starts[k] + v] for k, v in sizes.items()}
        self.hosted = {k: self.host_np[starts[k] : starts[k] + v] for k, v in sizes.items()}
        self.tables_at, self.width, self.rows = starts["tables"], 1, []
        self.logits: torch.Tensor | None = None

    def seqs_for(self, tokens: int) -> int:
        return min(tokens, self.max_seqs)

    def work_for(self, tokens: int) -> int:
        """Work items a bucket holds: each sequence's tiles are at most its tokens / BLOCK_M, plus one."""
        return tokens // self.block_m + self.seqs_for(tokens)

    def bucket_of(self, num_tokens: int, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_tokens and self.seqs_for(b) >= num_seqs), None)

    def _tables(self, array):
        return array.view(-1, self.max_blocks) if isinstance(array, torch.Tensor) else array.reshape(-1, self.max_blocks)

    def _forward(self, b: int) -> torch.Tensor:
        s, d = self.seqs_for(b), self.dev
        meta = AttentionMetadata(
            slot_mapping=d["slots"][:b], query_start=d["query_start"][: s + 1], seq_lens=d["seq_lens"][:s],
            block_tables=self._tables(d["tables"])[:s], max_query_len=b, max_seq_len=self.max_blocks * self.block_size,
            backend="triton", prefill_work=d["work"][: self.work_for(b)],
        )
        hidden = self.model(d["ids"][:b], d["positions"][:b], meta)
        logits = self.model.compute_logits(hidden.index_select(0, d["rows"][:s]))
        if self.logits is None:  # the first warm-up (largest bucket, not captured): the buffer every bucket fills
            self.logits = torch.empty_like(logits)
        self.logits[:s].copy_(logits)
        return self.logits[:s]

    def _fill(self, x: StepInputs) -> None:
        h, k = self.hosted, len(x.query_lens)
        self._fill_rows(x)
        h["query_start"][: k + 1] = [0, *itertools.accumulate(x.query_lens)]
        h["query_start"][k + 1 :] = len(x.ids)  # padding sequences: no tokens
        h["seq_lens"][:k] = x.seq_lens
        h["seq_lens"][k:] = 0
        h["rows"][: len(self.rows)] = self.rows
        h["rows"][len(self.rows) :] = 0
        work = prefill_work(x.query_lens, True)
        h["work"][: len(work)] = work
        h["work"][len(work) :] = -1
        tables = self._tables(h["tables"])
        for i, t in enumerate(x.tables):
            tables[i, : len(t)] = t
        tables[k:, 0] = self.scratch
        self.width = max((len(t) for t in x.tables), default=1)

    def _copy(self) -> None:  # only the used columns of the tables travel
        a = self.tables_at
        self.buf[:a].copy_(self.host[:a], non_blocking=True)
        dev, host = self._tables(self.dev["tables"]), self._tables(self.host[a:])
        dev[:, : self.width].copy_(host[:, : self.width], non_blocking=True)

    def run(self, x: StepInputs, rows: list[int], fill: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """A step's flattened tokens -> the logits of hidden rows `rows` [len(rows), vocab]. `fill(ids)` writes last
        step's sampled tokens over placeholders on the device, as for a decode graph."""
        self.rows = rows
        self._load(x)
        fill(self.dev["ids"][: len(x.ids)])
        b = self.bucket_of(len(x.ids), len(x.query_lens))
        self.graphs[b].replay()
        return self.outputs[b][: len(rows)]
