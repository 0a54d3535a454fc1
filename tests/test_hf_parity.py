"""Greedy tokens and logprobs against Hugging Face transformers (fp32) for each family and for SmolLM2."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, assert_generations_match, random_prompts
from plait import LLM, SamplingParams


def hf_reference(model, prompt: list[int], max_tokens: int):
    """Greedy continuation and, for every generated token, its logprob from one HF forward over the whole text."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    tokens = out[0, len(prompt):].tolist()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(out).logits[0].float(), -1)
    prompt_lps = logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    gen_lps = logprobs[torch.arange(len(prompt) - 1, out.shape[1] - 1), out[0, len(prompt):]]
    return tokens, gen_lps, prompt_lps


def assert_matches_hf(llm: LLM, model, prompts: list[list[int]], max_tokens: int) -> None:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0, prompt_logprobs=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert_generations_match(prompts, outs, lambda prompt: hf_reference(model, prompt, max_tokens), atol=1e-3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_family_matches_hf(checkpoints, family):
    folder, model = checkpoints[family]
    llm = LLM(folder, dtype="float32", device="cpu", max_model_len=256)
    try:
        assert_matches_hf(llm, model, random_prompts(4, seed=1), max_tokens=12)
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_smollm2_matches_hf(smollm2_hf):
    llm = LLM(dtype="float32", device="cpu", max_model_len=512)
    try:
        tok = llm.get_tokenizer()
        prompts = [tok.encode(t) for t in ("The capital of France is", "def fibonacci(n):", "Once upon a time")]
        assert_matches_hf(llm, smollm2_hf, prompts, max_tokens=16)
        chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
        assert "Paris" in chat[0].outputs[0].text
    finally:
        llm.shutdown()
