"""Sampler semantics (vLLM V1): penalties, filters, seeds and logprobs, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from plait.engine.sampler import SampleInput, Sampler, prompt_logprobs
from plait.sampling_params import SamplingParams

EOS = 3


def _inp(seq_id: int = 0, prompt: list[int] | None = None, output: list[int] | None = None, **kw) -> SampleInput:
    prompt, output = prompt or [5], output or []
    return SampleInput(seq_id, SamplingParams(**kw), prompt + output, len(prompt))


def _pick(logits: list[float], **kw) -> int:
    """Greedy choice for one crafted row, so a penalty's effect shows up as which token wins."""
    prompt, output = kw.pop("prompt", None), kw.pop("output", None)
    tokens, _ = Sampler("cpu", {EOS}).sample(torch.tensor([logits]), [_inp(0, prompt, output, temperature=0.0, **kw)]).tolist()
    return tokens[0]


def _brute_rank(row: torch.Tensor, token: int) -> int:
    return 1 + sum(1 for v in row.tolist() if v > row[token].item())


def test_greedy_is_argmax_also_in_mixed_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    inputs = [_inp(i, temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    tokens, logprobs = Sampler("cpu", {EOS}).sample(logits, inputs).tolist()
    expected = logits.argmax(dim=-1).tolist()
    assert [tokens[i] for i in (0, 2, 4)] == [expected[i] for i in (0, 2, 4)]
    assert logprobs == [None] * 6


def test_greedy_ties_break_to_lowest_index():
    assert _pick([1.0, 3.0, 3.0, 0.0]) == 1


def test_logprobs_are_raw_with_correct_ranks():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    original = logits.clone()
    inputs = [
        _inp(0, logprobs=4, temperature=0.5, repetition_penalty=1.5, presence_penalty=1.0, output=[7, 8]),
        _inp(1, logprobs=0, temperature=2.0, top_k=5),
        _inp(2),
    ]
    tokens, out = Sampler("cpu", {EOS}).sample(logits, inputs).tolist()
    assert torch.equal(logits, original), "caller's logits must not be modified"
    raw = torch.log_softmax(logits.float(), dim=-1)
    for row, k in ((0, 4), (1, 0)):
        lp = out[row]
        assert len(lp.token_ids) == len(lp.logprobs) == len(lp.ranks) == k + 1
        assert lp.token_ids[0] == tokens[row]
        assert lp.logprobs[0] == pytest.approx(raw[row, tokens[row]].item(), abs=1e-6)
        assert lp.ranks[0] == _brute_rank(raw[row], tokens[row])
        top = raw[row].argsort(descending=True)[:k].tolist()
        assert lp.token_ids[1:] == top
        assert lp.logprobs[1:] == pytest.approx(raw[row, top].tolist(), abs=1e-6)
        assert lp.ranks[1:] == list(range(1, k + 1))
    assert out[2] is None


def test_top_k_1_and_tiny_top_p_equal_greedy_at_any_temperature():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(2))
    sampler = Sampler("cpu", {EOS})
    for temperature in (0.3, 1.0, 5.0, 50.0):
        for filters in ({"top_k": 1}, {"top_p": 1e-6}, {"top_p": 1e-9}):  # 1 - 1e-9 rounds to 1.0
            inputs = [_inp(i, temperature=temperature, **filters) for i in range(8)]
            assert sampler.sample(logits, inputs).tolist()[0] == logits.argmax(dim=-1).tolist()


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])  # min_p=0.5 keeps prob >= 0.25: tokens 0 and 1
    logits = probs.log().expand(4000, 4)
    tokens, _ = Sampler("cpu", {EOS}).sample(logits, [_inp(i, min_p=0.5) for i in range(4000)]).tolist()
    counts = torch.bincount(torch.tensor(tokens), minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert counts[0] / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)


def test_repetition_penalty_divides_positive_and_multiplies_negative_over_prompt_and_output():
    assert _pick([3.0, 1.6], prompt=[0], repetition_penalty=2.0) == 1  # 3 / 2 = 1.5 < 1.6
    assert _pick([3.0, 1.4], prompt=[0], repetition_penalty=2.0) == 0  # 1.5 > 1.4
    assert _pick([3.0, 1.6, 0.0], prompt=[2], output=[0], repetition_penalty=2.0) == 1
    assert _pick([-1.0, -1.5], prompt=[0], repetition_penalty=2.0) == 1  # -1 * 2 = -2 < -1.5
    assert _pick([-1.0, -2.5], prompt=[0], repetition_penalty=2.0) == 0
    assert _pick([3.0, 1.6, 0.0], prompt=[2], output=[2], repetition_penalty=2.0) == 0  # token 0 unseen


def test_frequency_penalty_scales_with_output_count_only():
    assert _pick([2.0, 1.5, 1.0], output=[0, 0], frequency_penalty=0.3) == 1  # 2 - 0.6 = 1.4 < 1.5
    assert _pick([2.0, 1.5, 1.0], output=[0, 0], frequency_penalty=0.2) == 0  # 2 - 0.4 = 1.6 > 1.5
    assert _pick([2.0, 1.5, 1.0], prompt=[0, 0, 0, 0], frequency_penalty=2.0) == 0


