"""The on-disk format of a Parallel Track checkpoint: its config.json keys and its safetensors names.

A PT checkpoint is a Hugging Face folder of a Llama-family base (its `model_type` says which: llama, qwen2,
qwen3, ...) whose `architectures` is ["ParallelTrackForCausalLM"] and which carries the track keys below. The
standard width keys (`num_attention_heads`, `num_key_value_heads`, `intermediate_size`) hold the totals over all
tracks, so a PT config and the dense config of the same parameter count differ only in the track keys. Tensors:

    model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent when tied)
    model.tracks.{k}.layers.{i}.{self_attn.q_proj | ... | mlp.down_proj | input_layernorm | ...}.weight

where k < num_tracks and i < num_hidden_layers (every track has all L layers; block b is layers b*D .. b*D+D-1).
"""

from __future__ import annotations

from plait.config import TrackConfig

ARCHITECTURE = "ParallelTrackForCausalLM"


_WIDTHS = (  # (per-track key, total key)
    ("track_num_attention_heads", "num_attention_heads"),
    ("track_num_key_value_heads", "num_key_value_heads"),
    ("track_intermediate_size", "intermediate_size"),
)


def track_keys(num_tracks: int, block_depth: int, num_heads: int, num_kv_heads: int, intermediate_size: int,
               combine: str = "mean") -> dict:
    """The config.json keys that make a dense config of these totals a PT one (what presets and the trainer write)."""
    totals = (num_heads, num_kv_heads, intermediate_size)
    widths = [_even_width(name, total, num_tracks) for (_, name), total in zip(_WIDTHS, totals)]
    cfg = TrackConfig(num_tracks, block_depth, combine, *widths)
    return {
        "architectures": [ARCHITECTURE],
        "num_tracks": cfg.num_tracks,
        "track_block_depth": cfg.block_depth,
        "track_combine": cfg.combine,
        **{key: width for (key, _), width in zip(_WIDTHS, widths)},
    }


def _even_width(name: str, total: int, num_tracks: int) -> int:
    if total % num_tracks:
        raise ValueError(f"{name} ({total}) does not divide into num_tracks ({num_tracks}) equal tracks")
    return total // num_tracks


def track_config_from_hf(hf_config, num_layers: int, num_heads: int, num_kv_heads: int, intermediate_size: int) -> TrackConfig:
    """Read and check the track keys; a missing per-track width is total / num_tracks, a given one must multiply back."""
    num_tracks = getattr(hf_config, "num_tracks", None)
    depth = getattr(hf_config, "track_block_depth", None)
    if not isinstance(num_tracks, int) or not isinstance(depth, int) or num_tracks < 1 or depth < 1:
        raise ValueError(f"a {ARCHITECTURE} config needs num_tracks and track_block_depth >= 1; got {num_tracks!r}, {depth!r}")
    if num_layers % depth:
        raise ValueError(f"track_block_depth ({depth}) must divide num_hidden_layers ({num_layers}) into whole blocks")
    widths = []
    for (key, name), total in zip(_WIDTHS, (num_heads, num_kv_heads, intermediate_size)):
        width = getattr(hf_config, key, None)
        if width is None:
            width = _even_width(name, total, num_tracks)
        elif width * num_tracks != total:
            raise ValueError(f"{key} ({width}) x num_tracks ({num_tracks}) must equal {name} ({total})")
        widths.append(width)
    return TrackConfig(num_tracks, depth, getattr(hf_config, "track_combine", "mean"), *widths)
