"""Hugging Face config -> plait's ModelConfig and model class: the one place that knows the families."""

from __future__ import annotations

from plait.config import ModelConfig
from plait.models.track_format import ARCHITECTURE as TRACK_ARCHITECTURE, track_config_from_hf

# HF architectures plait serves with its Llama decoder, and the flags that tell the families apart.
_FAMILIES: dict[str, dict] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def architecture_of(hf_config) -> str:
    archs = getattr(hf_config, "architectures", None) or [_MODEL_TYPES.get(hf_config.model_type, hf_config.model_type)]
    arch = archs[0]
    if arch not in _FAMILIES and arch != TRACK_ARCHITECTURE:
        raise ValueError(f"architecture {arch!r} is not supported; plait serves {', '.join(_FAMILIES)}, {TRACK_ARCHITECTURE}")
    return arch


def _family_of(hf_config, arch: str) -> str:
    """A Parallel Track model is built of its base family's decoder layers; its model_type names the family."""
    if arch != TRACK_ARCHITECTURE:
        return arch
    if hf_config.model_type not in _MODEL_TYPES:
        raise ValueError(f"a {arch} config needs a model_type of {', '.join(_MODEL_TYPES)}; got {hf_config.model_type!r}")
    return _MODEL_TYPES[hf_config.model_type]


def model_config_from_hf(hf_config) -> ModelConfig:
    arch = architecture_of(hf_config)
    family = _family_of(hf_config, arch)
    flags = dict(_FAMILIES[family])
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    if family in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM"):
        flags["qkv_bias"] = bool(getattr(hf_config, "attention_bias", False))
        flags["o_bias"] = flags["qkv_bias"]
        flags["mlp_bias"] = bool(getattr(hf_config, "mlp_bias", False))
    return ModelConfig(
        architecture=arch,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=hf_config.rms_norm_eps,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        tracks=track_config_from_hf(hf_config, hf_config.num_hidden_layers, heads, kv_heads, hf_config.intermediate_size)
        if arch == TRACK_ARCHITECTURE else None,
        hf_config=hf_config,
        **flags,
    )


def build_model(cfg: ModelConfig, plan, max_positions: int, layers: range | None = None):
    """The model class for an architecture, built for this rank's parallel plan (and only `layers` of it)."""
    if cfg.tracks is not None:
        return _build_parallel_track(cfg, plan, max_positions, layers)
    from plait.models.llama import LlamaForCausalLM

    return LlamaForCausalLM(cfg, plan, max_positions, layers)


def _build_parallel_track(cfg: ModelConfig, plan, max_positions: int, layers: range | None):
    """The plan's ranks (one pipeline stage's) become the track plan: sub-groups per track and across tracks."""
    from plait.models.parallel_track import ParallelTrackForCausalLM
    from plait.parallel.track import TrackParallel

    if layers is not None and layers != range(cfg.num_layers):
        raise ValueError(f"a {TRACK_ARCHITECTURE} model runs as one pipeline stage; this rank was given layers {layers}")
    return ParallelTrackForCausalLM(cfg, TrackParallel.over(plan.comm, cfg.tracks.num_tracks), max_positions)
