"""The Llama family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2), written once for any parallel plan.

Family differences are flags of `ModelConfig` (qkv bias, per-head q/k norm), not subclasses. Which rows a
rank holds and where partial sums are reduced is decided by the `TensorParallel` plan given to the layers.
"""

from __future__ import annotations

import torch
from torch import nn

from plait.config import ModelConfig
from plait.layers.activation import silu_mul
from plait.layers.attention import AttentionMetadata, PagedAttention
from plait.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from plait.layers.linear import ColumnParallelLinear, RowParallelLinear, Segment
from plait.layers.norm import RMSNorm
from plait.layers.rotary import RotaryEmbedding
from plait.parallel.tensor import TensorParallel


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: TensorParallel, rope: RotaryEmbedding):
        super().__init__()
        D = cfg.head_dim
        heads = plan.heads(cfg.num_heads, cfg.num_kv_heads)
        self.num_q, self.num_kv, self.head_dim = heads.num_q, heads.num_kv, D
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size,
            [
                Segment("q_proj", cfg.num_heads * D, heads.q_start * D, heads.q_end * D),
                Segment("k_proj", cfg.num_kv_heads * D, heads.kv_start * D, heads.kv_end * D),
                Segment("v_proj", cfg.num_kv_heads * D, heads.kv_start * D, heads.kv_end * D),
            ],
            bias=cfg.qkv_bias,
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * D, cfg.hidden_size, (heads.q_start * D, heads.q_end * D), plan.comm, cfg.o_bias)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.attn = PagedAttention(heads.num_q, heads.num_kv, D, heads.kv_index(), rope)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.output_sizes, dim=-1)
        q = q.view(-1, self.num_q, self.head_dim)  # [T, heads, D]
        k = k.view(-1, self.num_kv, self.head_dim)
        v = v.view(-1, self.num_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(self.attn(q, k, v, positions, meta))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: TensorParallel):
        super().__init__()
        start, end = plan.split(cfg.intermediate_size)
        inter = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(
            cfg.hidden_size, [Segment("gate_proj", inter, start, end), Segment("up_proj", inter, start, end)], cfg.mlp_bias
        )
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, (start, end), plan.comm, cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: TensorParallel, rope: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, plan, rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, plan)

    def forward(self, x, residual, positions, meta):
        """Pre-norm block; the residual stream is carried separately so each add fuses into the next norm."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: TensorParallel, max_positions: int, layers: range | None = None):
        """`layers`: which decoder layers to build (all by default); a pipeline stage builds only its own."""
        super().__init__()
        self.cfg = cfg
        rope = RotaryEmbedding(cfg.hf_config, cfg.head_dim, max_positions)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, plan)
        # Keyed by the checkpoint's layer index, so a pipeline stage can drop layers and still load by name.
        layers = range(cfg.num_layers) if layers is None else layers
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, plan, rope) for i in layers})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, plan)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """ids, positions: [T] -> final hidden states [T, hidden]."""
        x, residual = self.run_layers(self.embed_tokens(ids), None, positions, meta)
        return self.final_norm(x, residual)

    def run_layers(self, x, residual, positions, meta):
        """The decoder layers this module holds, in order; (x, residual) in and out, each [T, hidden]."""
        for layer in self.layers.values():
            x, residual = layer(x, residual, positions, meta)
        return x, residual

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(x, residual)[0]

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:  # h: [N, hidden] -> [N, vocab] fp32
        return self.lm_head(h)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers.values()]
