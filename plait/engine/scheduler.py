"""Continuous batching with chunked prefill and preemption by recompute.

Each step the scheduler says only "compute these tokens of these sequences" (vLLM v1's model): a prompt,
a chunk of a prompt and a decode token are one case. Running sequences go first, oldest first; when the
cache cannot hold a running sequence's next tokens, the newest running sequence is preempted (its blocks
freed, its tokens recomputed later). Waiting sequences are admitted while the token budget, the sequence
limit and the free blocks allow, and never in a step that had to preempt. With prefix caching a sequence entering
the batch starts after the full blocks of its tokens that the cache holds (plait.engine.kv_cache).

A sequence's computed-token count advances when its plan is made, not when the plan has run, so the next plan
can be made while this one is in flight (asynchronous scheduling): a sequence whose last plan samples a token
gets one more decode position at once, its token sent as PLACEHOLDER, and the real id follows in a later plan's
`late_tokens` when the host learns it. A sequence already certain to stop (its max_tokens reached by tokens in
flight) is not scheduled again, and one preempted while its token is in flight is readmitted only once the
token is known: the two places where a step waits for the host's answer.
"""

from __future__ import annotations

from collections import deque

from plait.config import SchedulerConfig
from plait.core import PLACEHOLDER, ScheduledSeq, SeqData, SeqStatus, Sequence, StepPlan
from plait.engine.kv_cache import BlockManager


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager):
        self.cfg, self.blocks = cfg, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._finished_ids: list[int] = []  # told to the ranks with the next plan, so they drop their state
        self._late_tokens: list[tuple[int, int, int]] = []  # placeholders resolved since the last plan
        self._planned: list[Sequence] = []  # with prefix caching: the sequences of the plan being made

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
        plan = StepPlan(seqs=[], finished_seq_ids=self._finished_ids, late_tokens=self._late_tokens)
        self._finished_ids, self._late_tokens = [], []
        preempted = False
        running, i = self.running, 0
        while i < len(running) and budget > 0:
            seq = running[i]
            ahead = seq.num_tokens + seq.num_pending  # known tokens and those sampled by plans in flight
            if ahead - seq.prompt_len >= seq.params.max_tokens:
                i += 1  # its last token is in flight: it stops there, and a step more would be thrown away
                continue
            n = min(ahead - seq.num_computed_tokens, budget)
            table = self.blocks.grow(seq.seq_id, seq.num_computed_tokens + n)
            if table is None:  # the cache is full: free the newest running sequence's blocks (maybe this one's)
                self._preempt(running.pop())
                preempted = True
                continue
            plan.seqs.append(self._scheduled(seq, n, table))
            budget -= n
            i += 1
        if not preempted:
            budget = self._admit(plan, budget)
        for seq in self._planned:  # keyed after the plan is made, so no sequence of this plan reads what it writes
            self.blocks.register(seq.seq_id, seq.token_ids, min(seq.num_computed_tokens, seq.num_tokens))
        self._planned.clear()
        return plan

    def _admit(self, plan: StepPlan, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # preempted while its token was in flight: recompute it once the token is known
            cached, keys = self._cached_prefix(seq)
            start = len(cached) * self.blocks.block_size
            n = seq.num_tokens - start
            if n > budget:
                if not self.cfg.enable_chunked_prefill:
                    break
                n = budget
            if not self.blocks.can_share(cached, start + n):
                break
            self.blocks.share(seq.seq_id, cached, keys, seq.num_tokens if self._looks_up(seq) else 0)
            seq.num_computed_tokens = start
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            plan.new_seqs.append(SeqData(seq.seq_id, list(seq.token_ids), seq.prompt_len, seq.params))
            plan.seqs.append(self._scheduled(seq, n, self.blocks.grow(seq.seq_id, start + n)))
            budget -= n
        return budget

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """The cached blocks a sequence entering the running batch can start from (none without prefix caching, or
        when prompt logprobs need every prompt row's logits); its last token is always computed, for its logits."""
        if not self._looks_up(seq):
            return [], []
        return self.blocks.cached_prefix(seq.token_ids, seq.num_tokens - 1)

    def _looks_up(self, seq: Sequence) -> bool:
        return self.blocks.prefix_caching and seq.params.prompt_logprobs is None

    def _scheduled(self, seq: Sequence, n: int, table: list[int]) -> ScheduledSeq:
        """Schedule n tokens from the sequence's next position (its table covers them) and advance it past them now."""
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        if self.blocks.prefix_caching:
            self._planned.append(seq)
        tokens = seq.token_ids
        known = tokens[start:end]
        sample = end == len(tokens) + seq.num_pending
        seq.num_computed_tokens = end
        seq.num_pending += sample
        return ScheduledSeq(
            seq_id=seq.seq_id,
            start=start,
            token_ids=known + [PLACEHOLDER] * (n - len(known)),
            block_table=list(table),
            sample=sample,
            prompt_logprobs=seq.params.prompt_logprobs is not None and start < seq.prompt_len - 1,
        )

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq.seq_id)
        seq.status = SeqStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def token_known(self, seq: Sequence) -> None:
        """The host has appended the token a plan sampled for `seq`. If a plan already in flight computes its
        position (sent as PLACEHOLDER), the ranks' mirrors get the real id with the next plan."""
        seq.num_pending -= 1
        position = seq.num_tokens - 1
        if seq.num_computed_tokens > position:
            self._late_tokens.append((seq.seq_id, position, seq.token_ids[position]))
