"""TP=2 and TP=3 over real gloo processes give the single-rank run's tokens and logprobs; the token-split overlap and
the communication-removed ablation show in the communication profiler's records that they ran."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from conftest import random_prompts
from plait import LLM, SamplingParams
from plait.comm.profiler import RankTrace
from plait.comm.trace import collect
from plait.parallel.tensor import TensorParallel, split_range

PARAMS = SamplingParams(temperature=0, max_tokens=10, logprobs=3, prompt_logprobs=2, ignore_eos=True)


def run(folder: str | None, tp: int, prompts, **kw):
    llm = LLM(folder, tensor_parallel_size=tp, dtype="float32", device="cpu", max_model_len=256, **kw)
    try:
        return llm.generate(prompts, PARAMS, use_tqdm=False)
    finally:
        llm.shutdown()


def run_profiled(folder: str, tp: int, prompts, **kw) -> tuple[list, RankTrace]:
    """The outputs, and rank 0's record of every collective it ran (the communication profiler)."""
    llm = LLM(folder, tensor_parallel_size=tp, dtype="float32", device="cpu", max_model_len=256, profile_comm=True,
              **kw)
    try:
        outs = llm.generate(prompts, PARAMS, use_tqdm=False)
        return outs, collect(llm.engine).ranks[0]
    finally:
        llm.shutdown()


def reduced_rows(trace: RankTrace, step: int, hidden: int) -> Counter:
    """module -> rows of each all-reduce it issued in that step (fp32)."""
    rows = Counter()
    for r in trace.records:
        if r.step == step and r.op == "all_reduce":
            rows[r.module, r.bytes // (4 * hidden)] += 1
    return rows


def assert_same(a, b, atol: float = 1e-4) -> None:
    for x, y in zip(a, b, strict=True):
        cx, cy = x.outputs[0], y.outputs[0]
        assert cx.token_ids == cy.token_ids
        for px, py in zip(cx.logprobs, cy.logprobs, strict=True):
            assert px.keys() == py.keys()
            torch.testing.assert_close(torch.tensor([v.logprob for v in px.values()]),
                                       torch.tensor([v.logprob for v in py.values()]), atol=atol, rtol=0)
        for px, py in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:], strict=True):
            torch.testing.assert_close(torch.tensor([v.logprob for v in px.values()]),
                                       torch.tensor([v.logprob for v in py.values()]), atol=atol, rtol=0)


@pytest.mark.parametrize("family,tp", [("llama", 2), ("llama", 3), ("qwen2", 3), ("qwen3", 2), ("llama3", 3)])
def test_tp_matches_single_rank(checkpoints, family, tp):
    folder, _ = checkpoints[family]
    prompts = random_prompts(5, seed=tp)
    assert_same(run(folder, tp, prompts), run(folder, 1, prompts))


@pytest.mark.parametrize("family,tp", [("llama", 2), ("qwen2", 3)], ids=["llama-tp2", "qwen2-tp3"])
def test_all_reduce_left_to_the_norm_matches_single_rank(checkpoints, family, tp):
    """--fused-allreduce-norm on: row-parallel layers skip their all-reduce and the next norm does it (on CPU the
    gloo path of the same layer code: all-reduce, then add + norm)."""
    folder, _ = checkpoints[family]
    prompts = random_prompts(4, seed=10 + tp)
    assert_same(run(folder, tp, prompts, fused_allreduce_norm="on"), run(folder, 1, prompts))


def test_token_split_overlap_runs_two_halves_and_matches_single_rank(checkpoints):
    """With the token-split overlap every step of 4 tokens or more runs as two halves interleaved seam by seam,
    prompts cut mid-way: the tokens must not change, and the profiler must show each reducing module's all-reduce
    twice per step, once per half (T // 2 rows, then the rest) instead of once over all T rows."""
    folder, hf = checkpoints["llama"]
    prompts = random_prompts(4, seed=12)
    outs, trace = run_profiled(folder, 2, prompts, fused_allreduce_norm="on", token_split_overlap=True,
                               overlap_min_tokens=4)
    assert_same(outs, run(folder, 1, prompts))
    # 2 layers: the embedding's sum, then each norm that finishes a row-parallel sum (the first layer's input norm
    # gets the whole embedding and reduces nothing)
    modules = ["embed_tokens", "layers.0.post_attention_layernorm", "layers.1.input_layernorm",
               "layers.1.post_attention_layernorm", "norm"]
    assert trace.steps and all(s.tokens >= 4 for s in trace.steps)  # 4 prompts, then 4 decodes a step
    for s in trace.steps:
        halves = (s.tokens // 2, s.tokens - s.tokens // 2)
        want = Counter((m, n) for m in modules for n in halves)
        assert reduced_rows(trace, s.step, hf.config.hidden_size) == want, f"step {s.step} of {s.tokens} tokens"


def test_skip_all_reduce_runs_without_communication_and_changes_the_outputs(checkpoints):
    """--skip-all-reduce (the communication-removed ablation) at TP=2 over gloo: the run finishes, no rank issues a
    single all-reduce (the LM head's all-gather stays: sampling needs every vocabulary shard), and the outputs,
    made of partial sums, differ from those of the real TP=2 run."""
    folder, _ = checkpoints["llama"]
    prompts = random_prompts(4, seed=13)
    real, real_trace = run_profiled(folder, 2, prompts)
    skipped, skip_trace = run_profiled(folder, 2, prompts, skip_all_reduce=True)
    assert {r.op for r in real_trace.records} == {"all_reduce", "all_gather"}
    assert {r.op for r in skip_trace.records} == {"all_gather"}
    assert len(skip_trace.steps) == len(real_trace.steps)
    assert any(a.outputs[0].token_ids != b.outputs[0].token_ids for a, b in zip(real, skipped, strict=True))


@pytest.mark.slow
def test_smollm2_tp2_matches_single_rank():
    prompts = [[1, 504, 3575, 282, 4649, 314], [1, 9690, 198, 2683, 359, 253, 5356]]
    assert_same(run(None, 2, prompts), run(None, 1, prompts))


def test_uneven_head_split_keeps_the_kv_heads_each_rank_reads():
    # SmolLM2's 9 query / 3 KV heads over 2 ranks: rank 0 holds q 0-4 (KV 0-1), rank 1 holds q 5-8 (KV 1-2).
    shards = []
    for rank in range(2):
        plan = TensorParallel(SimpleNamespace(rank=rank, size=2))
        shards.append(plan.heads(9, 3))
    assert [(s.q_start, s.q_end, s.kv_start, s.kv_end) for s in shards] == [(0, 5, 0, 2), (5, 9, 1, 3)]
    assert shards[1].kv_index() == [0, 1, 1, 1]
    assert [split_range(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
