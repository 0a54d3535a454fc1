"""The scheduler on hand-made Sequences, a small BlockManager and no model (the engine-level scheduling tests are in
test_engine_scheduling.py)."""

from __future__ import annotations

import random

import pytest

from conftest import check_state
from plait import SamplingParams
from plait.config import SchedulerConfig
from plait.core import SeqStatus, Sequence, StepPlan
from plait.engine.kv_cache import BlockManager, blocks_needed
from plait.engine.scheduler import Scheduler

NEXT_TOKEN = 7  # what the "model" samples in the unit tests


def make_scheduler(num_blocks=64, block_size=4, budget=16, max_seqs=8, chunked=True, max_len=64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_len, max_seqs, budget, chunked, block_size), BlockManager(num_blocks, block_size))


def make_seq(prompt_len: int, name: str = "r") -> Sequence:
    return Sequence(name, 0, list(range(100, 100 + prompt_len)), SamplingParams(temperature=0.0, max_tokens=100))


def add(sched: Scheduler, seqs: dict[int, Sequence], *new: Sequence) -> None:
    for seq in new:
        seqs[seq.seq_id] = seq
        sched.add(seq)


def step(sched: Scheduler, seqs: dict[int, Sequence]) -> StepPlan:
    """One scheduler step as the engine does it, with a fake model that always samples NEXT_TOKEN."""
    computed = {seq_id: seq.num_computed_tokens for seq_id, seq in seqs.items()}
    plan = sched.schedule()
    assert plan.num_tokens <= sched.cfg.max_num_batched_tokens
    assert len(plan.seqs) <= sched.cfg.max_num_seqs
    assert len({s.seq_id for s in plan.seqs}) == len(plan.seqs)
    for s in plan.seqs:
        seq = seqs[s.seq_id]
        assert len(s.token_ids) >= 1
        assert s.start == computed[s.seq_id] and seq.num_computed_tokens == s.start + len(s.token_ids)
        assert s.token_ids == seq.token_ids[s.start : s.start + len(s.token_ids)]
        assert s.sample == (s.start + len(s.token_ids) == seq.num_tokens)
        assert s.block_table == sched.blocks.table(s.seq_id)
        assert len(s.block_table) == blocks_needed(s.start + len(s.token_ids), sched.blocks.block_size)
    for s in plan.seqs:
        if s.sample:
            seqs[s.seq_id].append_token(NEXT_TOKEN)
            sched.token_known(seqs[s.seq_id])
    check_state(sched)
    return plan


def shares(plan: StepPlan) -> list[tuple[int, int, int]]:
    """(seq_id, start, number of tokens) of each scheduled sequence, in plan order."""
    return [(s.seq_id, s.start, len(s.token_ids)) for s in plan.seqs]


def test_token_budget_is_respected_and_the_rest_chunked():
    sched, seqs = make_scheduler(budget=16), {}
    a, b, c = make_seq(10, "a"), make_seq(10, "b"), make_seq(10, "c")
    add(sched, seqs, a, b, c)
    plan = step(sched, seqs)
    assert shares(plan) == [(a.seq_id, 0, 10), (b.seq_id, 0, 6)]
    assert [s.sample for s in plan.seqs] == [True, False]
    assert [d.seq_id for d in plan.new_seqs] == [a.seq_id, b.seq_id]
    assert list(sched.waiting) == [c] and sched.running == [a, b]
    plan = step(sched, seqs)
    assert shares(plan) == [(a.seq_id, 10, 1), (b.seq_id, 6, 4), (c.seq_id, 0, 10)]
    assert plan.num_tokens == 15
    assert [d.seq_id for d in plan.new_seqs] == [c.seq_id]  # only the newly admitted one is sent in full


