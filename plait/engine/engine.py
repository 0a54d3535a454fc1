"""The driver: owns the schedulers, the KV-cache bookkeeping, the tokenizer and the handle on the ranks.

`step()` is the whole loop body: plan, wait for the oldest plan's tokens, advance, hand the tokens to the output
processor and return the outputs it has ready. With a pipeline of P stages there are P schedulers over disjoint
sets of requests sharing one block pool, each with one plan in flight, so every stage works on a different
micro-batch. With asynchronous scheduling the one scheduler keeps two plans in flight: step N+1 is planned and
sent before step N's tokens are known, so the host's work hides under the GPU's (docs/step_loop.md). A sequence
that step N finished may have had a token computed in step N+1: it is thrown away.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
from collections import deque
from dataclasses import dataclass

from plait.config import EngineConfig, resolve_scheduler_config
from plait.core import Sequence, StepPlan, StepResult
from plait.engine.heap import freeze_startup_heap
from plait.engine.kv_cache import BlockManager
from plait.engine.output import NewRequest, PromptDelta, StepOutputs, TokenDelta
from plait.engine.output_proc import make_outputs
from plait.engine.scheduler import Scheduler
from plait.engine.stops import token_stop
from plait.executor.executor import make_executor
from plait.models.loader import load_hf_config, load_tokenizer, resolve_model
from plait.models.registry import model_config_from_hf
from plait.outputs import RequestOutput
from plait.parallel.pipeline import check_pipeline
from plait.parallel.sequence import check_sequence_parallel
from plait.parallel.tensor import check_tensor_parallel
from plait.parallel.track import check_track_parallel
from plait.plan.shapes import Layout
from plait.plan.shift import memory_line, resolve_threshold
from plait.sampling_params import SamplingParams


def _eos_ids(hf_config, tokenizer) -> set[int]:
    ids = getattr(hf_config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def check_prompt(ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """A ValueError for a prompt no engine of these limits can take: empty, too long, or out of the vocabulary.
    Pure, so the server's HTTP process checks prompts with it without holding an engine."""
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    if len(ids) >= max_model_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; max_model_len is {max_model_len}, so it must have at "
                         f"most {max_model_len - 1}")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")


@dataclass
class EngineRequest:
    """The step loop's side of a request: its sequences (what users see is the output processor's)."""

    request_id: str
    seqs: list[Sequence]


