"""The scheduler: unit tests on hand-made Sequences, then stress, chunking, preemption and abort through the real engine."""

from __future__ import annotations

import random

import pytest

from conftest import random_prompts
from plait import LLM, SamplingParams
from plait.config import SchedulerConfig
from plait.core import SeqStatus, Sequence, StepPlan
from plait.engine.kv_cache import BlockManager, blocks_needed
from plait.engine.scheduler import Scheduler

# --- unit tests: a Scheduler, a small BlockManager and fake sequences (no model) ---------------------------------

NEXT_TOKEN = 7  # what the "model" samples in the unit tests


def make_scheduler(num_blocks=64, block_size=4, budget=16, max_seqs=8, chunked=True, max_len=64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_len, max_seqs, budget, chunked, block_size), BlockManager(num_blocks, block_size))


def make_seq(prompt_len: int, name: str = "r") -> Sequence:
    return Sequence(name, 0, list(range(100, 100 + prompt_len)), SamplingParams(temperature=0.0, max_tokens=100))


def add(sched: Scheduler, seqs: dict[int, Sequence], *new: Sequence) -> None:
    for seq in new:
        seqs[seq.seq_id] = seq
        sched.add(seq)


def check_state(sched: Scheduler) -> None:
    """Invariants between the scheduler's queues and the block manager."""
    sched.blocks.check_invariants()
    bs = sched.blocks.block_size
    for seq in sched.running:
        assert seq.status is SeqStatus.RUNNING
        assert len(sched.blocks.table(seq.seq_id)) >= blocks_needed(seq.num_computed_tokens, bs)
    for seq in sched.waiting:
        assert seq.status is SeqStatus.WAITING
        assert seq.num_computed_tokens == 0 and sched.blocks.table(seq.seq_id) == []
    owners = {seq.seq_id for seq in sched.running}
    assert set(sched.blocks.tables) <= owners, "a sequence that is not running holds blocks"
    assert len(sched.running) <= sched.cfg.max_num_seqs


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


# --- through the real engine (tiny random Llama, fp32 on CPU) ----------------------------------------------------

MAX_LEN = 128


def make_llm(folder, **kw) -> LLM:
    kw = {"dtype": "float32", "device": "cpu", "max_model_len": MAX_LEN, "num_gpu_blocks_override": 2048, **kw}
    return LLM(folder, **kw)


@pytest.fixture(scope="module")
def folder(checkpoints):
    return checkpoints["llama"][0]


@pytest.fixture(scope="module")
def roomy(folder):
    """Room for every request at once: never preempts."""
    return make_llm(folder, block_size=4)


@pytest.fixture(scope="module")
def tight(folder):
    """40 blocks of 4 tokens (160 tokens) for requests of up to 84 tokens each: must preempt."""
    return make_llm(folder, block_size=4, num_gpu_blocks_override=40)


def drive(llm: LLM, prompts, params):
    """Step the engine ourselves, checking the block manager after every step; returns (outputs, sequences)."""
    engine = llm.engine
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    seqs = [s for r in rids for s in engine.requests[r].seqs]
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in done, "a finished request was reported again"
            if out.finished:
                done[out.request_id] = out
        engine.blocks.check_invariants()
        check_state(engine.schedulers[0])
        steps += 1
        assert steps < 5000, "the engine does not make progress"
    assert_drained(llm)
    return [done[r] for r in rids], seqs


def assert_drained(llm: LLM) -> None:
    engine = llm.engine
    bm = engine.blocks
    bm.check_invariants()
    assert bm.num_free == bm.num_blocks and bm.tables == {}
    assert not engine.schedulers[0].has_work() and not engine.requests and not engine.seqs


