"""Continuous batching with chunked prefill and preemption by recompute.

Each step the scheduler says only "compute these tokens of these sequences" (vLLM v1's model): a prompt,
a chunk of a prompt and a decode token are one case. Running sequences go first, oldest first; when the
cache cannot hold a running sequence's next tokens, the newest running sequence is preempted (its blocks
freed, its tokens recomputed later). Waiting sequences are admitted while the token budget, the sequence
limit and the free blocks allow, and never in a step that had to preempt.
"""

from __future__ import annotations

from collections import deque

from plait.config import SchedulerConfig
from plait.core import ScheduledSeq, SeqData, SeqStatus, Sequence, StepPlan
from plait.engine.kv_cache import BlockManager


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager):
        self.cfg, self.blocks = cfg, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._finished_ids: list[int] = []  # told to the ranks with the next plan, so they drop their state

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        self.blocks.release(seq.seq_id)
        self._finished_ids.append(seq.seq_id)

    def schedule(self) -> StepPlan:
        budget = self.cfg.max_num_batched_tokens
        plan = StepPlan(seqs=[], finished_seq_ids=self._finished_ids)
        self._finished_ids = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.can_grow(seq.seq_id, seq.num_computed_tokens + n):
                self._preempt(self.running.pop())
                preempted = True
                if i == len(self.running):  # it preempted itself: nothing left to free
                    break
            else:
                plan.seqs.append(self._scheduled(seq, n))
                budget -= n
                i += 1
                continue
            break
        if not preempted:
            budget = self._admit(plan, budget)
        return plan

    def _admit(self, plan: StepPlan, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens - seq.num_computed_tokens
            if n > budget:
                if not self.cfg.enable_chunked_prefill:
                    break
                n = budget
            if not self.blocks.can_grow(seq.seq_id, seq.num_computed_tokens + n):
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            plan.new_seqs.append(SeqData(seq.seq_id, list(seq.token_ids), seq.prompt_len, seq.params))
            plan.seqs.append(self._scheduled(seq, n))
            budget -= n
        return budget

    def _scheduled(self, seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        table = self.blocks.grow(seq.seq_id, start + n)
        return ScheduledSeq(
            seq_id=seq.seq_id,
            start=start,
            token_ids=seq.token_ids[start : start + n],
            block_table=list(table),
            sample=start + n == seq.num_tokens,
            prompt_logprobs=seq.params.prompt_logprobs is not None and start < seq.prompt_len - 1,
        )

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq.seq_id)
        seq.status = SeqStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def on_step_done(self, plan: StepPlan, seqs: dict[int, Sequence]) -> None:
        """The ranks computed the plan: advance each sequence's computed-token count."""
        for s in plan.seqs:
            if s.seq_id in seqs:  # an aborted sequence may still be in a plan that was in flight
                seqs[s.seq_id].num_computed_tokens = s.start + len(s.token_ids)
