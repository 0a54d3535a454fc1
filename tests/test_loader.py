"""The loader must hand out exactly the tensors transformers would load, by slice, from every kind of source."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from plait.models.loader import (
    ModelSource,
    default_model_path,
    iter_weights,
    load_hf_config,
    load_tokenizer,
    resolve_model,
)
from plait.models.presets import PRESETS, preset_config

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


# --- resolving the model string ---------------------------------------------------------------------------------


def test_default_is_the_embedded_smollm2_gguf():
    src = resolve_model(None)
    assert src == ModelSource("gguf", default_model_path(), "SmolLM2-135M-Instruct")
    assert os.path.isfile(src.path) and src.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolve_model("") == src


def test_unknown_model_names_it_and_lists_presets(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="nope") as err:
        resolve_model(missing)
    assert "llama3-8b" in str(err.value)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))


def test_folder_with_one_gguf_is_gguf(tmp_path):
    os.symlink(default_model_path(), tmp_path / "m.gguf")
    assert resolve_model(str(tmp_path)) == ModelSource("gguf", str(tmp_path / "m.gguf"), "m")
    os.symlink(default_model_path(), tmp_path / "n.gguf")
    with pytest.raises(ValueError, match="2 .gguf files"):
        resolve_model(str(tmp_path))


def test_non_gguf_file_is_rejected(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="model.bin"):
        resolve_model(str(tmp_path / "model.bin"))


def test_preset_has_config_but_no_weights_or_tokenizer():
    src = resolve_model("llama3-8b")
    assert src == ModelSource("preset", "llama3-8b", "llama3-8b")
    assert load_hf_config(src).num_hidden_layers == 32
    assert load_tokenizer(src) is None
    with pytest.raises(ValueError, match="dummy"):
        iter_weights(src)


# --- Hugging Face safetensors folders ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
def test_hf_round_trip(tmp_path, tiny_llama, shard):
    kwargs = {"max_shard_size": shard} if shard else {}
    tiny_llama.save_pretrained(tmp_path, safe_serialization=True, **kwargs)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") == bool(shard)

    src = resolve_model(str(tmp_path))
    assert (src.kind, src.name) == ("hf", tmp_path.name)
    assert load_hf_config(src).num_key_value_heads == 2
    expected = tiny_llama.state_dict()
    weights = dict(iter_weights(src))
    assert weights.keys() == expected.keys()
    for name, w in weights.items():
        assert w.shape == tuple(expected[name].shape), name
        assert torch.equal(w.read(), expected[name]), name
    q = weights["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(q.read(0, 16, 48), expected["model.layers.1.self_attn.q_proj.weight"][16:48])
    assert torch.equal(q.read(1, 3, 40), expected["model.layers.1.self_attn.q_proj.weight"][:, 3:40])
    assert torch.equal(weights["model.norm.weight"].read(0, 5, 9), expected["model.norm.weight"][5:9])


def test_hf_read_out_of_range_is_an_error(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    weights = dict(iter_weights(resolve_model(str(tmp_path))))
    with pytest.raises(ValueError, match=r"\[0:65\]"):
        weights["model.norm.weight"].read(0, 0, 65)
    with pytest.raises(ValueError, match="dim 2"):
        weights["lm_head.weight"].read(2)


def test_hf_folder_without_safetensors_is_an_error(tmp_path, tiny_llama):
    tiny_llama.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="safetensors"):
        iter_weights(resolve_model(str(tmp_path)))


# --- GGUF --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_gguf_state() -> dict[str, torch.Tensor]:
    """What transformers itself makes of the default GGUF: the reference for names, dequantization and q/k order."""
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.state_dict()


@pytest.fixture(scope="module")
def smollm_weights():
    return dict(iter_weights(resolve_model(None)))


def test_gguf_names_match_transformers(smollm_gguf_state, smollm_weights):
    # Tied embeddings: the GGUF has no output tensor; transformers lists lm_head as the tied embedding.
    assert smollm_weights.keys() == smollm_gguf_state.keys() - {"lm_head.weight"}


@pytest.mark.parametrize(
    "name",
    [
        "model.embed_tokens.weight",
        "model.layers.7.self_attn.q_proj.weight",
        "model.layers.7.self_attn.k_proj.weight",
        "model.layers.7.self_attn.v_proj.weight",
        "model.layers.7.mlp.down_proj.weight",
        "model.layers.7.input_layernorm.weight",
        "model.norm.weight",
    ],
)
def test_gguf_tensors_match_transformers(smollm_gguf_state, smollm_weights, name):
    w, expected = smollm_weights[name], smollm_gguf_state[name]
    assert w.shape == tuple(expected.shape)
    torch.testing.assert_close(w.read(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dim, start, end", [(0, 70, 200), (0, 64, 128), (1, 5, 300)])
def test_gguf_slices_of_permuted_rows(smollm_weights, dim, start, end):
    for name in ("model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight"):
        w = smollm_weights[name]
        end = min(end, w.shape[dim])
        assert torch.equal(w.read(dim, start, end), w.read().narrow(dim, start, end - start))


def test_gguf_config_and_tokenizer():
    src = resolve_model(None)
    cfg = load_hf_config(src)
    assert cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings) == (576, 49152, True)
    tok = load_tokenizer(src)
    assert tok.decode(tok("Hello world")["input_ids"]) == "Hello world"
    assert tok.convert_ids_to_tokens(cfg.eos_token_id) == "<|im_end|>"
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_gguf_config_is_parsed_once_per_process_and_each_caller_gets_a_copy(monkeypatch):
    src = resolve_model(None)
    first = load_hf_config(src)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("parsed again"))
    first.num_hidden_layers = 1  # a caller's edit stays its own
    again = load_hf_config(src)
    assert again is not first and again.num_hidden_layers == 30


def test_explicit_tokenizer_serves_a_preset(tmp_path):
    os.symlink(default_model_path(), tmp_path / "tok.gguf")
    assert len(load_tokenizer(resolve_model("smollm2-135m"), str(tmp_path / "tok.gguf"))) == 49152
    with pytest.raises(ValueError, match="missing"):
        load_tokenizer(resolve_model("smollm2-135m"), str(tmp_path / "missing"))


# --- presets -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls, layers, hidden, inter, heads, kv_heads, vocab, tied",
    [
        ("llama3-8b", transformers.LlamaConfig, 32, 4096, 14336, 32, 8, 128256, False),
        ("llama3-70b", transformers.LlamaConfig, 80, 8192, 28672, 64, 8, 128256, False),
        ("qwen2.5-32b", transformers.Qwen2Config, 64, 5120, 27648, 40, 8, 152064, False),
        ("qwen3-8b", transformers.Qwen3Config, 36, 4096, 12288, 32, 8, 151936, False),
        ("smollm2-135m", transformers.LlamaConfig, 30, 576, 1536, 9, 3, 49152, True),
    ],
)
def test_presets(name, cls, layers, hidden, inter, heads, kv_heads, vocab, tied):
    cfg = preset_config(name)
    assert type(cfg) is cls
    got = (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads)
    assert got == (layers, hidden, inter, heads)
    assert (cfg.num_key_value_heads, cfg.vocab_size, cfg.tie_word_embeddings) == (kv_heads, vocab, tied)


def test_llama3_preset_rope():
    rope = preset_config("llama3-70b").rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0 and rope["factor"] == 8.0
    assert (rope["low_freq_factor"], rope["high_freq_factor"]) == (1.0, 4.0)
    assert rope["original_max_position_embeddings"] == 8192
    assert preset_config("llama3-70b").max_position_embeddings == 131072
    assert PRESETS["llama3-8b"]["rope_parameters"]["rope_type"] == "llama3"  # building did not edit the table


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="qwen3-8b"):
        preset_config("gpt-5")
