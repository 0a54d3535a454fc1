"""Named model shapes, so a real-sized model can be sized and benchmarked with dummy weights without downloading it.

Each preset is the set of Hugging Face config.json kwargs that matter for the shape (copied from the published
checkpoints); the config classes fill in the rest. Token ids are the instruct checkpoints' so that generation
stops where the real model would.
"""

from __future__ import annotations

import copy

from transformers import AutoConfig, PretrainedConfig

from plait.models.track_format import track_keys

_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

_LLAMA31 = {
    "model_type": "llama",
    "vocab_size": 128256,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_parameters": _LLAMA31_ROPE,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}

PRESETS: dict[str, dict] = {
    "llama3-8b": {
        **_LLAMA31,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    "llama3-70b": {
        **_LLAMA31,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
    },
    # Qwen2 has no attention_bias flag: its q/k/v projections always carry a bias.
    "qwen2.5-32b": {
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    # Qwen3 states head_dim explicitly: in that family it is not always hidden_size / num_attention_heads.
    "qwen3-8b": {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    # Llama-3.2-1B: a small model at Llama-3's vocabulary, where the host's work per step matters most.
    "llama3.2-1b": {
        **_LLAMA31,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "head_dim": 64,
        "rope_parameters": {**_LLAMA31_ROPE, "factor": 32.0},
        "tie_word_embeddings": True,
    },
    "smollm2-135m": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    },
}



def _parallel_track(base: str, num_tracks: int, block_depth: int) -> dict:
    """A PT model with the totals of `base`, so the same parameter count (plus T-1 extra norms per layer)."""
    cfg = PRESETS[base]
    return {**cfg, **track_keys(num_tracks, block_depth, cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                cfg["intermediate_size"])}


# pt-llama3-8b-t4-d4: Llama-3.1-8B's shape as 4 tracks that meet every 4 layers (8 syncs per forward instead of 64).
PRESETS.update({
    f"pt-{base}-t{t}-d{d}": _parallel_track(base, t, d)
    for base in ("llama3-8b", "qwen2.5-32b") for t in (2, 4, 8) for d in (1, 2, 4, 8)
})


def preset_config(name: str) -> PretrainedConfig:
    """Build the preset through transformers' own config class, so rope and defaults behave as for a real checkpoint."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    kwargs = copy.deepcopy(PRESETS[name])  # the config keeps (and may edit) rope_parameters; PRESETS must not change
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