def test_decodes_go_before_new_prefills():
    sched, seqs = make_scheduler(budget=6), {}
    running = [make_seq(3, f"d{i}") for i in range(5)]
    add(sched, seqs, *running[:2])
    step(sched, seqs)
    add(sched, seqs, *running[2:])
    step(sched, seqs)  # d2..d4 prefills (3 tokens each) share the budget behind d0, d1's decodes
    step(sched, seqs)
    while any(s.num_computed_tokens < 3 for s in running):
        step(sched, seqs)
    late = make_seq(20, "late")
    add(sched, seqs, late)
    plan = step(sched, seqs)
    # every running sequence decodes first (oldest first), the new prompt gets what is left of the budget
    assert shares(plan)[:5] == [(s.seq_id, s.num_tokens - 2, 1) for s in running]
    assert shares(plan)[5] == (late.seq_id, 0, 1)


def test_chunked_prefill_splits_a_long_prompt_and_positions_continue():
    sched, seqs = make_scheduler(budget=16, block_size=4), {}
    seq = make_seq(40)
    add(sched, seqs, seq)
    tables = []
    for start, n in [(0, 16), (16, 16), (32, 8)]:
        plan = step(sched, seqs)
        assert shares(plan) == [(seq.seq_id, start, n)]
        assert plan.seqs[0].token_ids == seq.prompt_token_ids[start : start + n]
        assert plan.seqs[0].sample == (start + n == 40)
        assert len(plan.new_seqs) == (0 if start else 1)
        tables.append(plan.seqs[0].block_table)
    assert seq.output_token_ids == [NEXT_TOKEN]  # sampled once, after the last chunk
    assert tables[0] == tables[1][:4] and tables[1] == tables[2][:8] and len(tables[2]) == 10
    plan = step(sched, seqs)  # then it decodes the sampled token at position 40
    assert shares(plan) == [(seq.seq_id, 40, 1)] and plan.seqs[0].token_ids == [NEXT_TOKEN]
    assert plan.seqs[0].block_table == tables[2] + [plan.seqs[0].block_table[-1]]


def test_without_chunked_prefill_a_prompt_waits_until_it_fits_whole():
    sched, seqs = make_scheduler(budget=32, max_len=32, chunked=False), {}
    a, b, c = make_seq(20, "a"), make_seq(20, "b"), make_seq(2, "c")
    add(sched, seqs, a, b, c)
    plan = step(sched, seqs)
    assert shares(plan) == [(a.seq_id, 0, 20)]  # b (20) does not fit the 12 left; c stays behind it (FCFS)
    assert list(sched.waiting) == [b, c] and b.num_computed_tokens == 0
    plan = step(sched, seqs)
    assert shares(plan) == [(a.seq_id, 20, 1), (b.seq_id, 0, 20), (c.seq_id, 0, 2)]

    # the same requests with chunked prefill: b starts at once with the 12 tokens that are left
    sched, seqs = make_scheduler(budget=32, max_len=32, chunked=True), {}
    a, b, c = make_seq(20, "a"), make_seq(20, "b"), make_seq(2, "c")
    add(sched, seqs, a, b, c)
    assert shares(step(sched, seqs)) == [(a.seq_id, 0, 20), (b.seq_id, 0, 12)]


def test_max_num_seqs_is_respected():
    sched, seqs = make_scheduler(budget=64, max_seqs=2), {}
    a, b, c = make_seq(3, "a"), make_seq(3, "b"), make_seq(3, "c")
    add(sched, seqs, a, b, c)
    for _ in range(3):
        plan = step(sched, seqs)
        assert [s.seq_id for s in plan.seqs] == [a.seq_id, b.seq_id]
        assert list(sched.waiting) == [c]
    free = sched.blocks.num_free
    sched.finish(a)
    assert a.status is SeqStatus.FINISHED and sched.blocks.table(a.seq_id) == [] and sched.blocks.num_free == free + 2
    plan = step(sched, seqs)
    assert shares(plan) == [(b.seq_id, 5, 1), (c.seq_id, 0, 3)]
    assert plan.finished_seq_ids == [a.seq_id]  # the ranks are told once
    assert step(sched, seqs).finished_seq_ids == []