class LLMEngine:
    def __init__(self, cfg: EngineConfig, device_offset: int = 0, own_process: bool = False):
        self.cfg = cfg
        src = resolve_model(cfg.model)
        self.model_name = src.name
        hf_config = load_hf_config(src)
        self.model_config = model_config_from_hf(hf_config)
        m = self.model_config
        check_tensor_parallel(cfg.tensor_parallel_size, m.num_heads, m.num_kv_heads)
        check_sequence_parallel(cfg.sequence_parallel_size, cfg.tensor_parallel_size, m.num_heads, m.num_kv_heads)
        check_track_parallel(cfg.parallel, m)
        par = cfg.parallel
        check_pipeline(m.num_layers, par.pipeline_parallel_size, par.pp_layer_partition)
        self.sched_config = resolve_scheduler_config(cfg, self.model_config)
        self.itemsize = cfg.torch_dtype(getattr(hf_config, "dtype", None)).itemsize
        if cfg.shift_parallel:
            cfg, line = resolve_threshold(cfg, m, src.name, self.sched_config.max_num_batched_tokens, self.itemsize)
            self.cfg = cfg
            print(f"plait: {line}")
        self.tokenizer = load_tokenizer(src, cfg.tokenizer)
        self.eos_token_ids = eos = _eos_ids(hf_config, self.tokenizer)
        self.executor = make_executor(cfg, {
            "model_config": self.model_config,  # so no rank parses the checkpoint's config again
            "max_model_len": self.sched_config.max_model_len,
            "max_num_batched_tokens": self.sched_config.max_num_batched_tokens,
            "eos_token_ids": eos,
        }, device_offset, own_process)
        try:  # a start-up that fails past this point stops the ranks (and frees their GPU memory) before it raises
            num_blocks = self._size_kv_cache()
            if par.sequence_parallel_size > 1:
                print(f"plait: {memory_line(m, Layout.of(cfg), self.itemsize, num_blocks * cfg.block_size)}")
            self.outputs = make_outputs(self.tokenizer, cfg.async_output_proc)
        except BaseException:
            self.shutdown()
            raise
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.schedulers = [Scheduler(self.sched_config, self.blocks) for _ in range(par.pipeline_parallel_size)]
        self.scheduler_of: dict[int, Scheduler] = {}  # seq_id -> the scheduler (micro-batch) that owns it
        self.in_flight: deque[tuple[Scheduler, StepPlan]] = deque()
        self.plans_per_scheduler = 2 if cfg.resolved_async_scheduling() else 1
        self.requests: dict[str, EngineRequest] = {}
        self.seqs: dict[int, Sequence] = {}
        self._ids = itertools.count()
        freeze_startup_heap()

    def _size_kv_cache(self) -> int:
        num_blocks = self.cfg.num_gpu_blocks_override or min(self.executor.call("num_kv_blocks"))
        capacity = num_blocks * self.cfg.block_size
        if capacity < self.sched_config.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {self.cfg.block_size}), fewer than "
                f"max_model_len ({self.sched_config.max_model_len}): raise kv_cache_memory_bytes / "
                f"gpu_memory_utilization or lower max_model_len"
            )
        self.executor.call("allocate_kv_cache", num_blocks)
        return num_blocks

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (a preset with dummy weights): pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Validate and queue a request; a bad request raises ValueError here and never reaches a step."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.tokenize(prompt)
        self._check_prompt(ids)
        room = self.sched_config.max_model_len - len(ids)
        params = dataclasses.replace(params, max_tokens=min(params.max_tokens or room, room))
        # As vLLM: with a seed, completion i draws from seed + i, so the n completions differ yet repeat.
        seqs = [Sequence(request_id, i, ids, params if params.seed is None else dataclasses.replace(params, seed=params.seed + i))
                for i in range(params.n)]
        self.requests[request_id] = EngineRequest(request_id, seqs)
        self.outputs.add(NewRequest(request_id, prompt if isinstance(prompt, str) else None, ids, params))
        sched = min(self.schedulers, key=lambda x: len(x.waiting) + len(x.running))
        for seq in seqs:
            self.seqs[seq.seq_id] = seq
            self.scheduler_of[seq.seq_id] = sched
            sched.add(seq)
        return request_id

    def _check_prompt(self, ids: list[int]) -> None:
        check_prompt(ids, self.sched_config.max_model_len, self.model_config.vocab_size)

    def abort_request(self, request_id: str) -> None:
        """Free the request's blocks at once; a plan in flight may still compute it, and its tokens are dropped."""
        if request_id in self.requests:
            self._finish(request_id, "abort")
            self.outputs.drop(request_id)

    def _finish(self, request_id: str, reason: str) -> None:
        """Forget a request, finishing (with `reason`) any of its sequences still scheduled."""
        for seq in self.requests.pop(request_id).seqs:
            self._finish_seq(seq, reason)
            self.seqs.pop(seq.seq_id, None)
            self.scheduler_of.pop(seq.seq_id, None)

    def _finish_seq(self, seq: Sequence, reason: str) -> None:
        if not seq.is_finished:
            seq.finish_reason = reason
            self.scheduler_of[seq.seq_id].finish(seq)

    def has_unfinished_requests(self) -> bool:
        """True while a request is live or a plan is still in flight (its answer must be collected)."""
        return bool(self.requests or self.in_flight)

    def request_counts(self) -> tuple[int, int]:
        """(running, waiting) requests; a request with a sequence running counts as running."""
        running = {seq.request_id for sched in self.schedulers for seq in sched.running}
        waiting = {seq.request_id for sched in self.schedulers for seq in sched.waiting} - running
        return len(running), len(waiting)

    def outstanding_tokens(self) -> int:
        """Tokens still to compute or generate for every live sequence: the data-parallel router's load measure."""
        return sum(seq.num_tokens + seq.num_pending - seq.num_computed_tokens + seq.params.max_tokens
                   - seq.num_output_tokens for seq in self.seqs.values())

    def kv_cache_usage(self) -> float:
        return self.blocks.usage()

    def prefix_cache_tokens(self) -> tuple[int, int]:
        """(tokens looked up in the prefix cache, tokens found there) since start."""
        return self.blocks.queried_tokens, self.blocks.hit_tokens

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the outputs of the requests that progressed (finished ones once, last)."""
        self.submit_step()
        return self.collect_step()

    def submit_step(self) -> None:
        """Plan and send while a scheduler has fewer plans in flight than allowed (two with asynchronous
        scheduling, else one) and something to send."""
        for sched in self.schedulers:
            while sum(s is sched for s, _ in self.in_flight) < self.plans_per_scheduler:
                plan = sched.schedule()
                if not (plan.seqs or plan.finished_seq_ids or plan.late_tokens):
                    break
                self.executor.submit("execute", plan)
                self.in_flight.append((sched, plan))

    def collect_step(self) -> list[RequestOutput]:
        """Wait for the oldest plan's tokens, advance its sequences, and return the outputs that are ready."""
        if self.in_flight:
            _, plan = self.in_flight.popleft()
            self.outputs.submit(self._advance(plan, StepResult.merge(self.executor.collect())))
        more = bool(self.in_flight) or any(sched.has_work() for sched in self.schedulers)
        return self._deliver(self.outputs.take(lag=1 if more else 0))

    def _advance(self, plan: StepPlan, result: StepResult) -> StepOutputs:
        """Append each sampled token and apply the stops a token id decides; a sequence finished or aborted
        while this plan was in flight gets nothing (its token was computed a step too many)."""
        step = StepOutputs()
        for s in plan.seqs:
            seq = self.seqs.get(s.seq_id)
            if seq is None or seq.is_finished:
                continue
            step.touched.append(seq.request_id)
            if s.seq_id in result.prompt_logprobs:
                step.prompts.append(PromptDelta(seq.request_id, s.start, result.prompt_logprobs[s.seq_id]))
            if s.sample:
                token = result.sampled[s.seq_id]
                seq.append_token(token)
                self.scheduler_of[seq.seq_id].token_known(seq)
                token_stop(seq, token, self.eos_token_ids, self.sched_config.max_model_len)
                step.tokens.append(TokenDelta(seq.request_id, seq.index, token, result.logprobs.get(s.seq_id),
                                              seq.finish_reason, seq.stop_reason))
                if seq.finish_reason is not None:
                    self.scheduler_of[seq.seq_id].finish(seq)
        return step

    def _deliver(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Apply what the output processor decided (stop strings end sequences; a finished request is forgotten)
        and drop outputs of requests aborted since."""
        delivered = []
        for out in outputs:
            state = self.requests.get(out.request_id)
            if state is None:
                continue
            for completion in out.outputs:  # a DELTA output holds only the completions that changed
                if completion.finish_reason is not None:
                    self._finish_seq(state.seqs[completion.index], completion.finish_reason)
            if out.finished:
                self._finish(out.request_id, "stop")
            delivered.append(out)
        return delivered

    def shutdown(self) -> None:
        gc.unfreeze()  # plait.engine.heap: the engine's objects become collectable again
        if getattr(self, "outputs", None) is not None:
            self.outputs.close()
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown()
            self.executor = None
