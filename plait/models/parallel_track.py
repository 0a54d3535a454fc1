"""The Parallel Track (PT) decoder (docs/parallel_track.md), built of the Llama family's decoder layers.

T tracks, each an ordinary pre-norm decoder stack with the full residual width but narrow attention and MLP, read
the same hidden state h at the start of each block of D layers; at the block's end h becomes the mean (or sum) of
their states. One shared embedding, final norm and LM head. Which tracks this rank holds, how a track is sharded
and where the tracks meet is the `TrackParallel` plan's business: the same code runs on 1 rank or on T x t.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from plait.config import ModelConfig
from plait.layers.attention import AttentionMetadata, PagedAttention
from plait.layers.combine import TrackCombine
from plait.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from plait.layers.norm import RMSNorm
from plait.layers.rotary import RotaryEmbedding
from plait.models.llama import DecoderLayer
from plait.parallel.tensor import TensorParallel
from plait.parallel.track import TrackParallel


class Track(nn.Module):
    """One track: all L decoder layers of its narrow width; a block runs a slice of them."""

    def __init__(self, cfg: ModelConfig, plan: TensorParallel, rope: RotaryEmbedding):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, plan, rope) for i in range(cfg.num_layers)})

    def forward(self, h: torch.Tensor, block: range, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """h: [T, hidden], the block's input -> the track's state at the block's end, [T, hidden]."""
        x, residual = h, None
        for i in block:
            x, residual = self.layers[str(i)](x, residual, positions, meta)
        return x + residual


class ParallelTrackForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: TrackParallel, max_positions: int):
        super().__init__()
        self.cfg = cfg
        tracks = cfg.tracks
        narrow = dataclasses.replace(cfg, num_heads=tracks.num_heads, num_kv_heads=tracks.num_kv_heads,
                                     intermediate_size=tracks.intermediate_size, tracks=None)
        rope = RotaryEmbedding(cfg.hf_config, cfg.head_dim, max_positions)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, plan.vocab)
        # Keyed by the checkpoint's track index: a rank holds only its own tracks and loads them by name.
        self.tracks = nn.ModuleDict({str(k): Track(narrow, plan.track, rope) for k in plan.tracks})
        self.combine = TrackCombine(tracks.num_tracks, tracks.combine, plan.combine)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, plan.vocab)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        D = tracks.block_depth
        self.blocks = [range(first, first + D) for first in range(0, cfg.num_layers, D)]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """ids, positions: [T] -> final hidden states [T, hidden]."""
        h = self.embed_tokens(ids)
        for block in self.blocks:
            h = self.combine(self.run_tracks(h, block, positions, meta))
        return self.norm(h)

    def run_tracks(self, h: torch.Tensor, block: range, positions, meta) -> list[torch.Tensor]:
        """Each local track's block-end state, one track after another. A track's first residual is h itself, and
        on GPU the fused norm adds into the residual in place: every track but the last gets its own copy of h."""
        tracks = list(self.tracks.values())
        return [track(h if k == len(tracks) - 1 else h.clone(), block, positions, meta) for k, track in enumerate(tracks)]

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:  # h: [N, hidden] -> [N, vocab] fp32
        return self.lm_head(h)

    def attention_layers(self) -> list[PagedAttention]:
        """Every local track's attention, track by track: the runner gives each its own KV cache."""
        return [layer.self_attn.attn for track in self.tracks.values() for layer in track.layers.values()]

    def holds(self, path: str) -> bool:
        """Whether checkpoint module `path` belongs on this rank: other ranks' tracks are skipped when loading
        (a track index beyond the model's is not skipped, so the loader names it as misplaced)."""
        top, _, rest = path.partition(".")
        index = rest.split(".", 1)[0]
        return top != "tracks" or index in self.tracks or not (index.isdigit() and int(index) < self.cfg.tracks.num_tracks)
