"""Parallel Track models: plait on 1, 2, 3 and 4 gloo ranks against the training code's plain PyTorch forward
(the reference definition), `plait serve` against LLM.generate, the exact collectives of a forward, the layouts, the
presets, and a short training run whose checkpoint plait serves with the trainer's logits."""

from __future__ import annotations

import multiprocessing as mp
import pathlib
import sys
from collections import Counter

import numpy as np
import openai
import pytest
import torch
import torch.distributed as dist

from conftest import assert_generations_match, random_prompts
from server_process import ServerProcess
from plait import LLM, SamplingParams
from plait.comm.communicator import Communicator
from plait.config import ParallelConfig
from plait.executor.executor import free_port
from plait.layers.attention import AttentionMetadata
from plait.layers.grouped import GroupedHeadNorm
from plait.layers.norm import RMSNorm
from plait.models.loader import iter_weights, load_hf_config, resolve_model
from plait.models.presets import preset_config
from plait.models.registry import build_model, model_config_from_hf
from plait.models.weights import load_weights
from plait.parallel.tensor import TensorParallel
from plait.parallel.track import TrackLayout, check_track_parallel
from plait.plan.collectives import rank_collectives
from plait.plan.shapes import Layout, load_model_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the training code of the quality study is the reference: benchmarks/pt_quality
from benchmarks.pt_quality.model import PTConfig, PTModel, save_checkpoint  # noqa: E402
from benchmarks.pt_quality.train import TrainConfig, train  # noqa: E402

# Two tiny PT models. "t2": 3 query heads and 1 KV head per track, so 2 ranks per track split heads unevenly and
# both hold the KV head. "t4": 4 tracks of 2 heads, summed, meeting every 2 layers.
MODELS = {
    "t2": PTConfig(hidden_size=48, num_layers=4, num_heads=6, num_kv_heads=2, intermediate_size=96, num_tracks=2,
                   block_depth=1, combine="mean"),
    "t4": PTConfig(hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=96, num_tracks=4,
                   block_depth=2, combine="sum"),
}
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def pt_models(tmp_path_factory):
    """name -> (checkpoint folder, reference model)."""
    out = {}
    for name, cfg in MODELS.items():
        torch.manual_seed(1)
        model = PTModel(cfg).eval()
        model.reset_parameters(std=0.2)  # wide weights: peaked logits, so greedy choices are stable
        folder = tmp_path_factory.mktemp(name)
        save_checkpoint(model, str(folder))
        out[name] = (str(folder), model)
    return out


@torch.no_grad()
def reference(model: PTModel, prompt: list[int], max_tokens: int):
    """Greedy continuation by full forwards, then every token's logprob from one forward over the whole text."""
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    n = len(prompt)
    return ids[n:], logprobs[torch.arange(n - 1, len(ids) - 1), ids[n:]], logprobs[torch.arange(n - 1), prompt[1:]]


@pytest.mark.parametrize("name,ranks,budget", [("t2", 1, None), ("t4", 1, 16), ("t2", 2, 16), ("t2", 4, None),
                                               ("t4", 2, None), ("t4", 3, 16), ("t4", 4, None)])
def test_pt_matches_the_reference(pt_models, name, ranks, budget):
    """1 rank: all tracks (2 or 4 side by side); 2 ranks of t2 and 4 ranks of t4: a track each; 4 ranks of t2: each
    track tensor-parallel over 2; t4 on 2 and 3 ranks: several tracks per rank (2+2, 2+1+1). A budget of 16 tokens
    chunks the prompts' prefill."""
    folder, model = pt_models[name]
    prompts = random_prompts(4, lo=3, hi=30, seed=ranks)
    llm = LLM(folder, tensor_parallel_size=ranks, dtype="float32", device="cpu", max_model_len=64,
              max_num_batched_tokens=budget)
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0, prompt_logprobs=0, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.shutdown()
    assert_generations_match(prompts, outs, lambda prompt: reference(model, prompt, MAX_TOKENS), atol=1e-4)