def workload(n=64, seed=1):
    prompts = random_prompts(n, lo=3, hi=61, seed=seed)
    rng = random.Random(seed)
    return prompts, [rng.randint(1, 24) for _ in prompts]


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_stress_with_preemption_matches_roomy_engine(tight, roomy):
    prompts, max_tokens = workload()
    assert max(len(p) for p in prompts) > 50 and min(len(p) for p in prompts) < 10
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=m) for m in max_tokens]
    got, seqs = drive(tight, prompts, params)
    assert sum(s.num_preemptions > 0 for s in seqs) >= 3, "the small cache should have forced preemptions"
    want, ref_seqs = drive(roomy, prompts, params)
    assert all(s.num_preemptions == 0 for s in ref_seqs)
    for o, m in zip(got, max_tokens):
        assert o.finished and o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == m
    assert tokens(got) == tokens(want)
    # and a few of them alone in the engine, against batching effects in the reference itself
    for i in [0, 7, 31, 63]:
        alone = roomy.generate([prompts[i]], params[i], use_tqdm=False)
        assert alone[0].outputs[0].token_ids == tokens(got)[i]
    assert_drained(roomy)


def test_seeded_sampling_is_the_same_under_preemption(tight, roomy):
    prompts, max_tokens = workload(n=48, seed=2)
    params = [SamplingParams(temperature=1.0, seed=1000 + i, ignore_eos=True, max_tokens=m) for i, m in enumerate(max_tokens)]
    got, seqs = drive(tight, prompts, params)
    assert any(s.num_preemptions > 0 for s in seqs)
    want, _ = drive(roomy, prompts, params)
    assert tokens(got) == tokens(want)
    greedy = roomy.generate(prompts, [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=m) for m in max_tokens],
                            use_tqdm=False)
    assert sum(a != b for a, b in zip(tokens(got), tokens(greedy))) >= 10, "temperature 1 should not act greedy"


def _assert_logprobs_close(a, b, tol=1e-5):
    assert (a is None) == (b is None)
    if a is None:
        return
    assert a.keys() == b.keys()
    for t in a:
        assert a[t].logprob == pytest.approx(b[t].logprob, abs=tol)
        assert a[t].rank == b[t].rank


def test_chunked_prefill_matches_whole_prefill(folder):
    prompts, max_tokens = workload(n=12, seed=3)
    assert max(len(p) for p in prompts) > 3 * 16  # some prompts take four chunks
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=m, logprobs=3, prompt_logprobs=2) for m in max_tokens]
    chunked = make_llm(folder, block_size=4, enable_chunked_prefill=True, max_num_batched_tokens=16, num_gpu_blocks_override=512)
    whole = make_llm(folder, block_size=4, enable_chunked_prefill=False, num_gpu_blocks_override=512)
    assert chunked.engine.sched_config.max_num_batched_tokens == 16
    got, _ = drive(chunked, prompts, params)
    want, _ = drive(whole, prompts, params)
    for g, w, p in zip(got, want, prompts):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert len(g.outputs[0].logprobs) == len(g.outputs[0].token_ids)
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            _assert_logprobs_close(a, b)
        assert g.outputs[0].cumulative_logprob == pytest.approx(w.outputs[0].cumulative_logprob, abs=1e-4)
        assert len(g.prompt_logprobs) == len(p) and g.prompt_logprobs[0] is None
        assert all(lp is not None for lp in g.prompt_logprobs[1:])
        for i, (a, b) in enumerate(zip(g.prompt_logprobs, w.prompt_logprobs)):
            _assert_logprobs_close(a, b)
            if i:
                assert p[i] in a  # the actual prompt token is always there
    chunked.shutdown()
    whole.shutdown()