def test_preemption_takes_the_newest_running_sequence_and_blocks_admission():
    # 7 blocks of 4 tokens; three 8-token prompts take 6 of them
    sched, seqs = make_scheduler(num_blocks=7, block_size=4, budget=64, max_len=32), {}
    a, b, c = make_seq(8, "a"), make_seq(8, "b"), make_seq(8, "c")
    add(sched, seqs, a, b, c)
    assert shares(step(sched, seqs)) == [(a.seq_id, 0, 8), (b.seq_id, 0, 8), (c.seq_id, 0, 8)]
    assert sched.blocks.num_free == 1
    d = make_seq(2, "d")  # would fit one block
    add(sched, seqs, d)

    # each decode now needs a third block: a takes the last free one, b forces out c (the newest)
    plan = step(sched, seqs)
    assert shares(plan) == [(a.seq_id, 8, 1), (b.seq_id, 8, 1)]
    assert c.status is SeqStatus.WAITING and c.num_preemptions == 1 and c.num_computed_tokens == 0
    assert sched.blocks.table(c.seq_id) == [] and c not in sched.running
    assert list(sched.waiting) == [c, d]  # the preempted one goes first
    assert c.output_token_ids == [NEXT_TOKEN]  # kept: recomputed, not resampled
    assert sched.blocks.num_free == 1 and plan.new_seqs == []  # d would fit, but no admission after a preemption
    assert a.num_preemptions == b.num_preemptions == 0

    plan = step(sched, seqs)  # c needs 3 blocks again and only 1 is free; d must wait behind it
    assert shares(plan) == [(a.seq_id, 9, 1), (b.seq_id, 9, 1)] and list(sched.waiting) == [c, d]

    sched.finish(a)
    plan = step(sched, seqs)  # now c is recomputed from position 0, its sampled token included, then d fits
    assert shares(plan) == [(b.seq_id, 10, 1), (c.seq_id, 0, 9), (d.seq_id, 0, 2)]
    assert plan.seqs[1].token_ids == c.prompt_token_ids + [NEXT_TOKEN] and plan.seqs[1].sample
    new = {s.seq_id: s for s in plan.new_seqs}
    assert new[c.seq_id].token_ids == c.prompt_token_ids + [NEXT_TOKEN] and new[c.seq_id].prompt_len == 8
    assert sched.running == [b, c, d] and not sched.waiting


def put_running(sched: Scheduler, seqs: dict[int, Sequence], seq: Sequence, outputs: int) -> None:
    """Set up a sequence as if it had run: prompt computed, `outputs` tokens sampled (the last not yet computed)."""
    seqs[seq.seq_id] = seq
    for _ in range(outputs):
        seq.append_token(NEXT_TOKEN)
    seq.num_computed_tokens = seq.num_tokens - 1
    seq.status = SeqStatus.RUNNING
    sched.running.append(seq)
    sched.blocks.grow(seq.seq_id, seq.num_computed_tokens)


def test_no_admission_in_a_step_that_preempted_even_if_a_chunk_would_fit():
    # 4 blocks of 4, a budget of 3: a and c each hold 2 blocks after 8 computed tokens
    sched, seqs = make_scheduler(num_blocks=4, block_size=4, budget=3, max_len=16, chunked=True), {}
    a, c = make_seq(8, "a"), make_seq(8, "c")
    put_running(sched, seqs, a, 1)
    put_running(sched, seqs, c, 1)
    check_state(sched)
    plan = step(sched, seqs)  # a's 9th token needs a block: c goes; 1 block and 2 budget tokens are left over
    assert shares(plan) == [(a.seq_id, 8, 1)] and plan.new_seqs == []
    assert list(sched.waiting) == [c] and c.num_preemptions == 1 and sched.blocks.num_free == 1
    plan = step(sched, seqs)  # next step c restarts with a 2-token chunk
    assert shares(plan) == [(a.seq_id, 9, 1), (c.seq_id, 0, 2)]
    assert [d.seq_id for d in plan.new_seqs] == [c.seq_id]


def test_preemption_can_take_the_sequence_that_needs_the_block():
    sched, seqs = make_scheduler(num_blocks=4, block_size=4, budget=64, max_len=16), {}
    a, b = make_seq(6, "a"), make_seq(8, "b")  # 2 blocks each, none free
    add(sched, seqs, a, b)
    step(sched, seqs)
    assert sched.blocks.num_free == 0
    plan = step(sched, seqs)  # a's 7th token still fits its blocks; b's 9th needs a block: b, the newest, goes
    assert shares(plan) == [(a.seq_id, 6, 1)]
    assert b.num_preemptions == 1 and list(sched.waiting) == [b] and sched.running == [a]
    assert sched.blocks.num_free == 2