def test_plait_serve_answers_as_llm_generate(pt_models, tmp_path):
    """`plait serve --tp 2` on t2 (a track per rank): a greedy /v1/completions gives LLM.generate's tokens. The
    checkpoint is byte-level with no tokenizer, so the prompt goes as ids and the text is empty: the tokens are
    compared by their logprobs (a different token at any step would give a different logprob there)."""
    folder, _ = pt_models["t2"]
    prompt = random_prompts(1, lo=12, hi=13, seed=5)[0]
    llm = LLM(folder, dtype="float32", device="cpu", max_model_len=64)
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
        (expected,) = llm.generate([prompt], params, use_tqdm=False)[0].outputs
    finally:
        llm.shutdown()
    srv = ServerProcess(tmp_path / "server.log", "--model", folder, "--served-model-name", "pt", "--tp", "2",
                        "--max-model-len", "64")
    try:
        srv.wait_healthy()
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        (choice,) = client.completions.create(model="pt", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                              logprobs=0, extra_body={"ignore_eos": True}).choices
    finally:
        srv.stop()
    assert choice.text == expected.text == "" and choice.finish_reason == "length"
    wanted = [position[token].logprob for token, position in zip(expected.token_ids, expected.logprobs)]
    np.testing.assert_allclose(choice.logprobs.token_logprobs, wanted, atol=1e-4, rtol=0)


def plait_logits(folder: str, comm: Communicator, ids: list[int]) -> torch.Tensor:
    """One prefill through plait's model as the runner builds it, without the engine: logits [len(ids), vocab]."""
    src = resolve_model(folder)
    model = build_model(model_config_from_hf(load_hf_config(src)), TensorParallel(comm), 64)
    load_weights(model, iter_weights(src))
    n, blocks = len(ids), -(-len(ids) // 16)
    for attn in model.attention_layers():
        attn.kv_cache = torch.zeros(2, blocks, 16, attn.num_kv_heads, attn.head_dim)
    meta = AttentionMetadata(slot_mapping=torch.arange(n), query_start=torch.tensor([0, n]), seq_lens=torch.tensor([n]),
                             block_tables=torch.arange(blocks)[None], max_query_len=n, max_seq_len=n)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), meta.prepare_reference(16)))


class CountingRecorder:
    """A recorder (the communicator's CommRecorder protocol) that only lists (op, bytes, group size)."""

    def __init__(self):
        self.calls: list[tuple[str, int, int]] = []

    def begin(self, comm: Communicator, op: str, t: torch.Tensor, peer: int | None) -> None:
        self.calls.append((op, t.numel() * t.element_size(), comm.size))

    def end(self, record) -> None:
        raise AssertionError("begin returns no record to end")


def _collectives_worker(rank: int, world: int, port: int, folders: list[str], ids: list[int], queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    comm = Communicator(dist.group.WORLD, rank, world)
    for folder in folders:
        comm.recorder = CountingRecorder()  # sub-groups record into their parent's recorder
        logits = plait_logits(folder, comm, ids)
        queue.put((folder, rank, comm.recorder.calls, logits))
    dist.barrier()
    dist.destroy_process_group()


def test_a_forward_runs_one_all_reduce_per_block(pt_models):
    """4 ranks. t4 (a track per rank): the embedding's all-reduce, one per block (L/D = 2, not TP's 2L = 8) and the
    LM head's gather. t2 (a track over 2 ranks): the track's own 2 per layer and the L/D = 4 combines, in pairs.
    The planner's model of them is exact."""
    ids = random_prompts(1, lo=20, hi=21, seed=7)[0]
    folders = [pt_models[name][0] for name in ("t4", "t2")]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_collectives_worker, args=(r, 4, port, folders, ids, queue)) for r in range(4)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=120) for _ in range(4 * len(folders))]
    finally:  # a rank that failed leaves the others waiting in a collective
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    expected = {
        folders[0]: {("all_reduce", 4): 1 + 2, ("all_gather", 4): 1},
        folders[1]: {("all_reduce", 4): 1, ("all_reduce", 2): 2 * 4 + 4, ("all_gather", 4): 1},
    }
    for folder, rank, calls, logits in results:
        assert Counter((op, size) for op, _, size in calls) == expected[folder], f"rank {rank}, {folder}"
        # the analytical model (plait.plan) predicts the same collectives, in order, byte for byte
        predicted = rank_collectives(load_model_config(folder), Layout(4), rank, len(ids), len(ids), itemsize=4)
        assert calls == [(c.op, c.bytes, c.group_size) for c in predicted], f"rank {rank}, {folder}"
        ref = dict((f, m) for f, m in pt_models.values())[folder]
        torch.testing.assert_close(logits, ref(torch.tensor([ids]))[0].detach(), atol=1e-4, rtol=0)