def test_abort_frees_blocks_at_once_and_others_finish(folder, roomy):
    llm = make_llm(folder, block_size=4, max_num_seqs=4, num_gpu_blocks_override=256)
    engine = llm.engine
    prompts = random_prompts(6, lo=10, hi=30, seed=4)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=20)
    rids = [engine.add_request(p, params) for p in prompts]
    for _ in range(3):
        engine.step()
    bm = engine.blocks
    running_seq = engine.requests[rids[1]].seqs[0]
    waiting_seq = engine.requests[rids[5]].seqs[0]
    assert running_seq.status is SeqStatus.RUNNING and waiting_seq.status is SeqStatus.WAITING  # max_num_seqs=4
    held, free = len(bm.table(running_seq.seq_id)), bm.num_free
    assert held > 0
    engine.abort_request(rids[1])
    assert bm.table(running_seq.seq_id) == [] and bm.num_free == free + held  # at once, not at the next step
    bm.check_invariants()
    assert running_seq.finish_reason == "abort" and running_seq.status is SeqStatus.FINISHED
    assert rids[1] not in engine.requests and running_seq not in engine.schedulers[0].running
    engine.abort_request(rids[5])
    assert waiting_seq not in engine.schedulers[0].waiting and rids[5] not in engine.requests
    engine.abort_request("no-such-request")  # harmless

    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in (rids[1], rids[5])
            if out.finished:
                done[out.request_id] = out
        bm.check_invariants()
    assert running_seq.seq_id not in engine.executor.runner.mirrors  # the rank dropped its copy too
    assert_drained(llm)
    kept = [0, 2, 3, 4]
    want = roomy.generate([prompts[i] for i in kept], params, use_tqdm=False)
    assert [done[rids[i]].outputs[0].token_ids for i in kept] == tokens(want)
    llm.shutdown()


def test_n_with_seed_gives_n_different_reproducible_completions(roomy):
    prompt = random_prompts(1, lo=8, hi=9, seed=5)[0]
    params = SamplingParams(n=3, seed=7, temperature=1.0, max_tokens=12, ignore_eos=True)
    out = roomy.generate([prompt], params, use_tqdm=False)[0]
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in out.outputs)
    completions = [c.token_ids for c in out.outputs]
    assert len({tuple(c) for c in completions}) == 3, "the n completions of a seeded request must differ"
    again = roomy.generate([prompt], params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == completions
    # as in vLLM, completion i draws from seed + i
    for i in range(3):
        single = roomy.generate([prompt], SamplingParams(seed=7 + i, temperature=1.0, max_tokens=12, ignore_eos=True),
                                use_tqdm=False)[0]
        assert single.outputs[0].token_ids == completions[i]
    assert_drained(roomy)


def test_n_greedy_completions_are_identical(roomy):
    prompt = random_prompts(1, lo=8, hi=9, seed=6)[0]
    out = roomy.generate([prompt], SamplingParams(n=3, temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs) == 3 and out.outputs[0].token_ids == out.outputs[1].token_ids == out.outputs[2].token_ids


def test_stop_token_ids_and_max_tokens(roomy):
    prompt = random_prompts(1, lo=12, hi=13, seed=7)[0]
    ref = roomy.generate([prompt], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=16), use_tqdm=False)[0]
    ref_ids = ref.outputs[0].token_ids
    assert len(ref_ids) == 16 and ref.outputs[0].finish_reason == "length" and ref.outputs[0].stop_reason is None
    k = next(i for i in range(2, 16) if ref_ids[i] not in ref_ids[:i])  # a token that first shows up at position k
    stop = ref_ids[k]
    out = roomy.generate([prompt], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=16, stop_token_ids=[stop]),
                         use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref_ids[: k + 1]  # the stop token is the last token
    assert out.finish_reason == "stop" and out.stop_reason == stop
    # min_tokens beyond k holds the stop token back
    out = roomy.generate([prompt], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=16, min_tokens=k + 1,
                                                  stop_token_ids=[stop]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) > k + 1 and stop not in out.token_ids[: k + 1]
    # max_tokens
    out = roomy.generate([prompt], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref_ids[:5] and out.finish_reason == "length" and out.stop_reason is None
    assert_drained(roomy)


def test_output_is_capped_by_max_model_len(roomy):
    prompt = random_prompts(1, lo=MAX_LEN - 6, hi=MAX_LEN - 5, seed=8)[0]
    out = roomy.generate([prompt], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=None), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].finish_reason == "length"
    out = roomy.generate([prompt], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=50), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].finish_reason == "length"
