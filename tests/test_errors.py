"""Bad input fails early with a ValueError that names the problem, and leaves the engine usable."""

from __future__ import annotations

import multiprocessing
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from plait import LLM, SamplingParams

GOOD_PROMPT = [5, 17, 42, 99]
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def make_llm(folder, **kw) -> LLM:
    return LLM(folder, **{"dtype": "float32", "device": "cpu", "max_model_len": 64, "num_gpu_blocks_override": 64, **kw})


@pytest.fixture(scope="module")
def folder(checkpoints):
    return checkpoints["llama"][0]


@pytest.fixture(scope="module")
def llm(folder):
    return make_llm(folder)


@pytest.fixture(scope="module")
def expected(llm):
    return llm.generate([GOOD_PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def assert_usable(llm: LLM, expected: list[int]) -> None:
    """Nothing of the failed call is left behind, and a good request still gives the same tokens."""
    engine = llm.engine
    assert not engine.has_unfinished_requests() and not engine.schedulers[0].has_work()
    bm = engine.blocks
    bm.check_invariants()
    assert bm.num_free == bm.num_blocks
    out = llm.generate([GOOD_PROMPT], GREEDY, use_tqdm=False)[0]
    assert out.finished and out.outputs[0].token_ids == expected and len(expected) == 4


# --- request errors on a working engine --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, match",
    [
        ({"prompt_token_ids": []}, "prompt is empty"),
        ([[]], "prompt is empty"),
        ([list(range(64))], r"the prompt has 64 tokens; max_model_len is 64"),
        ([list(range(100))], r"the prompt has 100 tokens; max_model_len is 64"),
        ([[1, 2, 256]], r"prompt token ids \[256\] are outside the vocabulary \[0, 256\)"),
        ([[-1, 3]], r"prompt token ids \[-1\] are outside the vocabulary"),
        (["hello"], "no tokenizer"),
    ],
    ids=["empty-dict", "empty-list", "at-max-model-len", "over-max-model-len", "id-too-big", "id-negative", "text-without-tokenizer"],
)
def test_bad_prompt(llm, expected, prompt, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    assert_usable(llm, expected)


def test_bad_prompt_through_add_request(llm, expected):
    engine = llm.engine
    for prompt, match in [([], "prompt is empty"), (list(range(70)), "max_model_len is 64"), ([300], "outside the vocabulary")]:
        with pytest.raises(ValueError, match=match):
            engine.add_request(prompt, GREEDY, request_id="bad")
        assert "bad" not in engine.requests
    assert_usable(llm, expected)


def test_longest_allowed_prompt_works(llm):
    out = llm.generate([list(range(63))], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 1


def test_duplicate_request_id(llm, expected):
    engine = llm.engine
    engine.add_request(GOOD_PROMPT, GREEDY, request_id="dup")
    with pytest.raises(ValueError, match="'dup' is already in use"):
        engine.add_request(GOOD_PROMPT, GREEDY, request_id="dup")
    while engine.has_unfinished_requests():
        outs = engine.step()
    assert outs[0].request_id == "dup" and outs[0].outputs[0].token_ids == expected
    assert_usable(llm, expected)


@pytest.mark.parametrize(
    "bad",
    [[GOOD_PROMPT, [], GOOD_PROMPT], [GOOD_PROMPT, list(range(200)), GOOD_PROMPT], [GOOD_PROMPT, GOOD_PROMPT, [7, 9999]]],
    ids=["empty", "too-long", "bad-id"],
)
def test_one_bad_prompt_fails_the_whole_batch_before_anything_runs(llm, expected, bad):
    engine = llm.engine
    before = set(engine.requests)
    with pytest.raises(ValueError):
        llm.generate(bad, GREEDY, use_tqdm=False)
    assert engine.requests.keys() == before == set()
    assert not engine.has_unfinished_requests()
    assert not engine.schedulers[0].waiting and not engine.schedulers[0].running
    assert_usable(llm, expected)


def test_sampling_params_count_must_match_prompts(llm, expected):
    with pytest.raises(ValueError, match="got 2 prompts but 3 sampling params"):
        llm.generate([GOOD_PROMPT, GOOD_PROMPT], [GREEDY] * 3, use_tqdm=False)
    assert_usable(llm, expected)


# --- sampling parameters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
        (dict(max_tokens=-3), "max_tokens must be >= 1, got -3"),
        (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_k=-2), "top_k must be -1"),
        (dict(n=0), "n must be >= 1"),
        (dict(min_tokens=5, max_tokens=2), r"min_tokens \(5\) must be <= max_tokens \(2\)"),
        (dict(stop=[""]), "stop strings must not be empty"),
    ],
)
def test_bad_sampling_params(llm, expected, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
    assert_usable(llm, expected)


def test_edge_sampling_params_are_accepted(llm):
    for params in [SamplingParams(top_p=1.0, max_tokens=1), SamplingParams(temperature=0.0, max_tokens=1), SamplingParams(top_p=1e-3, max_tokens=1)]:
        out = llm.generate([GOOD_PROMPT], params, use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 1


# --- engine construction -----------------------------------------------------------------------------------------


def _copy_with(folder: str, dst, change) -> str:
    """A copy of the checkpoint folder whose safetensors tensors went through `change(dict)`."""
    shutil.copytree(folder, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    os.remove(path)
    save_file(tensors, path, metadata={"format": "pt"})
    return str(dst)


def test_unknown_model_path(tmp_path, llm, expected):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="no-such-model.* is not a file, a folder or a preset"):
        LLM(missing, device="cpu")
    with pytest.raises(ValueError, match="has no config.json"):
        LLM(str(tmp_path), device="cpu")
    assert_usable(llm, expected)


def test_checkpoint_missing_a_tensor(folder, tmp_path, llm, expected):
    name = "model.layers.1.mlp.down_proj.weight"
    broken = _copy_with(folder, tmp_path / "missing", lambda t: t.pop(name))
    # (the message names it "layers.1.mlp.down_proj.down_proj.weight" today: plait/models/weights.py repeats the leaf)
    with pytest.raises(ValueError, match=r"checkpoint is missing 1 tensor\(s\), e\.g\. layers\.1\.mlp\.down_proj\."):
        make_llm(broken)
    assert_usable(llm, expected)


def test_checkpoint_with_a_misshaped_tensor(folder, tmp_path, llm, expected):
    name = "model.layers.0.self_attn.k_proj.weight"

    def reshape(t):
        t[name] = torch.zeros(t[name].shape[0] + 8, t[name].shape[1])

    broken = _copy_with(folder, tmp_path / "misshaped", reshape)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(32, 72\), the config implies \(24, 72\)"):
        make_llm(broken)
    assert_usable(llm, expected)


def test_checkpoint_with_an_unexpected_tensor(folder, tmp_path, llm, expected):
    broken = _copy_with(folder, tmp_path / "extra", lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(100, 72)}))
    with pytest.raises(ValueError, match="'model.layers.9.mlp.up_proj.weight' has no place"):
        make_llm(broken)
    assert_usable(llm, expected)


