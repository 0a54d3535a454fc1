"""Shared fixtures: tiny random checkpoints of each family, written once per session as real HF folders; the
scheduler's invariants, checked by the unit and the engine-level scheduling tests; a launcher's rank processes."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers

from plait.core import SeqStatus  # noqa: E402
from plait.engine.kv_cache import blocks_needed  # noqa: E402

# Tiny shapes that still exercise every path: GQA, uneven head splits (9 heads / 3 KV heads like SmolLM2),
# qkv bias (Qwen2), per-head q/k norm (Qwen3), llama3 rope scaling, tied and untied embeddings.
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(num_attention_heads=9, num_key_value_heads=3, head_dim=8, tie_word_embeddings=True)),
    "llama3": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64},
            rope_theta=500000.0,
        ),
    ),
    "mistral": (transformers.MistralConfig, dict(num_attention_heads=6, num_key_value_heads=2, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3": (transformers.Qwen3Config, dict(num_attention_heads=6, num_key_value_heads=3, head_dim=16, tie_word_embeddings=True)),
}


def tiny_config(family: str, num_layers: int = 2, vocab_size: int = 256):
    cls, extra = FAMILIES[family]
    return cls(
        vocab_size=vocab_size,
        hidden_size=72 if family == "llama" else 48,
        intermediate_size=100,
        num_hidden_layers=num_layers,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        **extra,
    )


def make_checkpoint(path, family: str, seed: int = 0, num_layers: int = 2, vocab_size: int = 256):
    torch.manual_seed(seed)
    cfg = tiny_config(family, num_layers, vocab_size)
    cfg.architectures = [{"llama": "LlamaForCausalLM", "llama3": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                          "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]]
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random init is small; widen it so logits are peaked and greedy choices are stable
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return model.eval()


def char_tokenizer(folder) -> None:
    """One printable character per token id (U+0100 + id), so the text `plait generate` prints is its token ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({chr(0x100 + i): i for i in range(256)}, unk_token=chr(0x100)))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> (folder, HF reference model)."""
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        out[family] = (str(folder), make_checkpoint(folder, family))
    return out


def random_prompts(n: int, vocab: int = 256, lo: int = 3, hi: int = 40, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (n_,), generator=g).tolist() for n_ in lens]


@pytest.fixture(scope="session")
def llama8b():
    """Llama-3.1-8B's shape (the preset), for the analytical model's tests."""
    from plait.plan.shapes import load_model_config

    return load_model_config("llama3-8b")


@pytest.fixture(scope="session")
def smollm2_config():
    """SmolLM2-135M's shape (the preset; uneven heads at TP=2 and 4), for the analytical model's tests."""
    from plait.plan.shapes import load_model_config

    return load_model_config("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_hf():
    """The embedded SmolLM2 GGUF as transformers itself loads (and dequantizes) it: the external reference."""
    import os

    from plait.models.loader import default_model_path

    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


def check_state(sched) -> None:
    """Invariants between the scheduler's queues and the block manager."""
    sched.blocks.check_invariants()
    bs = sched.blocks.block_size
    for seq in sched.running:
        assert seq.status is SeqStatus.RUNNING
        assert len(sched.blocks.table(seq.seq_id)) >= blocks_needed(seq.num_computed_tokens, bs)
    for seq in sched.waiting:
        assert seq.status is SeqStatus.WAITING
        assert seq.num_computed_tokens == 0 and sched.blocks.table(seq.seq_id) == []
    owners = {seq.seq_id for seq in sched.running}
    assert set(sched.blocks.tables) <= owners, "a sequence that is not running holds blocks"
    assert len(sched.running) <= sched.cfg.max_num_seqs


def assert_generations_match(prompts: list[list[int]], outs, reference, atol: float) -> None:
    """Greedy tokens equal the reference's, generated and prompt logprobs within `atol`.
    reference(prompt) -> (tokens, generated logprobs, prompt logprobs from the second token on)."""
    for prompt, out in zip(prompts, outs, strict=True):
        tokens, gen_lps, prompt_lps = reference(prompt)
        comp = out.outputs[0]
        assert comp.token_ids == tokens
        ours = torch.tensor([comp.logprobs[i][t].logprob for i, t in enumerate(tokens)])
        torch.testing.assert_close(ours, gen_lps, atol=atol, rtol=0)
        ours_prompt = torch.tensor([out.prompt_logprobs[i][t].logprob for i, t in enumerate(prompt) if i > 0])
        torch.testing.assert_close(ours_prompt, prompt_lps, atol=atol, rtol=0)


def rank_pids(pid: int) -> list[int]:
    """The rank processes that process `pid` spawned (multiprocessing's spawn children, not its resource tracker),
    in rank order: they are spawned one after the other."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            stat, cmdline = open(f"/proc/{entry}/stat").read(), open(f"/proc/{entry}/cmdline").read()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and "spawn_main" in cmdline:
            pids.append(int(entry))
    return sorted(pids)
