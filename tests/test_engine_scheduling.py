"""Scheduling through the real engine (tiny random Llama, fp32 on CPU): stress with preemption, chunked prefill,
abort, n, stop tokens and length caps. The scheduler's unit tests on hand-made sequences are in test_scheduler.py."""

from __future__ import annotations

import random

import pytest

from conftest import check_state, random_prompts
from plait import LLM, SamplingParams
from plait.core import SeqStatus

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


def test_prefix_caching_reuses_shared_prefixes_with_the_same_outputs(folder):
    """Prompts that share a system prompt (and repeats of whole prompts, and a prompt preempted and readmitted)
    compute only what the cache lacks, and generate exactly what an engine without prefix caching does."""
    rng = random.Random(5)
    system = [rng.randrange(1, 200) for _ in range(37)]
    prompts = [system + [rng.randrange(1, 200) for _ in range(rng.randrange(1, 20))] for _ in range(10)]
    prompts += prompts[:3]  # whole prompts again
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=12, logprobs=2)
    kw = dict(block_size=4, max_num_seqs=4, num_gpu_blocks_override=40)  # tight: preemption and eviction happen
    cached, plain = make_llm(folder, **kw), make_llm(folder, enable_prefix_caching=False, **kw)
    try:
        got = cached.generate(prompts, params, use_tqdm=False)
        want = plain.generate(prompts, params, use_tqdm=False)
        queried, hit = cached.engine.prefix_cache_tokens()
        assert hit >= 9 * 36 and queried >= sum(len(p) for p in prompts)  # the system prompt's 9 blocks, 9+ times
        assert plain.engine.prefix_cache_tokens() == (0, 0)
        check_state(cached.engine.schedulers[0])
    finally:
        cached.shutdown()
        plain.shutdown()
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            _assert_logprobs_close(a, b)
