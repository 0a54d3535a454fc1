"""The Parallel Track model for training, in plain PyTorch: the reference definition of docs/parallel_track.md.

Written apart from plait's inference layers (no paged cache, no parallel plan), so that what plait serves can be
checked against it. Dense is the case of one track. Every per-layer weight carries a leading track dimension and
each matmul runs all tracks at once (einsum over [tracks, batch, seq, width]): narrow tracks train as fast as one
wide model on one GPU. `save_checkpoint` writes the folder plait serves (track_format's names and keys).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import save_file
from torch import nn

from plait.models.track_format import track_keys


@dataclass(frozen=True)
class PTConfig:
    """Widths are totals over the tracks, as in config.json; a track has 1/num_tracks of each."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    num_tracks: int = 1
    block_depth: int = 1
    combine: str = "mean"
    vocab_size: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) % self.num_tracks:
                raise ValueError(f"{name} ({getattr(self, name)}) does not divide into {self.num_tracks} tracks")
        if self.num_layers % self.block_depth:
            raise ValueError(f"block_depth ({self.block_depth}) must divide num_layers ({self.num_layers})")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size ({self.hidden_size}) / num_heads ({self.num_heads}) must be an even head size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def hf_config(self) -> dict:
        """config.json: a Llama config, plus the track keys when there is more than one track."""
        cfg = {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta}, "tie_word_embeddings": True,
            "bos_token_id": None, "eos_token_id": None,
        }
        if self.num_tracks > 1:
            cfg.update(track_keys(self.num_tracks, self.block_depth, self.num_heads, self.num_kv_heads,
                                  self.intermediate_size, self.combine))
        return cfg


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In fp32, as plait and Hugging Face compute it. x: [..., d], weight broadcast against it."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in Hugging Face's rotate-half layout. x: [..., S, heads, hd]; cos, sin: [S, hd / 2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class TrackedLayer(nn.Module):
    """One decoder layer of every track at once: weights [tracks, out, in], activations [tracks, B, S, d]."""

    def __init__(self, cfg: PTConfig):
        super().__init__()
        T, d, hd = cfg.num_tracks, cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim, self.eps = cfg.num_heads // T, cfg.num_kv_heads // T, hd, cfg.rms_norm_eps
        inter = cfg.intermediate_size // T
        shapes = {
            "input_layernorm": (d,), "q_proj": (self.heads * hd, d), "k_proj": (self.kv_heads * hd, d),
            "v_proj": (self.kv_heads * hd, d), "o_proj": (d, self.heads * hd), "post_attention_layernorm": (d,),
            "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter),
        }
        self.weights = nn.ParameterDict({name: nn.Parameter(torch.empty(T, *shape)) for name, shape in shapes.items()})

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, B, S, d] -> [T, B, S, d]; each track attends causally over its own heads."""
        w = self.weights
        T, B, S, _ = x.shape
        a = rms_norm(x, w["input_layernorm"][:, None, None], self.eps)
        q = torch.einsum("tbsd,tod->tbso", a, w["q_proj"]).view(T, B, S, self.heads, self.head_dim)
        k = torch.einsum("tbsd,tod->tbso", a, w["k_proj"]).view(T, B, S, self.kv_heads, self.head_dim)
        v = torch.einsum("tbsd,tod->tbso", a, w["v_proj"]).view(T, B, S, self.kv_heads, self.head_dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # Query head h reads KV head h // group (as plait's kernels); repeated here so SDPA takes its flash path.
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=3), v.repeat_interleave(group, dim=3)
        heads_first = lambda t: t.flatten(0, 1).transpose(1, 2)  # noqa: E731 - [T*B, heads, S, hd]
        o = nn.functional.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True)
        o = o.transpose(1, 2).reshape(T, B, S, -1)
        x = x + torch.einsum("tbso,tdo->tbsd", o, w["o_proj"])
        m = rms_norm(x, w["post_attention_layernorm"][:, None, None], self.eps)
        gate = torch.einsum("tbsd,tod->tbso", m, w["gate_proj"])
        up = torch.einsum("tbsd,tod->tbso", m, w["up_proj"])
        return x + torch.einsum("tbso,tdo->tbsd", nn.functional.silu(gate) * up, w["down_proj"])


class PTModel(nn.Module):
    def __init__(self, cfg: PTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(TrackedLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """GPT-2's init: N(0, std), residual outputs scaled down by sqrt(2 L); norms at one."""
        nn.init.normal_(self.embed_tokens, std=std)
        for layer in self.layers:
            for name, p in layer.weights.items():
                if name.endswith("norm"):
                    p.fill_(1.0)
                else:
                    scale = 1 / math.sqrt(2 * self.cfg.num_layers) if name in ("o_proj", "down_proj") else 1.0
                    nn.init.normal_(p, std=std * scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, S] -> logits [B, S, vocab]: h goes to every track at each block's start; the tracks' states
        are averaged (or summed) at its end; the final norm and the tied LM head follow the last block."""
        S, cfg = ids.shape[1], self.cfg
        freqs = torch.outer(torch.arange(S, device=ids.device, dtype=torch.float32), self.inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        h = nn.functional.embedding(ids, self.embed_tokens)  # [B, S, d]
        for first in range(0, cfg.num_layers, cfg.block_depth):
            x = h.expand(cfg.num_tracks, *h.shape)
            for layer in self.layers[first : first + cfg.block_depth]:
                x = layer(x, cos, sin)
            h = x.mean(0) if cfg.combine == "mean" else x.sum(0)
        return rms_norm(h, self.norm, cfg.rms_norm_eps) @ self.embed_tokens.t()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors under plait's names (track_format.py); one track saves as a plain Llama checkpoint."""
        out = {"model.embed_tokens.weight": self.embed_tokens, "model.norm.weight": self.norm}
        attn = ("q_proj", "k_proj", "v_proj", "o_proj")
        for i, layer in enumerate(self.layers):
            for name, stacked in layer.weights.items():
                kind = "self_attn." if name in attn else "mlp." if name.endswith("proj") else ""
                for k in range(self.cfg.num_tracks):
                    prefix = f"model.layers.{i}" if self.cfg.num_tracks == 1 else f"model.tracks.{k}.layers.{i}"
                    out[f"{prefix}.{kind}{name}.weight"] = stacked[k]
        return {name: t.detach().float().cpu().clone() for name, t in out.items()}  # clone: no shared storage


def save_checkpoint(model: PTModel, folder: str) -> None:
    """A Hugging Face folder plait serves: config.json and model.safetensors (fp32), plus the training config."""
    os.makedirs(folder, exist_ok=True)
    save_file(model.checkpoint_tensors(), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.cfg.hf_config(), f, indent=2)
    with open(os.path.join(folder, "pt_config.json"), "w") as f:
        json.dump(asdict(model.cfg), f, indent=2)
