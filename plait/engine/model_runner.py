"""One rank's half of a step: build the batch from the plan, run the model, and (on the sampler rank) sample.

Every rank of a stage runs the same forward on its shard; the last stage's LM head gathers the full logits
rows, and the rank that holds them (rank 0 of the last stage's group) samples and answers with a `StepResult`,
or each rank samples a share when sampling is spread (plait.engine.step_sampling). The answer stays on the
device until the executor resolves it, so the next step can be launched first. Ranks keep a mirror of each
live sequence's tokens so the plan carries only what is new; a PLACEHOLDER in a plan is filled on the device
from the last step's sampled tokens (plait.engine.sampled_tokens).
"""

from __future__ import annotations

import contextlib
import itertools

import torch

from plait.comm.communicator import Communicator
from plait.comm.profiler import CommProfiler
from plait.config import EngineConfig, ModelConfig
from plait.core import StepPlan
from plait.engine.cuda_graph import (DecodeGraphs, MixedGraphs, PrefillGraphs, StepInputs, graph_buckets,
                                     graph_output_bytes, graph_token_cap, mixed_buckets, prefill_graph_tokens,
                                     takes_mixed)
from plait.engine.overlap import TokenSplitOverlap, split_inputs
from plait.engine.sampled_tokens import SampledTokens
from plait.engine.sampler import to_device
from plait.engine.step_sampling import PendingResult, StepSampler
from plait.layers.attention import AttentionMetadata, attends_prompt_by_prompt, prefill_work
from plait.models.loader import iter_weights, resolve_model
from plait.models.registry import build_model
from plait.models.weights import init_dummy_weights, load_weights
from plait.parallel.context import RankContext
from plait.parallel.pipeline import PipelineStage, stage_layers
from plait.parallel.sequence import SequenceParallel
from plait.parallel.tensor import TensorParallel

_CPU_KV_BYTES = 1 << 30
_SYMM_MEM_BYTES = 4 << 20  # all-reduces up to this size use symmetric memory; NCCL is as fast above (DEVICE.md)