def test_presence_penalty_is_flat_over_output_only():
    assert _pick([2.0, 1.5, 1.0], output=[0, 0, 0], presence_penalty=0.4) == 0  # 2 - 0.4 = 1.6, not 2 - 1.2
    assert _pick([2.0, 1.5, 1.0], output=[0, 0, 0], presence_penalty=0.6) == 1
    assert _pick([2.0, 1.5, 1.0], prompt=[0], presence_penalty=2.0) == 0
    assert _pick([1.0, 1.5, 1.0], output=[1], presence_penalty=-1.0) == 1  # negative penalty rewards


def test_min_tokens_blocks_eos_and_stop_tokens():
    logits = [0.0, 1.0, 4.0, 5.0]  # EOS = 3 is the favourite, stop token 2 is next
    assert _pick(logits, output=[1], min_tokens=2, stop_token_ids=[2]) == 1
    assert _pick(logits, output=[1], min_tokens=2) == 2
    assert _pick(logits, output=[1, 1], min_tokens=2) == EOS
    assert _pick(logits, output=[1], min_tokens=2, ignore_eos=True) == EOS
    batch = [_inp(0, output=[1, 1], min_tokens=2, temperature=0.0), _inp(1, output=[1], min_tokens=2, temperature=0.0)]
    column_major = torch.tensor([logits, logits]).t().contiguous().t()  # dense but not row-contiguous
    assert Sampler("cpu", {EOS}).sample(column_major, batch).tolist()[0] == [EOS, 2]


def _run(sampler: Sampler, logits: torch.Tensor, inputs: list[SampleInput]) -> dict[int, int]:
    tokens, _ = sampler.sample(logits[[inp.seq_id for inp in inputs]], inputs).tolist()
    return {inp.seq_id: tok for inp, tok in zip(inputs, tokens)}


def test_same_seed_same_tokens_regardless_of_batch():
    logits = torch.zeros(6, 1000)  # uniform: every draw depends on the noise only
    a, b = Sampler("cpu", {EOS}, seed=0), Sampler("cpu", {EOS}, seed=123)
    seeded = [_inp(0, seed=7), _inp(1, seed=8)]
    others = [_inp(i, temperature=0.9) for i in range(2, 6)]
    steps_a, steps_b = [], []
    for step in range(5):
        steps_a.append(_run(a, logits, [seeded[0], others[0], seeded[1]]))
        steps_b.append(_run(b, logits, others[step % 4 :] + [seeded[1], _inp(5, temperature=0.0), seeded[0]]))
    assert [s[0] for s in steps_a] == [s[0] for s in steps_b]
    assert [s[1] for s in steps_a] == [s[1] for s in steps_b]
    assert [s[0] for s in steps_a] != [s[1] for s in steps_a], "different seeds should differ"
    assert len({s[0] for s in steps_a}) > 1, "a seeded sequence must advance its generator"

    a.forget([0])  # a forgotten sequence id starts its generator afresh
    assert _run(a, logits, [seeded[0]])[0] == steps_a[0][0]


def _chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).double()
    expected = probs.double() * len(tokens)
    return ((counts - expected) ** 2 / expected).sum().item()


def test_sampled_distribution_matches_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 20000
    tokens, _ = Sampler("cpu", {EOS}, seed=1).sample(logits.expand(n, 5), [_inp(i, temperature=0.7) for i in range(n)]).tolist()
    assert _chi_square(tokens, torch.softmax(logits / 0.7, dim=-1)) < 18.5  # 4 dof, p = 0.001
    assert _chi_square(tokens, torch.softmax(logits, dim=-1)) > 100  # the check can tell temperatures apart

    tokens, _ = Sampler("cpu", {EOS}, seed=2).sample(logits.expand(n, 5), [_inp(i, top_k=3) for i in range(n)]).tolist()
    assert max(tokens) == 2
    assert _chi_square(tokens, torch.softmax(logits[:3], dim=-1)) < 13.9  # 2 dof, p = 0.001


def test_prompt_logprobs_values_and_ranks():
    logits = torch.randn(7, 30, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([0, 5, 29, 3, 3, 17, 8])
    targets[2] = logits[2].argmax()  # one target is the favourite: rank 1
    rows = prompt_logprobs(logits, targets, k=2).tolist()
    raw = torch.log_softmax(logits, dim=-1)
    assert len(rows) == 7
    for t, row in enumerate(rows):
        top = raw[t].argsort(descending=True)[:2].tolist()
        assert row.token_ids == [targets[t].item()] + top
        assert row.logprobs == pytest.approx([raw[t, targets[t]].item()] + raw[t, top].tolist(), abs=1e-6)
        assert row.ranks == [_brute_rank(raw[t], targets[t].item()), 1, 2]
    assert rows[2].ranks[0] == 1
    assert math.isclose(sum(math.exp(v) for v in raw[0].tolist()), 1.0, rel_tol=1e-5)
    assert [r.token_ids for r in prompt_logprobs(logits, targets, k=0).tolist()] == [[t] for t in targets.tolist()]
