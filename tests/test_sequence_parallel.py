"""Ulysses sequence parallelism, SP x TP and Shift (SP <-> TP per step, one KV cache) against the single-rank run."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from plait import LLM, SamplingParams
from plait.comm.profiler import RankTrace
from plait.comm.trace import collect
from test_tensor_parallel import PARAMS, assert_same, run, run_profiled


@pytest.mark.parametrize(
    "family,kw",
    [
        ("llama", dict(sequence_parallel_size=2)),  # 9 query / 3 KV heads: uneven heads, a KV head on both ranks
        ("llama", dict(sequence_parallel_size=3)),
        ("llama3", dict(sequence_parallel_size=4)),  # 2 KV heads over 4 ranks: KV-head replication
        ("qwen3", dict(sequence_parallel_size=2)),  # per-head q/k norm after the exchange
        # Shift: prefill steps (many tokens) run SP, decode steps (5 tokens <= 6) run TP, over one KV cache
        ("llama", dict(sequence_parallel_size=3, shift_parallel=True, shift_threshold=6)),
        ("qwen2", dict(sequence_parallel_size=2, shift_parallel=True, shift_threshold=6)),
    ],
)
def test_sequence_and_shift_parallel_match_single_rank(checkpoints, family, kw):
    folder, _ = checkpoints[family]
    prompts = random_prompts(5, seed=7)
    assert_same(run(folder, 1, prompts, **kw), run(folder, 1, prompts))


@pytest.mark.parametrize(
    "family,kw",
    [
        ("llama3", dict()),  # 8 query / 2 KV heads over 4 ranks: each KV head on two ranks of different TP shards
        # 9 query / 3 KV heads split 3+2+2+2 (TP shards of 5 and 4 heads); prefills SP x TP, decodes TP over all 4
        ("llama", dict(shift_parallel=True, shift_threshold=6)),
    ],
)
def test_sequence_times_tensor_parallel_matches_single_rank(checkpoints, family, kw):
    """SP=2 x TP=2 on 4 processes: tokens split over the SP pairs, weights over the TP pairs."""
    folder, _ = checkpoints[family]
    prompts = random_prompts(5, seed=8)
    assert_same(run(folder, 2, prompts, sequence_parallel_size=2, **kw), run(folder, 1, prompts))


def step_modes(trace: RankTrace) -> str:
    """Per step, the mode it ran in as its collectives show: S (sequence parallel: heads exchanged by all-to-all,
    final hidden states gathered) or T (tensor parallel over both ranks: all-reduces only)."""
    ops: dict[int, set[str]] = {s.step: set() for s in trace.steps}
    for r in trace.records:
        ops[r.step].add(r.op)
    modes = {frozenset({"all_to_all", "all_gather"}): "S", frozenset({"all_reduce"}): "T"}
    return "".join(modes[frozenset(ops[s.step])] for s in trace.steps)


def test_shift_with_requests_arriving_and_finishing_matches_solo_runs(checkpoints):
    """Steps switch SP -> TP and back as prefills come and go (the profiler's records show both switches); every
    output equals that request run alone, tokens and logprobs."""
    folder, _ = checkpoints["llama"]
    prompts = random_prompts(12, lo=2, hi=40, seed=9)
    params = [SamplingParams(temperature=0, max_tokens=3 + i % 7, logprobs=1, ignore_eos=True) for i in range(12)]
    llm = LLM(folder, sequence_parallel_size=2, shift_parallel=True, shift_threshold=8, dtype="float32",
              device="cpu", max_model_len=128, max_num_batched_tokens=32, profile_comm=True)
    engine, outs = llm.engine, {}
    try:
        pending, step = list(enumerate(prompts)), 0
        while pending or engine.has_unfinished_requests():
            for _ in range(2 if step % 4 == 0 else 0):  # two arrivals every fourth step: decodes run in between
                if pending:
                    i, p = pending.pop(0)
                    engine.add_request(p, params[i], str(i))
            step += 1
            for out in engine.step():
                if out.finished:
                    outs[int(out.request_id)] = out.outputs[0]
        modes = step_modes(collect(engine).ranks[0])
    finally:
        llm.shutdown()
    assert "ST" in modes and "TS" in modes, modes
    solo = LLM(folder, dtype="float32", device="cpu", max_model_len=128)
    try:
        for i, p in enumerate(prompts):
            ref = solo.generate([p], params[i], use_tqdm=False)[0].outputs[0]
            assert outs[i].token_ids == ref.token_ids, f"request {i}"
            torch.testing.assert_close(torch.tensor([lp[t].logprob for lp, t in zip(outs[i].logprobs, ref.token_ids)]),
                                       torch.tensor([lp[t].logprob for lp, t in zip(ref.logprobs, ref.token_ids)]),
                                       atol=1e-4, rtol=0, msg=f"request {i}")
    finally:
        solo.shutdown()


SMOLLM2_PROMPTS = [[1, 504, 3575, 282, 4649, 314], [1, 9690, 198, 2683, 359, 253, 5356]]


@pytest.fixture(scope="module")
def smollm2_single_rank():
    """The embedded SmolLM2 on one rank: the reference of every SmolLM2 case below, computed once."""
    return run(None, 1, SMOLLM2_PROMPTS)


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp,sp",
    [
        (1, 2),  # 9 query / 3 KV heads split 5 + 4: a KV head on both ranks
        (1, 3),  # 3 query heads and 1 KV head per rank
        (2, 2),  # 4 processes: heads split 3+2+2+2 (TP shards of 5 and 4 heads)
    ],
    ids=["sp2", "sp3", "sp2xtp2"],
)
def test_smollm2_sequence_parallel_matches_single_rank(smollm2_single_rank, tp, sp):
    assert_same(run(None, tp, SMOLLM2_PROMPTS, sequence_parallel_size=sp), smollm2_single_rank)


@pytest.mark.slow
def test_smollm2_shift_matches_single_rank(smollm2_single_rank):
    """One request at a time: each prefill (6-7 tokens) runs SP, its decodes (1 token <= 4) run TP, then the next
    prefill runs SP again, so a single generation switches both ways."""
    outs, trace = run_profiled(None, 1, SMOLLM2_PROMPTS, sequence_parallel_size=2, shift_parallel=True,
                               shift_threshold=4, max_num_seqs=1)
    modes = step_modes(trace)
    assert "ST" in modes and "TS" in modes, modes
    assert_same(outs, smollm2_single_rank)


def test_sequence_parallel_refusals(checkpoints):
    """Refused at start, before any rank is spawned, with the degrees and the heads in the message."""
    folder, _ = checkpoints["llama"]  # 9 query / 3 KV heads
    with pytest.raises(ValueError, match="shift_parallel needs sequence_parallel_size > 1"):
        LLM(folder, shift_parallel=True)
    with pytest.raises(ValueError, match=r"sequence_parallel_size \(2\) with pipeline_parallel_size \(2\)"):
        LLM(folder, sequence_parallel_size=2, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match=r"sequence_parallel_size \(2\) x tensor_parallel_size \(5\) = 10 ranks split "
                                         r"the model's 9 attention heads \(3 KV heads\)"):
        LLM(folder, sequence_parallel_size=2, tensor_parallel_size=5, device="cpu")
    with pytest.raises(ValueError, match=r"sampling_parallel with sequence_parallel_size \(2\) x tensor_parallel_size"):
        LLM(folder, sequence_parallel_size=2, tensor_parallel_size=2, sampling_parallel=True)