class ModelRunner:
    def __init__(self, cfg: EngineConfig, ctx: RankContext, model_config: ModelConfig, max_model_len: int,
                 max_num_batched_tokens: int, eos_token_ids: set[int]):
        """`model_config` is the driver's: a rank reads the checkpoint's config from it instead of from the file,
        which for a GGUF would cost seconds per rank."""
        self.cfg, self.ctx, self.comm = cfg, ctx, ctx.tp
        self.device = torch.device(cfg.resolved_device(), torch.cuda.current_device() if cfg.resolved_device() == "cuda" else None)
        src = resolve_model(cfg.model)
        self.model_cfg = model_config
        self.dtype = cfg.torch_dtype(getattr(self.model_cfg.hf_config, "dtype", None))
        if cfg.sequence_parallel_size > 1:
            self.plan = SequenceParallel(ctx.sp, ctx.tp, ctx.stage_group, cfg.shift_threshold if cfg.shift_parallel else None)
        else:
            self.plan = TensorParallel(ctx.tp, self._defers_reduce())
        self.model = self._load_model(src, max_model_len)
        self.max_model_len, self.max_num_batched_tokens = max_model_len, max_num_batched_tokens
        self.backend = cfg.resolved_attention_backend()
        self.sampled = SampledTokens(self.device)
        last_stage = ctx.stage == ctx.num_stages - 1
        self.sampler = StepSampler(cfg, ctx, self.device, eos_token_ids, self.model, self.sampled) if last_stage else None
        self.graphs: DecodeGraphs | None = None  # tensor-parallel decode (under Shift: its TP mode)
        self.sp_graphs: DecodeGraphs | None = None  # sequence-parallel-mode decode
        self.prefill_graphs: PrefillGraphs | None = None  # one new prompt alone in its step
        self.mixed_graphs: MixedGraphs | None = None  # several sequences with new tokens (prompts, chunks, decodes)
        for group in self._reducing_groups():
            # Symmetric memory is peer-to-peer inside one machine: a group that spans nodes stays on NCCL.
            if (self.device.type == "cuda" and group.size > 1 and cfg.all_reduce_backend != "nccl"
                    and not cfg.nodes.spans_nodes(group.size)):
                ok = group.enable_symm_mem(_SYMM_MEM_BYTES // self.dtype.itemsize, self.dtype, self.device)
                if not ok and cfg.all_reduce_backend == "symm_mem":
                    raise ValueError("all_reduce_backend='symm_mem' was asked for but symmetric memory is unavailable here")
            group.skip_all_reduce = cfg.skip_all_reduce
        if self.device.type == "cuda" and self.plan.defer_reduce:
            tokens = max(max_num_batched_tokens, cfg.max_num_seqs)  # prefill steps and decode graph buckets
            ok = self.comm.enable_fused_norm(tokens, self.model_cfg.hidden_size, self.dtype, self.device,
                                             forced=cfg.fused_allreduce_norm == "on")
            if not ok and cfg.fused_allreduce_norm == "on":
                raise ValueError("fused_allreduce_norm='on' was asked for but symmetric memory is unavailable here "
                                 f"(or the group of {self.comm.size} ranks is not a power of two)")
        self.overlap = (TokenSplitOverlap(self.comm, self.device, cfg.overlap_min_tokens)
                        if cfg.token_split_overlap and self.plan.defer_reduce else None)
        self.mirrors: dict[int, tuple[list[int], object, int]] = {}  # seq_id -> (tokens, params, prompt_len)
        # Profiling records every collective; a replayed graph runs no Python, so profiling runs eager.
        comms = [ctx.tp, ctx.sp, ctx.stage_group, ctx.pipe]
        self.profiler = CommProfiler(ctx.rank, self.device, comms, self.model) if cfg.profile_comm else None

    def _reducing_groups(self) -> list[Communicator]:
        """The groups whose all-reduces run every step: the TP group's (row-parallel sums, the embedding), and under
        Shift the whole stage's, over which a tensor-parallel step reduces. Both are consecutive ranks."""
        groups = [self.ctx.tp]
        if self._sp and self.plan.shift_threshold is not None:
            groups.append(self.ctx.stage_group)
        return groups

    def _defers_reduce(self) -> bool:
        """Whether row-parallel sums are left to the next norm: asked for (on), or auto on GPU; only where the next
        norm is on the same ranks (no pipeline boundary) and for the dense decoder (a track model combines instead)."""
        mode, par = self.cfg.fused_allreduce_norm, self.cfg.parallel
        wanted = mode == "on" or (mode == "auto" and (self.device.type == "cuda" or self.cfg.token_split_overlap))
        return wanted and self.comm.size > 1 and par.pipeline_parallel_size == 1 and self.model_cfg.tracks is None

    def _load_model(self, src, max_model_len: int) -> torch.nn.Module:
        """Build the rank's shard directly on its device in its dtype, then fill it slice by slice."""
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = build_model(self.model_cfg, self.plan, max_model_len, self._stage_layers())
                if self.ctx.num_stages > 1:
                    model = PipelineStage(model, self.ctx.stage, self.ctx.num_stages, self.ctx.pipe,
                                          self.ctx.prev_rank, self.ctx.next_rank)
        finally:
            torch.set_default_dtype(default)
        if self.cfg.load_format == "dummy" or src.kind == "preset":
            init_dummy_weights(model, self.cfg.seed + self.ctx.rank)
        else:
            load_weights(getattr(model, "model", model), iter_weights(src))
        return model.eval()

    def _stage_layers(self) -> range:
        par = self.cfg.parallel
        return stage_layers(self.model_cfg.num_layers, par.pipeline_parallel_size, par.pp_layer_partition)[self.ctx.stage]

    def all_reduce_latency(self) -> float:
        """Seconds per all-reduce of one token's hidden state, the message of a batch-1 decode step (over the whole
        stage under Shift, whose decode steps run tensor-parallel there)."""
        group = self._reducing_groups()[-1]
        return group.time_all_reduce(self.model_cfg.hidden_size, self.dtype, self.device)

    def kv_bytes_per_block(self) -> int:
        attn = self.model.attention_layers()[0]
        per_token = 2 * attn.num_kv_heads * attn.head_dim * self.dtype.itemsize * len(self.model.attention_layers())
        return per_token * self.cfg.block_size

    def num_kv_blocks(self) -> int:
        """How many blocks fit this rank's budget: an explicit byte count, else memory left on the GPU."""
        if self.cfg.kv_cache_memory_bytes is not None:
            budget = self.cfg.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * self.cfg.gpu_memory_utilization) - (total - free) - self._activation_bytes()
        else:
            budget = _CPU_KV_BYTES
        return max(budget // self.kv_bytes_per_block(), 0)

    def _activation_bytes(self) -> int:
        """A step's temporaries at the full token budget, and what the decode graphs will keep."""
        m = self.model_cfg
        act = m.step_activation_bytes(self.max_num_batched_tokens, self.comm.size, self.dtype.itemsize)
        if self._captures_graphs():
            act += graph_output_bytes(self.cfg.max_num_seqs, m.vocab_size, self.plan.size if self._sp else 1)
        return act

    def _captures_graphs(self) -> bool:
        return self.device.type == "cuda" and not self.cfg.enforce_eager and self.profiler is None

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One block more than the scheduler knows of: the scratch block that CUDA-graph padding rows use."""
        for attn in self.model.attention_layers():
            attn.kv_cache = torch.zeros(
                2, num_blocks + 1, self.cfg.block_size, attn.num_kv_heads, attn.head_dim, dtype=self.dtype, device=self.device
            )
        self.scratch_block = num_blocks
        if self._captures_graphs():
            self._capture_graphs(num_blocks)

    def execute(self, plan: StepPlan) -> PendingResult | None:
        """One step; when profiling, inside a profiler step tagged with the plan's shape."""
        if self.profiler is None or not plan.seqs:
            return self._execute(plan)
        with self.profiler.step():
            result = self._execute(plan)
            rows, sample_rows, _ = self._logit_rows(plan)
            self.profiler.tag([(s.start, len(s.token_ids)) for s in plan.seqs],
                              [self.mirrors[s.seq_id][2] for s in plan.seqs], len(rows), len(sample_rows))
        return result

    @torch.inference_mode()
    def _execute(self, plan: StepPlan) -> PendingResult | None:
        self._update_mirrors(plan)
        if not plan.seqs:
            return None
        rows, sample_rows, prompt_spans = self._logit_rows(plan)
        inputs = self._inputs(plan)
        self.sampled.begin(plan)
        if self._sp:
            self.plan.choose_mode(len(inputs.ids))
        graphs = self.sp_graphs if self._sp_mode else self.graphs
        if self._graph_step(plan, graphs):
            logits = graphs.run(inputs, self.sampled.fill)  # a decode step: every row is sampled
        elif self._prefill_graph_step(plan):
            logits = self.prefill_graphs.run(inputs)  # one whole new prompt: its last row is sampled
        elif self._mixed_graph_step(plan, inputs):
            logits = self.mixed_graphs.run(inputs, rows, self.sampled.fill)
        else:
            hidden = self._forward_eager(inputs)
            if hidden is None:
                return None
            # index_select with a pinned copy: hidden[rows] would copy the list pageable, and wait for the GPU
            logits = self.model.compute_logits(hidden.index_select(0, self._as_tensor(rows))) if rows else None
        if self.sampler is None:
            return None
        return self.sampler.run([s.seq_id for s in plan.seqs], logits, sample_rows, prompt_spans, self.mirrors)

    @property
    def _sp(self) -> bool:
        return isinstance(self.plan, SequenceParallel)

    @property
    def _sp_mode(self) -> bool:
        """This step runs sequence-parallel (always under pure SP; above the threshold under Shift)."""
        return self._sp and not self.plan.shifted

    def _forward_eager(self, x: StepInputs) -> torch.Tensor | None:
        """A step not replayed from a graph: in SP mode, split in two overlapped halves, or plain. -> [T, hidden]
        (T padded to a multiple of S in SP mode), or None on a pipeline stage before the last."""
        if self._sp_mode:
            return self._sequence_parallel_forward(x)
        if self.overlap is not None and self.overlap.takes(len(x.ids)):
            return self._split_forward(x)
        return self.model(*self._prepare(x))

    def _sequence_parallel_forward(self, x: StepInputs) -> torch.Tensor:
        """An eager SP-mode step (SequenceParallel.forward). Padding tokens (to a multiple of S) are one-token
        sequences in the scratch block. -> [T_padded, hidden]."""
        pad = -len(x.ids) % self.plan.size
        bs = self.cfg.block_size
        own = len(x.query_lens)
        x = StepInputs(x.ids + [0] * pad, x.positions + [0] * pad, x.slots + [self.scratch_block * bs] * pad,
                       x.seq_lens + [1] * pad, x.query_lens + [1] * pad, x.tables + [[self.scratch_block]] * pad)
        return self.plan.forward(self.model, *self._ids_positions(x), self._metadata(x, own))

    def _split_forward(self, x: StepInputs) -> torch.Tensor:
        """The step in two halves of its tokens, overlapped (plait.engine.overlap). -> [T, hidden]."""
        k = len(x.ids) // 2
        ids, positions = self._ids_positions(x)
        halves = [(ids[a:b], positions[a:b], self._metadata(part))
                  for (a, b), part in zip(((0, k), (k, len(x.ids))), split_inputs(x, k))]
        return self.overlap.forward(self.model, halves)

    def _capture_graphs(self, num_blocks: int) -> None:
        """Decode graphs per batch bucket, prefill graphs per prompt-length bucket and mixed graphs per token bucket
        (plait.engine.cuda_graph), in one memory pool. Under sequence parallelism decode graphs capture each mode
        that decode steps run in: Shift's tensor-parallel mode for batches up to shift_threshold (its prefill and
        mixed graphs stop there too), the SP mode above it (pure SP: at every batch, buckets a multiple of S);
        SP-mode prefills run eager. A pipeline stage captures its decode body only (send/recv stay eager around the
        replay); its other steps run eager."""
        max_batch, bs = self.cfg.max_num_seqs, self.cfg.block_size
        pool = torch.cuda.graph_pool_handle()
        shift = self.plan.shift_threshold if self._sp else None
        if self._sp:  # a replayed graph runs the mode it was captured in
            buckets = graph_buckets(max_batch, self.plan.size, above=shift or 0)  # none: every batch shifts
            if buckets:
                self.sp_graphs = DecodeGraphs(self.model, buckets, self.max_model_len, bs, num_blocks, self.device,
                                              sequence=self.plan)
                with self.plan.mode(shifted=False):
                    self.sp_graphs.capture(pool)
            if not shift:  # pure SP, or a threshold of 0: no step ever runs tensor-parallel
                return
            max_batch = min(max_batch, shift)
        stage = self.model if self.ctx.num_stages > 1 else None
        self.graphs = DecodeGraphs(self.model, graph_buckets(max_batch), self.max_model_len, bs, num_blocks,
                                   self.device, stage)
        cap = graph_token_cap(self.cfg.max_prefill_graph_tokens, self.max_num_batched_tokens, shift)
        prefill_tokens, mixed = prefill_graph_tokens(min(cap, self.max_model_len)), mixed_buckets(cap)
        if stage is None and prefill_tokens:
            self.prefill_graphs = PrefillGraphs(self.model, prefill_tokens, bs, num_blocks, self.device)
        if stage is None and mixed:
            self.mixed_graphs = MixedGraphs(self.model, mixed, self.cfg.max_num_seqs, self.max_model_len, bs,
                                            num_blocks, self.device)
        with self.plan.mode(shifted=True) if self._sp else contextlib.nullcontext():
            for graphs in (self.graphs, self.prefill_graphs, self.mixed_graphs):
                if graphs is not None:
                    graphs.capture(pool)

    @staticmethod
    def _graph_step(plan: StepPlan, graphs: DecodeGraphs | None) -> bool:
        return (
            graphs is not None
            and len(plan.seqs) <= graphs.buckets[-1]
            and all(len(s.token_ids) == 1 and not s.prompt_logprobs for s in plan.seqs)
        )

    def _prefill_graph_step(self, plan: StepPlan) -> bool:
        """One whole new prompt that fits a bucket, sampled at its end, with no prompt logprobs (those need every
        row's logits) and not split in halves by the token-split overlap."""
        if self.prefill_graphs is None or len(plan.seqs) != 1:
            return False
        s, n = plan.seqs[0], len(plan.seqs[0].token_ids)
        return (s.start == 0 and s.sample and not s.prompt_logprobs and n <= self.prefill_graphs.buckets[-1]
                and not (self.overlap is not None and self.overlap.takes(n)))

    def _mixed_graph_step(self, plan: StepPlan, x: StepInputs) -> bool:
        """Several sequences in tensor-parallel mode that fit a mixed bucket, with no prompt logprobs, not split in
        halves by the token-split overlap, and not new prompts that flash attends one by one (`takes_mixed`)."""
        graphs, n = self.mixed_graphs, len(x.ids)
        return (graphs is not None and not self._sp_mode and graphs.bucket_of(n, len(plan.seqs)) is not None
                and not any(s.prompt_logprobs for s in plan.seqs) and takes_mixed(x.query_lens, x.seq_lens)
                and not (self.overlap is not None and self.overlap.takes(n)))

    def _update_mirrors(self, plan: StepPlan) -> None:
        for seq_id in plan.finished_seq_ids:
            self.mirrors.pop(seq_id, None)
        if self.sampler:
            self.sampler.forget(plan.finished_seq_ids)
        for d in plan.new_seqs:
            self.mirrors[d.seq_id] = (list(d.token_ids), d.params, d.prompt_len)
        for seq_id, position, token in plan.late_tokens:
            if seq_id in self.mirrors:  # a sequence may have finished since its placeholder was sent
                self.mirrors[seq_id][0][position] = token
        for s in plan.seqs:
            tokens = self.mirrors[s.seq_id][0]
            tokens[s.start : s.start + len(s.token_ids)] = s.token_ids

    def _inputs(self, plan: StepPlan) -> StepInputs:
        bs = self.cfg.block_size
        x = StepInputs([], [], [], [], [], [s.block_table for s in plan.seqs])
        for s in plan.seqs:
            pos = range(s.start, s.start + len(s.token_ids))
            x.ids += s.token_ids
            x.positions += pos
            x.slots += [s.block_table[p // bs] * bs + p % bs for p in pos]
            x.seq_lens.append(pos.stop)
            x.query_lens.append(len(pos))
        return x

    def _as_tensor(self, values: list) -> torch.Tensor:
        # pinned and non-blocking: a pageable copy would wait for the GPU's previous step (async scheduling)
        return to_device(values, self.device, torch.long)

    def _prepare(self, x: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        return *self._ids_positions(x), self._metadata(x)

    def _ids_positions(self, x: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat token ids (last step's sampled tokens written over placeholders) and their positions."""
        return self.sampled.fill(self._as_tensor(x.ids)), self._as_tensor(x.positions)

    def _metadata(self, x: StepInputs, own: int | None = None) -> AttentionMetadata:
        """`own`: how many of x's sequences are the step's (padding sequences follow them; None: all are)."""
        width = max(len(t) for t in x.tables)
        as_tensor = self._as_tensor
        meta = AttentionMetadata(
            slot_mapping=as_tensor(x.slots),
            query_start=as_tensor([0, *itertools.accumulate(x.query_lens)]),
            seq_lens=as_tensor(x.seq_lens),
            block_tables=as_tensor([t + [0] * (width - len(t)) for t in x.tables]),
            max_query_len=max(x.query_lens),
            max_seq_len=max(x.seq_lens),
            backend=self.backend,
        )
        if self.backend == "triton" and attends_prompt_by_prompt(x.query_lens[:own], x.seq_lens[:own]):
            meta.fresh_query_start = [0, *itertools.accumulate(x.query_lens)]
        elif self.backend == "triton" and not meta.decode:
            meta.prefill_work = as_tensor(prefill_work(x.query_lens, self.device.type == "cuda"))
        if self.backend == "torch":
            meta.prepare_reference(self.cfg.block_size)
        return meta

    def _logit_rows(self, plan: StepPlan):
        """Which hidden rows need logits: each sampled sequence's last token, and prompt tokens whose
        successor's logprob was asked for. Returns (rows, {seq_id: row index in logits}, {seq_id: (first, count, start)})."""
        rows, sample_rows, prompt_spans, offset = [], {}, {}, 0
        for s in plan.seqs:
            n = len(s.token_ids)
            if s.prompt_logprobs:
                prompt_len = self.mirrors[s.seq_id][2]
                count = min(s.start + n, prompt_len - 1) - s.start  # positions whose next token is still prompt
                prompt_spans[s.seq_id] = (len(rows), count, s.start)
                rows += range(offset, offset + count)
            if s.sample:
                sample_rows[s.seq_id] = len(rows)
                rows.append(offset + n - 1)
            offset += n
        return rows, sample_rows, prompt_spans
