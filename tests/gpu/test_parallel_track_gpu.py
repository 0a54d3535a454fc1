"""Parallel Track on GPUs (run on the device with `pytest -m gpu tests/gpu`): Triton kernels, fused norms that
update the residual in place (several tracks on one GPU share the block's input), and the combine all-reduce
and a track's own all-reduces captured in CUDA graphs, against the training code's forward and the 1-GPU run."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

from plait import LLM, SamplingParams

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the study's training model is the reference
from benchmarks.pt_quality.model import PTConfig, PTModel, save_checkpoint  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[1, 17, 200, 5, 77, 255, 9], list(range(100, 160)), [5] * 3]
PARAMS = SamplingParams(temperature=0, max_tokens=24, logprobs=5, prompt_logprobs=1, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """tracks -> (folder, reference model on the GPU): 4 tracks meeting every 2 layers, and 2 tracks of 4 heads
    (so 4 GPUs run each track tensor-parallel over 2)."""
    out = {}
    for tracks, depth in ((4, 2), (2, 1)):
        torch.manual_seed(tracks)
        model = PTModel(PTConfig(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=512,
                                 num_tracks=tracks, block_depth=depth))
        model.reset_parameters(std=0.08)
        folder = tmp_path_factory.mktemp(f"pt{tracks}")
        save_checkpoint(model, str(folder))
        out[tracks] = (str(folder), model.cuda().eval())
    return out


def _run(folder: str, ranks: int):
    llm = LLM(folder, tensor_parallel_size=ranks, dtype="float32", device="cuda", max_model_len=512,
              kv_cache_memory_bytes=1 << 28)
    try:
        return llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    finally:
        llm.shutdown()


def _token_logprobs(out) -> torch.Tensor:
    comp = out.outputs[0]
    return torch.tensor([p[t].logprob for p, t in zip(comp.logprobs, comp.token_ids)])


def test_one_gpu_matches_the_reference(checkpoints):
    """All 4 tracks on one GPU (decode from CUDA graphs), fp32, against the training model's forward."""
    folder, model = checkpoints[4]
    for prompt, out in zip(PROMPTS, _run(folder, 1)):
        ids = prompt + out.outputs[0].token_ids
        with torch.no_grad():
            lps = torch.log_softmax(model(torch.tensor([ids], device="cuda"))[0].float(), -1).cpu()
        n = len(prompt)
        assert out.outputs[0].token_ids == lps[n - 1 : -1].argmax(-1).tolist()
        torch.testing.assert_close(_token_logprobs(out), lps[torch.arange(n - 1, len(ids) - 1), ids[n:]], atol=1e-3, rtol=0)


@pytest.mark.parametrize("tracks,ranks", [(4, 2), (4, 4), (2, 4)])
def test_ranks_match_one_gpu(checkpoints, tracks, ranks):
    """2 tracks per GPU; a track per GPU; a track over 2 GPUs (its own all-reduces and the combine, in graphs)."""
    if torch.cuda.device_count() < ranks:
        pytest.skip(f"needs {ranks} GPUs")
    folder, _ = checkpoints[tracks]
    for a, b in zip(_run(folder, 1), _run(folder, ranks)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        torch.testing.assert_close(_token_logprobs(a), _token_logprobs(b), atol=1e-3, rtol=0)