def test_good_copy_of_the_checkpoint_loads(folder, tmp_path, expected):
    """The control for the three tests above: the copy itself is fine."""
    same = _copy_with(folder, tmp_path / "same", lambda t: None)
    assert make_llm(same).generate([GOOD_PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected


def test_tensor_parallel_larger_than_heads(folder, llm, expected):
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(10\) is larger than the model's attention heads \(9"):
        make_llm(folder, tensor_parallel_size=10)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1, got 0"):
        make_llm(folder, tensor_parallel_size=0)
    assert_usable(llm, expected)


def test_unknown_llm_argument(folder, llm, expected):
    with pytest.raises(ValueError, match=r"unknown LLM argument\(s\) \['max_batch_size'\]"):
        make_llm(folder, max_batch_size=8)
    assert_usable(llm, expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dtype="fp8"), "dtype must be one of"),
        (dict(device="tpu"), "device must be cpu, cuda or auto"),
        (dict(max_model_len=1000), r"max_model_len \(1000\) exceeds the model's max_position_embeddings \(512\)"),
        (dict(num_gpu_blocks_override=3, block_size=16), r"KV cache holds 48 tokens .* fewer than max_model_len \(64\)"),
        (dict(enable_chunked_prefill=False, max_num_batched_tokens=32), r"without chunked prefill max_num_batched_tokens \(32\)"),
        (dict(max_num_seqs=0), "max_num_seqs must be >= 1"),
        (dict(fused_allreduce_norm="yes"), "fused_allreduce_norm must be auto, on or off"),
        (dict(fused_allreduce_norm="on", pipeline_parallel_size=2), r"fused_allreduce_norm='on' needs pipeline_parallel_size 1"),
        (dict(token_split_overlap=True, fused_allreduce_norm="off"), "token_split_overlap needs fused_allreduce_norm auto or on"),
        (dict(token_split_overlap=True, overlap_min_tokens=1), r"overlap_min_tokens must be >= 2"),
    ],
)
def test_bad_engine_config(folder, llm, expected, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_llm(folder, **kwargs)
    assert_usable(llm, expected)


@pytest.mark.parametrize("changes, visible, env, match", [
    (dict(tensor_parallel_size=2), 1, "0", r"^dp 1 x pp 1 x tp 2 x sp 1 = 2 ranks on this machine, but 1 GPU\(s\) visible "
                                           r"here \(CUDA_VISIBLE_DEVICES '0'\): each rank needs a GPU of its own"),
    (dict(data_parallel_size=2), 1, None, r"dp 2 x pp 1 x tp 1 x sp 1 = 2 ranks on this machine, .*but 1 GPU\(s\) visible here "
                                          r"\(CUDA_VISIBLE_DEVICES unset\)"),
    (dict(data_parallel_size=2, pipeline_parallel_size=2, tensor_parallel_size=2), 4, None, "= 8 ranks on this machine"),
    (dict(sequence_parallel_size=2, tensor_parallel_size=2), 0, "",
     r"sp 2 = 4 ranks .* 0 GPU\(s\) visible here \(CUDA_VISIBLE_DEVICES ''\)"),
    (dict(pipeline_parallel_size=2, tensor_parallel_size=4, nnodes=2, master_port=1234), 2, None,
     r"dp 1 x pp 2 x tp 4 x sp 1 = 8 ranks over nnodes 2 = 4 per node, but 2 GPU\(s\) visible here"),
])
def test_more_ranks_on_a_machine_than_gpus_is_refused(changes, visible, env, match):
    from plait.config import EngineConfig
    from plait.executor.executor import check_gpus

    cfg = EngineConfig(**changes)
    ranks = cfg.parallel.world_size // cfg.nnodes  # this machine's: every replica's, or this node's share
    with pytest.raises(ValueError, match=match):
        check_gpus(cfg, ranks, visible, env)
    check_gpus(cfg, ranks, ranks, env)  # one GPU per rank is enough


def test_a_replica_placed_past_the_visible_gpus_is_refused():
    """A replica's ranks take the GPUs after the replicas before it (the executor's device offset): the message says
    so, rather than claim its own ranks alone outnumber the GPUs."""
    from plait.config import EngineConfig
    from plait.executor.executor import check_gpus

    with pytest.raises(ValueError, match=r"^dp 1 x pp 1 x tp 2 x sp 1 = 2 ranks on this machine after its first 2 GPU\(s\), "
                                         r"but 3 GPU\(s\) visible here"):
        check_gpus(EngineConfig(tensor_parallel_size=2), 4, 3, None)


def test_a_failed_start_up_leaves_no_rank_running(folder, llm, expected):
    """The KV cache is sized after the ranks have started and loaded the model: when it is too small, the error comes
    after the two ranks' processes are stopped, not left holding their memory until the interpreter exits."""
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        make_llm(folder, tensor_parallel_size=2, num_gpu_blocks_override=3, block_size=16)
    assert not [p for p in multiprocessing.active_children() if p not in before and p.is_alive()]
    assert_usable(llm, expected)


# --- with the real tokenizer (the embedded SmolLM2; loaded once) -------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    llm = LLM(device="cpu", max_model_len=256, num_gpu_blocks_override=64)
    yield llm
    llm.shutdown()


def test_empty_text_prompt_with_a_tokenizer(smollm2):
    assert smollm2.get_tokenizer().encode("") == []  # so "" really reaches the empty-prompt check
    for prompt in ("", [""], {"prompt": ""}):
        with pytest.raises(ValueError, match="prompt is empty"):
            smollm2.generate(prompt, GREEDY, use_tqdm=False)
        assert not smollm2.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 49152\)"):
        smollm2.generate([[1, 49152]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len is 256"):
        smollm2.generate("word " * 300, GREEDY, use_tqdm=False)
    out = smollm2.generate("The capital of France is", GREEDY, use_tqdm=False)[0]
    assert out.finished and len(out.outputs[0].token_ids) == 4 and out.outputs[0].text
    assert not smollm2.engine.has_unfinished_requests()
    assert smollm2.engine.blocks.num_free == smollm2.engine.blocks.num_blocks
