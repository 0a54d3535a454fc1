"""The Llama family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2), written once for any parallel plan.

Family differences are flags of `ModelConfig` (qkv bias, per-head q/k norm), not subclasses. Which rows a
rank holds, where partial sums are reduced and how heads move between ranks is decided by the parallel plan
(tensor, sequence or shift) that builds the parallel layers.
"""

from __future__ import annotations

import torch
from torch import nn

from plait.config import ModelConfig
from plait.layers.attention import AttentionMetadata, PagedAttention
from plait.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from plait.layers.rotary import RotaryEmbedding
from plait.parallel.tensor import TensorParallel


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: TensorParallel, rope: RotaryEmbedding):
        super().__init__()
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        heads = plan.heads(H, KV)  # the heads this rank attends with
        self.qkv_proj = plan.qkv_proj(cfg.hidden_size, H, KV, D, cfg.qkv_bias)
        self.heads = plan.head_exchange(H, KV, D)
        self.q_norm = plan.head_norm(D, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = plan.head_norm(D, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.attn = PagedAttention(heads.num_q, heads.num_kv, D, heads.kv_index(), rope)
        self.o_proj = plan.o_proj(H, KV, D, cfg.hidden_size, cfg.o_bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.heads.qkv(self.qkv_proj(x))  # [T, heads, D], [T, kv_heads, D] x 2
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(self.heads.out(self.attn(q, k, v, positions, meta)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: TensorParallel):
        super().__init__()
        self.gate_up_proj = plan.gate_up_proj(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.act = plan.activation(cfg.intermediate_size)  # silu(gate) * up
        self.down_proj = plan.down_proj(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: TensorParallel, rope: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = plan.norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, plan, rope)
        self.post_attention_layernorm = plan.norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, plan)

    def seams(self) -> list[tuple[nn.Module, object]]:
        """The block as (norm, body) pairs. Each norm also finishes the all-reduce of the body before it, so a seam
        is where a step split in two can run one half's communication under the other half's compute."""
        return [(self.input_layernorm, self.self_attn), (self.post_attention_layernorm, lambda x, positions, meta: self.mlp(x))]

    def forward(self, x, residual, positions, meta):
        """Pre-norm block; the residual stream is carried separately so each add fuses into the next norm."""
        for norm, body in self.seams():
            x, residual = (norm(x), x) if residual is None else norm(x, residual)
            x = body(x, positions, meta)
        return x, residual


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
        self.norm = plan.norm(cfg.hidden_size, cfg.rms_norm_eps)
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

    def seams(self) -> list[tuple[nn.Module, object]]:
        """Every layer's seams, then the final norm (no body): the order a split step issues them in."""
        return [seam for layer in self.layers.values() for seam in layer.seams()] + [(self.norm, None)]

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(x, residual)[0]

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:  # h: [N, hidden] -> [N, vocab] fp32
        return self.lm_head(h)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers.values()]
