"""The Parallel Track (PT) decoder (docs/parallel_track.md), built of the Llama family's decoder layers.

T tracks, each an ordinary pre-norm decoder stack with the full residual width but narrow attention and MLP, read
the same hidden state h at the start of each block of D layers; at the block's end h becomes the mean (or sum) of
their states. One shared embedding, final norm and LM head. Which tracks this rank holds, how a track is sharded
and where the tracks meet is the `TrackParallel` plan's business: the same code runs on 1 rank or on T x t.

Layer i of every track this rank holds is one `DecoderLayer` built from the track plan's grouped layers: the local
tracks' states travel as one tensor [tracks, T, hidden] and run side by side (batched GEMMs, one attention over all
their heads), however many tracks the rank holds.
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
from plait.parallel.track import TrackParallel


class ParallelTrackForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: TrackParallel, max_positions: int):
        super().__init__()
        self.cfg = cfg
        tracks = cfg.tracks
        narrow = dataclasses.replace(cfg, num_heads=tracks.num_heads, num_kv_heads=tracks.num_kv_heads,
                                     intermediate_size=tracks.intermediate_size, tracks=None)
        rope = RotaryEmbedding(cfg.hf_config, cfg.head_dim, max_positions)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, plan.vocab)
        self.tracks = plan.tracks  # the checkpoint's indices of the tracks this rank holds, in stacking order
        self.layers = nn.ModuleDict({str(i): DecoderLayer(narrow, plan, rope) for i in range(cfg.num_layers)})
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

    def run_tracks(self, h: torch.Tensor, block: range, positions, meta) -> torch.Tensor:
        """h: [T, hidden], the block's input -> each local track's state at the block's end, [tracks, T, hidden]. Every
        track starts from h; a copy per track, as the first residual and the one the fused norm adds into in place."""
        x, residual = h.expand(len(self.tracks), *h.shape).contiguous(), None
        for i in block:
            x, residual = self.layers[str(i)](x, residual, positions, meta)
        return x + residual

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:  # h: [N, hidden] -> [N, vocab] fp32
        return self.lm_head(h)

    def attention_layers(self) -> list[PagedAttention]:
        """One attention per layer over every local track's heads: the runner gives each layer one KV cache."""
        return [layer.self_attn.attn for layer in self.layers.values()]

    def holds(self, path: str) -> bool:
        """Whether checkpoint module `path` belongs on this rank: other ranks' tracks are skipped when loading
        (a track index beyond the model's is not skipped, so the loader names it as misplaced)."""
        top, _, rest = path.partition(".")
        index = rest.split(".", 1)[0]
        if top != "tracks" or not (index.isdigit() and int(index) < self.cfg.tracks.num_tracks):
            return True
        return int(index) in self.tracks

    def grouped_target(self, path: str, name: str) -> tuple[str, str]:
        """Checkpoint module `path` and tensor `name` -> where they load: track k's tensors of layer i go to layer i's
        grouped layer as "{k}.{name}", which fills track k's slice of the stacked parameter (plait.layers.grouped)."""
        top, _, rest = path.partition(".")
        if top != "tracks":
            return path, name
        track, _, path = rest.partition(".")
        return path, f"{track}.{name}"