def test_preemption_of_several_sequences_in_one_step():
    sched, seqs = make_scheduler(num_blocks=6, block_size=4, budget=64, max_len=24), {}
    a, b, c = make_seq(8, "a"), make_seq(4, "b"), make_seq(4, "c")  # 2 + 1 + 1 blocks, 2 free
    add(sched, seqs, a, b, c)
    step(sched, seqs)
    for _ in range(12):  # pretend a jumps ahead: 21 tokens, its next share needs 4 more blocks
        a.append_token(NEXT_TOKEN)
    plan = step(sched, seqs)
    assert shares(plan) == [(a.seq_id, 8, 13)]
    assert list(sched.waiting) == [b, c]  # c went first, then b in front of it: original order kept
    assert b.num_preemptions == c.num_preemptions == 1 and sched.blocks.num_free == 0


def test_abort_of_a_waiting_sequence():
    sched, seqs = make_scheduler(max_seqs=1), {}
    a, b = make_seq(4, "a"), make_seq(4, "b")
    add(sched, seqs, a, b)
    step(sched, seqs)
    sched.finish(b)
    assert not sched.waiting and b.status is SeqStatus.FINISHED
    assert step(sched, seqs).finished_seq_ids == [b.seq_id]
    sched.finish(a)
    assert not sched.has_work() and sched.blocks.num_free == sched.blocks.num_blocks


def test_random_workload_keeps_invariants():
    rng = random.Random(0)
    sched, seqs = make_scheduler(num_blocks=24, block_size=4, budget=20, max_seqs=6, max_len=48), {}
    pending = [make_seq(rng.randint(1, 30), f"s{i}") for i in range(40)]
    limits = {s.seq_id: rng.randint(1, 12) for s in pending}
    for _ in range(2000):
        if pending and rng.random() < 0.3:
            add(sched, seqs, pending.pop())
        step(sched, seqs)
        for seq in list(sched.running):
            if len(seq.output_token_ids) >= limits[seq.seq_id]:
                sched.finish(seq)
        if not pending and not sched.has_work():
            break
    else:
        pytest.fail("the workload did not drain")
    preemptions = sum(s.num_preemptions for s in seqs.values())
    assert preemptions > 0
    assert all(len(s.output_token_ids) == limits[s.seq_id] for s in seqs.values())
    assert sched.blocks.num_free == sched.blocks.num_blocks


def test_prefix_caching_starts_a_new_sequence_after_its_cached_blocks():
    sched = Scheduler(SchedulerConfig(64, 8, 64, True, 4), BlockManager(32, 4, prefix_caching=True))
    first, second = make_seq(10, "a"), make_seq(10, "b")
    sched.add(first)
    plan = sched.schedule()
    assert plan.seqs[0].start == 0 and len(plan.seqs[0].token_ids) == 10
    sched.add(second)  # same prompt: its two full blocks are cached once the plan that computes them is made
    plan = sched.schedule()
    new = next(s for s in plan.seqs if s.seq_id == second.seq_id)
    assert new.start == 8 and new.token_ids == second.token_ids[8:] and new.sample
    assert new.block_table[:2] == sched.blocks.table(first.seq_id)[:2]
    whole = make_seq(8, "c")  # fully cached: its last token is still computed, for the logits
    sched.add(whole)
    plan = sched.schedule()
    assert next(s for s in plan.seqs if s.seq_id == whole.seq_id).start == 4
    logprobs = Sequence("d", 0, list(range(100, 110)), SamplingParams(max_tokens=4, prompt_logprobs=1))
    sched.add(logprobs)  # prompt logprobs need every prompt row: no cache
    plan = sched.schedule()
    assert next(s for s in plan.seqs if s.seq_id == logprobs.seq_id).start == 0
    check_state(sched)
