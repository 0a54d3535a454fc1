"""TP=2 and TP=3 over real gloo processes give the single-rank run's tokens and logprobs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import random_prompts
from plait import LLM, SamplingParams
from plait.parallel.tensor import TensorParallel, split_range

PARAMS = SamplingParams(temperature=0, max_tokens=10, logprobs=3, prompt_logprobs=2, ignore_eos=True)


def run(folder: str | None, tp: int, prompts, **kw):
    llm = LLM(folder, tensor_parallel_size=tp, dtype="float32", device="cpu", max_model_len=256, **kw)
    try:
        return llm.generate(prompts, PARAMS, use_tqdm=False)
    finally:
        llm.shutdown()


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


OVERLAP = dict(token_split_overlap=True, overlap_min_tokens=4)


@pytest.mark.parametrize("family,tp,kw", [("llama", 2, {}), ("qwen2", 3, {}), ("llama", 2, OVERLAP)],
                         ids=["llama-tp2", "qwen2-tp3", "llama-tp2-split"])
def test_all_reduce_left_to_the_norm_matches_single_rank(checkpoints, family, tp, kw):
    """--fused-allreduce-norm on: row-parallel layers skip their all-reduce and the next norm does it (on CPU the
    gloo path of the same layer code: all-reduce, then add + norm). With the token-split overlap every step of 4
    tokens or more runs as two halves interleaved seam by seam, prompts cut mid-way: the tokens must not change."""
    folder, _ = checkpoints[family]
    prompts = random_prompts(4, seed=10 + tp)
    assert_same(run(folder, tp, prompts, fused_allreduce_norm="on", **kw), run(folder, 1, prompts))


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
