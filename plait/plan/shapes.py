"""What each rank holds under a parallel layout: the model's shape cut by the same plans the engine uses.

The model shape is plait's `ModelConfig`, read exactly as the engine reads it (a config.json folder, a GGUF file,
a preset name, or none for the embedded SmolLM2). Shards come from `TensorParallel` and `stage_layers`, the code
that shards the real model, so an uneven split (9 heads over 2 ranks) is predicted as it runs.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from plait.config import EngineConfig, ModelConfig, ParallelConfig
from plait.parallel.pipeline import check_pipeline, stage_layers
from plait.parallel.sequence import SequenceGrid, check_sequence_parallel
from plait.parallel.tensor import TensorParallel, check_tensor_parallel
from plait.parallel.track import TrackLayout, check_track_parallel


def load_model_config(model: str | None) -> ModelConfig:
    """The shape of `model` (folder, .gguf, preset name; None = embedded SmolLM2) without loading weights."""
    from plait.models.loader import load_hf_config, resolve_model
    from plait.models.registry import model_config_from_hf

    return model_config_from_hf(load_hf_config(resolve_model(model)))


@dataclass(frozen=True)
class Layout:
    """World = dp x pp x sp x tp. Rank r of a replica is tensor rank r % tp of stage r // tp (as the engine numbers
    them); with sequence parallelism (one stage) it is tensor rank r % tp of sequence rank r // tp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    partition: tuple[int, ...] | None = None  # layers per stage; None = as even as possible
    sp: int = 1
    shift_threshold: int | None = None  # Shift: steps of at most this many tokens run TP over all sp x tp ranks

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "sp"):
            if getattr(self, name) < 1:
                raise ValueError(f"layout {name} must be >= 1, got {getattr(self, name)}")
        if self.sp > 1 and self.pp > 1:
            raise ValueError(f"layout sp {self.sp} with pp {self.pp}: the engine runs sequence parallelism on one stage")
        if self.shift_threshold is not None and self.sp == 1:
            raise ValueError("layout shift_threshold needs sp > 1: Shift switches between SP and TP over those ranks")

    @classmethod
    def of(cls, cfg: EngineConfig) -> "Layout":
        """The layout an engine runs (its Shift threshold resolved: `LLMEngine` replaces an automatic one)."""
        assert not cfg.shift_parallel or cfg.shift_threshold is not None, "Shift's threshold is resolved at start-up"
        par = cfg.parallel
        return cls(par.tensor_parallel_size, par.pipeline_parallel_size, par.data_parallel_size, par.pp_layer_partition,
                   par.sequence_parallel_size, cfg.shift_threshold if cfg.shift_parallel else None)

    @property
    def replica(self) -> int:
        return self.tp * self.pp * self.sp

    @property
    def world(self) -> int:
        return self.replica * self.dp

    @property
    def name(self) -> str:
        sp = "SHIFT" if self.shift_threshold is not None else "SP"
        parts = [f"{k}{v}" for k, v in (("TP", self.tp), ("PP", self.pp), (sp, self.sp), ("DP", self.dp)) if v > 1]
        return "x".join(parts) or "TP1"

    def shifted(self, tokens: int) -> bool:
        """Whether a step of `tokens` runs tensor-parallel over all sp x tp ranks (Shift's TP mode)."""
        return self.shift_threshold is not None and tokens <= self.shift_threshold

    def check(self, m: ModelConfig) -> None:
        """The engine's own checks: a ValueError for a layout it would refuse."""
        check_tensor_parallel(self.tp, m.num_heads, m.num_kv_heads)
        check_sequence_parallel(self.sp, self.tp, m.num_heads, m.num_kv_heads)
        check_pipeline(m.num_layers, self.pp, self.partition)
        check_track_parallel(ParallelConfig(self.tp, self.pp, self.dp, self.partition, self.sp), m)


@dataclass(frozen=True)
class _Position:
    """A rank's place in its TP group: all `TensorParallel` reads of its communicator."""

    rank: int
    size: int


