"""Pipeline parallelism (and TP x PP) over real gloo processes gives the single-rank run's tokens and logprobs."""

from __future__ import annotations

import pytest

from conftest import make_checkpoint, random_prompts
from plait import LLM, SamplingParams
from plait.parallel.pipeline import check_pipeline, stage_layers
from test_tensor_parallel import PARAMS, assert_same


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("six_layers")
    make_checkpoint(folder, "llama", num_layers=6)  # 9 heads / 3 KV heads: uneven TP inside each stage
    return str(folder)


@pytest.fixture(scope="module")
def reference(six_layers):
    prompts = random_prompts(6, seed=11)
    llm = LLM(six_layers, dtype="float32", device="cpu", max_model_len=256)
    try:
        return prompts, llm.generate(prompts, PARAMS, use_tqdm=False)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("tp,pp,partition", [(1, 2, None), (1, 3, None), (2, 2, None), (1, 2, "1,5")])
def test_pipeline_matches_single_rank(six_layers, reference, tp, pp, partition):
    prompts, expected = reference
    llm = LLM(six_layers, tensor_parallel_size=tp, pipeline_parallel_size=pp, pp_layer_partition=partition,
              dtype="float32", device="cpu", max_model_len=256)
    try:
        assert_same(llm.generate(prompts, PARAMS, use_tqdm=False), expected)
    finally:
        llm.shutdown()


def test_many_requests_through_two_stages_all_finish_as_alone(six_layers):
    """64 requests, micro-batches in flight, a cache small enough to preempt: each output equals its solo run."""
    prompts = random_prompts(64, lo=3, hi=30, seed=3)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(six_layers, pipeline_parallel_size=2, dtype="float32", device="cpu", max_model_len=64,
              block_size=4, num_gpu_blocks_override=48)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    finally:
        llm.shutdown()
    solo = LLM(six_layers, dtype="float32", device="cpu", max_model_len=64)
    try:
        for prompt, out in zip(prompts[:8], outs[:8]):
            assert out.outputs[0].token_ids == solo.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in solo.generate(prompts, params, use_tqdm=False)]
    finally:
        solo.shutdown()


def test_stage_partition_and_its_errors():
    assert stage_layers(30, 3, None) == [range(0, 10), range(10, 20), range(20, 30)]
    assert stage_layers(6, 2, (1, 5)) == [range(0, 1), range(1, 6)]
    with pytest.raises(ValueError, match="do not divide into 4 pipeline stages; give --pp-layer-partition"):
        check_pipeline(30, 4, None)
    with pytest.raises(ValueError, match="must give every stage at least one layer and sum to the model's 30 layers"):
        check_pipeline(30, 2, (10, 10))
    with pytest.raises(ValueError, match="larger than the model's 6 layers"):
        check_pipeline(6, 8, None)