def test_grouped_head_norm_gives_each_track_its_own_weights():
    """Qwen3's q/k norm over the local tracks' heads side by side (track-major): each track's heads take its weight."""
    tracks, heads, D = range(2, 5), 2, 8
    norm = GroupedHeadNorm(tracks, D, 1e-6)
    norm.weight.data = torch.rand(len(tracks), 1, D) + 0.5
    q = torch.randn(5, len(tracks) * heads, D)
    one = RMSNorm(D, 1e-6)
    expected = []
    for s in range(len(tracks)):
        one.weight.data = norm.weight.data[s, 0]
        expected.append(one(q[:, s * heads : (s + 1) * heads]))
    torch.testing.assert_close(norm(q), torch.cat(expected, dim=1))
    assert norm.tensor_names("q_norm") == ["2.q_norm", "3.q_norm", "4.q_norm"]


def test_layouts():
    assert [TrackLayout(4, 8).tracks_of(r) for r in (0, 1, 2, 7)] == [range(0, 1), range(0, 1), range(1, 2), range(3, 4)]
    assert TrackLayout(4, 8).track_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert TrackLayout(4, 8).combine_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert [TrackLayout(4, 3).tracks_of(r) for r in range(3)] == [range(0, 2), range(2, 3), range(3, 4)]
    assert TrackLayout(4, 3).combine_groups() == [[0, 1, 2]] and TrackLayout(4, 3).track_groups() == [[0], [1], [2]]
    with pytest.raises(ValueError, match="6 ranks cannot serve 4 tracks"):
        TrackLayout(4, 6)


def test_bad_layouts_and_configs_are_refused_before_any_rank_starts(pt_models):
    with pytest.raises(ValueError, match="3 ranks cannot serve 2 tracks"):
        LLM(pt_models["t2"][0], tensor_parallel_size=3, device="cpu")
    cfg = model_config_from_hf(preset_config("pt-llama3-8b-t4-d4"))
    with pytest.raises(ValueError, match="more than a track's 8 query heads"):
        check_track_parallel(ParallelConfig(tensor_parallel_size=64), cfg)
    with pytest.raises(ValueError, match="one pipeline stage, no sequence parallelism"):
        check_track_parallel(ParallelConfig(tensor_parallel_size=4, pipeline_parallel_size=2), cfg)
    hf = preset_config("pt-llama3-8b-t4-d4")
    hf.track_block_depth = 5
    with pytest.raises(ValueError, match=r"track_block_depth \(5\) must divide num_hidden_layers \(32\)"):
        model_config_from_hf(hf)
    hf = preset_config("pt-llama3-8b-t4-d4")
    hf.num_tracks, hf.track_num_attention_heads = 3, None
    with pytest.raises(ValueError, match=r"num_attention_heads \(32\) does not divide into num_tracks \(3\)"):
        model_config_from_hf(hf)


def _num_params(preset: str, layers: int) -> int:
    """The preset's real widths, with `layers` layers and a small vocabulary (the same in dense and PT): the weights
    are torch.empty, never touched, so even 8B-wide layers cost no real memory."""
    hf = preset_config(preset)
    hf.num_hidden_layers, hf.vocab_size = layers, 16
    model = build_model(model_config_from_hf(hf), TensorParallel(Communicator.single()), 16)
    return sum(p.numel() for p in model.parameters())


def test_presets_have_the_dense_parameter_count():
    """Same totals as the dense model; each extra track adds only its two norms per layer."""
    for dense, pt, (d, tracks, depth) in (("llama3-8b", "pt-llama3-8b-t4-d4", (4096, 4, 4)),
                                          ("qwen2.5-32b", "pt-qwen2.5-32b-t8-d2", (5120, 8, 2))):
        assert _num_params(pt, depth) - _num_params(dense, depth) == (tracks - 1) * 2 * d * depth


def test_training_lowers_the_loss_and_plait_serves_the_trained_model(tmp_path):
    """A few steps of the quality study's trainer on plait's own source bytes; its checkpoint's logits in plait are
    the trainer's forward."""
    text = b"\0".join(p.read_bytes() for p in sorted((ROOT / "plait").rglob("*.py")))
    data = np.frombuffer(text, dtype=np.uint8)
    cfg = PTConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, num_tracks=2,
                   block_depth=1)
    run = TrainConfig(tokens=40 * 8 * 64, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, eval_windows=16)
    model, result = train(cfg, run, data[:-20_000], data[-20_000:], str(tmp_path), torch.device("cpu"), log=lambda _: None)
    losses = [loss for _, loss in result["train_curve"]]
    assert result["complete"] and np.mean(losses[-5:]) < losses[0] - 1.0, losses
    ids = data[:48].tolist()
    with torch.no_grad():
        expected = model.eval()(torch.tensor([ids]))[0]
    torch.testing.assert_close(plait_logits(str(tmp_path / "checkpoint"), Communicator.single(), ids), expected,
                               atol=1e-4, rtol=0)