@dataclass(frozen=True)
class RankShard:
    """The slice of the model one rank of a replica holds."""

    stage: int
    tp_rank: int
    layers: range
    q_heads: int
    kv_heads: int  # includes KV heads replicated because this rank's query heads straddle them
    intermediate: int
    vocab_rows: int
    vocab_rows_max: int  # the largest shard: what an uneven all-gather pads to
    first: bool  # holds the embedding
    last: bool  # holds the final norm and LM head


@functools.lru_cache(maxsize=4096)
def rank_shard(m: ModelConfig, layout: Layout, rank: int) -> RankShard:
    """`rank` counts within one replica (0 .. tp*pp - 1). Under sequence parallelism the TP shard of the embedding,
    LM head and layers is this one; its heads and MLP columns are split S*T ways instead (collectives.py)."""
    assert 0 <= rank < layout.replica, f"rank {rank} outside a replica of {layout.replica} ranks"
    stage, tp_rank = rank // (layout.tp * layout.sp), rank % layout.tp
    plan = TensorParallel(_Position(tp_rank, layout.tp))
    q_heads, kv_heads, intermediate = _track_part(m, layout.tp, tp_rank) if m.tracks else _tensor_part(m, plan)
    sizes = plan.sizes(m.vocab_size)
    return RankShard(
        stage=stage, tp_rank=tp_rank,
        layers=stage_layers(m.num_layers, layout.pp, layout.partition)[stage],
        q_heads=q_heads, kv_heads=kv_heads, intermediate=intermediate,
        vocab_rows=sizes[tp_rank], vocab_rows_max=max(sizes),
        first=stage == 0, last=stage == layout.pp - 1,
    )



def _tensor_part(m: ModelConfig, plan: TensorParallel) -> tuple[int, int, int]:
    """(query heads, KV heads, MLP columns) of a dense model's layer on one tensor-parallel rank."""
    heads = plan.heads(m.num_heads, m.num_kv_heads)
    lo, hi = plan.split(m.intermediate_size)
    return heads.num_q, heads.num_kv, hi - lo


def _track_part(m: ModelConfig, num_ranks: int, rank: int) -> tuple[int, int, int]:
    """The same for a Parallel Track model over `num_ranks` ranks (parallel/track.py): the rank's tracks, each cut
    by the tensor-parallel plan inside its track, counted together (they run side by side, weights stacked)."""
    tracks = TrackLayout(m.tracks.num_tracks, num_ranks)
    t = tracks.ranks_per_track
    q, kv, cols = _tensor_part(dataclasses.replace(m, num_heads=m.tracks.num_heads, num_kv_heads=m.tracks.num_kv_heads,
                                                   intermediate_size=m.tracks.intermediate_size),
                               TensorParallel(_Position(rank % t, t)))
    n = len(tracks.tracks_of(rank))
    return n * q, n * kv, n * cols


@functools.lru_cache(maxsize=4096)
def sequence_shards(m: ModelConfig, layout: Layout, rank: int) -> tuple[RankShard, RankShard]:
    """(held, own) of a rank under sequence parallelism. `held`: the weights it stores, its TP shard as the S parts
    of its SP peers side by side (KV heads counted per peer, as the QKV projection stores them), read in full by
    every SP-mode step: weights are replicated over SP. `own`: its part of the S*T-way split, the heads it attends
    with and caches in both modes, and the view a Shift TP-mode step reads. Embedding and LM head rows are the TP
    shard's in both."""
    sh = rank_shard(m, layout, rank)
    s, t = divmod(rank, layout.tp)
    peers = SequenceGrid(s, layout.sp, t, layout.tp).peers()
    heads = [p.heads(m.num_heads, m.num_kv_heads) for p in peers]
    cols = [hi - lo for lo, hi in (p.split(m.intermediate_size) for p in peers)]
    held = dataclasses.replace(sh, q_heads=sum(h.num_q for h in heads), kv_heads=sum(h.num_kv for h in heads),
                               intermediate=sum(cols))
    own = dataclasses.replace(sh, q_heads=heads[s].num_q, kv_heads=heads[s].num_kv, intermediate=cols[s])
    return held, own
