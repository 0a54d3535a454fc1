"""Sampling spread over the tensor-parallel ranks draws from the distribution the filters leave: each of top-k,
top-p and min-p alone where it cuts, then all three, against the raw logprobs filtered the slow way (chi-square)."""

from __future__ import annotations

import torch

from conftest import random_prompts
from plait import LLM, SamplingParams
from test_step_loop import ENGINE, VOCAB, folder, tokenizer  # noqa: F401 (fixtures)



def filtered(logprobs: dict[int, float], temperature: float, top_k: int, top_p: float,
             min_p: float) -> dict[int, float]:
    """The sampler's distribution, computed the slow way: temperature, then min-p, top-k and top-p."""
    ids = sorted(logprobs, key=logprobs.get, reverse=True)
    probs = torch.tensor([logprobs[t] for t in ids], dtype=torch.float64).div(temperature).softmax(0)
    keep = (probs >= min_p * probs[0]).tolist()
    kept = [(t, p) for t, p, k in zip(ids, probs.tolist(), keep) if k][:top_k]
    total, out = sum(p for _, p in kept), {}
    for t, p in kept:  # the smallest head whose mass reaches top_p
        out[t] = p / total
        if sum(out.values()) >= top_p:
            break
    norm = sum(out.values())
    return {t: p / norm for t, p in out.items()}


# (temperature, top_k, top_p, min_p): each filter alone, where it keeps 5-22 of the tiny model's tokens, then all three
FILTERS = [(3.0, 12, 1.0, 0.0), (1.0, VOCAB, 0.5, 0.0), (1.0, VOCAB, 1.0, 0.1), (3.0, 12, 0.95, 0.01)]


def test_spread_sampling_draws_from_the_filtered_distribution(folder):
    prompt = random_prompts(1, vocab=VOCAB, lo=6, hi=7, seed=5)[0]
    llm = LLM(folder, **ENGINE)
    try:
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, logprobs=VOCAB), use_tqdm=False)
    finally:
        llm.shutdown()
    raw = {t: lp.logprob for t, lp in out[0].outputs[0].logprobs[0].items()}
    expected = [filtered(raw, *f) for f in FILTERS]
    assert all(4 <= len(e) < 30 for e in expected), "each filter must cut the distribution to a testable size"
    n = 900
    params = [SamplingParams(n=n, temperature=t, top_k=k, top_p=p, min_p=m, max_tokens=1) for t, k, p, m in FILTERS]
    llm = LLM(folder, tensor_parallel_size=3, sampling_parallel=True, **{**ENGINE, "num_gpu_blocks_override": 1024,
              "max_num_seqs": 300, "max_num_batched_tokens": 2048})
    try:
        outs = llm.generate([prompt] * len(FILTERS), params, use_tqdm=False)
    finally:
        llm.shutdown()
    for f, want_probs, out in zip(FILTERS, expected, outs):
        draws = [c.token_ids[0] for c in out.outputs]
        assert set(draws) <= set(want_probs), f"{f}: drew tokens the filter removes"
        counts = torch.tensor([draws.count(t) for t in want_probs], dtype=torch.float64)
        want = torch.tensor(list(want_probs.values()), dtype=torch.float64) * n
        chi2 = ((counts - want) ** 2 / want).sum()
        p_value = torch.special.gammaincc(torch.tensor((len(want_probs) - 1) / 2, dtype=torch.float64), chi2 / 2)
        assert p_value > 1e-3, f"{f}: chi2 {chi2:.1f} over {len(want_probs)} tokens: {counts.tolist()} vs {want.tolist()}"
