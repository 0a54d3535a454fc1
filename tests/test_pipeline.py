"""Pipeline parallelism (and TP x PP) over real gloo processes gives the single-rank run's tokens and logprobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_checkpoint, random_prompts, rank_pids
from plait import LLM, SamplingParams
from plait.parallel.pipeline import check_pipeline, stage_layers
from test_multinode import char_tokenizer, text_of
from test_tensor_parallel import PARAMS, assert_same

LONG_RUN = [5, 17, 42, 99, 7]  # the prompt the six-layer checkpoint continues for 480 tokens without an EOS


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


MANY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def many_requests(six_layers):
    """64 random prompts, their tokens from one rank in one batch, and the first 8's from one rank, each alone."""
    prompts = random_prompts(64, lo=3, hi=30, seed=3)
    solo = LLM(six_layers, dtype="float32", device="cpu", max_model_len=64)
    try:
        batched = [o.outputs[0].token_ids for o in solo.generate(prompts, MANY, use_tqdm=False)]
        alone = [solo.generate([p], MANY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:8]]
    finally:
        solo.shutdown()
    return prompts, batched, alone


@pytest.mark.parametrize("layout", [dict(pipeline_parallel_size=2),
                                    dict(tensor_parallel_size=2, pipeline_parallel_size=2),
                                    dict(data_parallel_size=2)], ids=["pp2", "tp2xpp2", "dp2"])
def test_many_requests_all_finish_as_alone(six_layers, many_requests, layout):
    """64 requests, micro-batches in flight (or replicas side by side), a cache small enough to preempt: each output
    equals its single-rank run, and every KV block comes back."""
    prompts, batched, alone = many_requests
    llm = LLM(six_layers, **layout, dtype="float32", device="cpu", max_model_len=64, block_size=4,
              num_gpu_blocks_override=48)
    try:
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, MANY, use_tqdm=False)]
        engines = getattr(llm.engine, "replicas", [llm.engine])
        assert all(e.blocks.num_free == e.blocks.num_blocks for e in engines)
    finally:
        llm.shutdown()
    assert outs[:8] == alone and outs == batched


def test_stage_partition_and_its_errors():
    assert stage_layers(30, 3, None) == [range(0, 10), range(10, 20), range(20, 30)]
    assert stage_layers(6, 2, (1, 5)) == [range(0, 1), range(1, 6)]
    with pytest.raises(ValueError, match="do not divide into 4 pipeline stages; give --pp-layer-partition"):
        check_pipeline(30, 4, None)
    with pytest.raises(ValueError, match="must give every stage at least one layer and sum to the model's 30 layers"):
        check_pipeline(30, 2, (10, 10))
    with pytest.raises(ValueError, match="larger than the model's 6 layers"):
        check_pipeline(6, 8, None)


def test_data_parallel_replicas_match_single_rank(six_layers, reference):
    prompts, expected = reference
    llm = LLM(six_layers, data_parallel_size=2, dtype="float32", device="cpu", max_model_len=256)
    try:
        replicas = llm.engine.replicas
        assert len(replicas) == 2
        assert_same(llm.generate(prompts, PARAMS, use_tqdm=False), expected)
        assert all(r.blocks.num_free == r.blocks.num_blocks for r in replicas)
    finally:
        llm.shutdown()


def test_data_parallel_routes_to_the_least_loaded_replica(six_layers):
    llm = LLM(six_layers, data_parallel_size=2, dtype="float32", device="cpu", max_model_len=256)
    try:
        engine = llm.engine
        long = SamplingParams(max_tokens=100, ignore_eos=True)
        engine.add_request([1] * 50, long, "a")
        engine.add_request([1] * 5, SamplingParams(max_tokens=5), "b")
        engine.add_request([1] * 5, SamplingParams(max_tokens=5), "c")
        assert engine.owner["a"] is not engine.owner["b"] and engine.owner["c"] is engine.owner["b"]
        engine.abort_request("a")
        engine.abort_request("b")
        engine.abort_request("c")
        assert not engine.has_unfinished_requests()
    finally:
        llm.shutdown()


def test_a_rank_that_dies_mid_run_fails_the_job_fast_naming_it(six_layers):
    from plait.executor.executor import RankFailure

    llm = LLM(six_layers, pipeline_parallel_size=2, dtype="float32", device="cpu", max_model_len=256)
    engine = llm.engine
    try:
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
        engine.step()
        procs = list(engine.executor.procs)
        os.kill(procs[1].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RankFailure, match="rank 1 exited with code"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - start < 30
        assert not any(p.is_alive() for p in procs)  # the others were stopped, not left hanging
    finally:
        llm.shutdown()


def test_generate_exits_non_zero_naming_a_rank_killed_mid_run(tmp_path):
    """`plait generate --pp 2` as users run it: SIGKILL the last stage's rank once text streams, and the command
    exits 1 within seconds with one line naming that rank, its other rank stopped, instead of hanging."""
    make_checkpoint(tmp_path, "llama", num_layers=6)
    char_tokenizer(tmp_path)
    cmd = [sys.executable, "-m", "plait.cli", "generate", str(tmp_path), "--device", "cpu", "--dtype", "float32",
           "--max-model-len", "512", "--pp", "2", "--max-tokens", "480", "--prompt", text_of(LONG_RUN)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    try:
        assert proc.stdout.read(1)  # the first token: the run is under way (480 tokens take seconds more)
        ranks = rank_pids(proc.pid)
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)
        start = time.monotonic()
        out, err = proc.communicate(timeout=60)
        assert time.monotonic() - start < 30
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert len(out) < 479  # it stopped mid-run
    assert "plait: rank 1 exited with code -9 without answering" in err and "Traceback" not in err, err
    assert not any(os.path.exists(f"/proc/{pid}") for pid in ranks)


def test_a_port_in_use_is_refused_with_its_number(six_layers):
    from plait.executor.rendezvous import host_store

    taken = host_store(None)  # another run's rendezvous
    with pytest.raises(ValueError, match=f"master_port {taken.port} is already in use"):
        host_store(taken.port)
