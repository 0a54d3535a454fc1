"""The exact collectives of one step on one rank: what the profiler must record, op by op, byte for byte.

Where they come from (plait/layers, plait/parallel/pipeline.py):
- tensor parallel (tp > 1): the vocab-parallel embedding all-reduces [T, hidden] once (first stage); each layer's
  two row-parallel linears (o_proj, down_proj) all-reduce [T, hidden]; the LM head all-gathers fp32 logits of
  only the rows that need them (one per sampled sequence plus prompt-logprob rows; last stage, none if no rows).
  The all-gather's record is this rank's own shard (uneven vocabularies differ by rank); on the wire every
  shard is padded to the largest.
- pipeline (pp > 1): a stage receives the hidden state and the residual stream ([T, hidden] each) from the
  stage before and sends its own to the stage after: one send/recv pair per tensor per boundary.
- sequence parallel (sp = S > 1, times tp = T; plait/parallel/sequence.py): the step's T tokens are padded to P, a
  multiple of S, and a rank runs P/S of them. The embedding and the row-parallel linears all-reduce [P/S, hidden]
  within the TP group (T > 1); each layer sends its packed q|k|v ([P/S, every SP peer's q + 2 kv heads x
  head_dim]) and its attention output ([P, own heads x head_dim]) by all-to-all within the SP group; the final
  hidden states are all-gathered over the SP group ([P/S, hidden] shard) before the LM head's TP all-gather.
  A shifted step (Shift, T tokens <= threshold) runs as TP over all S*T ranks: no all-to-all and no gather, the
  row-parallel layers all-reduce [T, hidden] over all S*T, the embedding and LM head still over the TP group.
- Parallel Track (a PT model on M = tp ranks; plait/parallel/track.py): the embedding all-reduces and the LM head
  all-gathers over all M ranks, as under TP; inside a track of t > 1 ranks each layer's o_proj and down_proj
  all-reduce [T, hidden] over those t; at the end of each block of D layers the tracks' states are combined by
  one all-reduce [T, hidden] over the combine group (T ranks, or all M when M < T tracks).
- sampling (plait/engine/step_sampling.py; `Sampling`): spread (`sampling_parallel`) replaces the LM head's
  all-gather by one all-to-all of logit blocks over the same ranks (each sends every row's own columns: the same
  bytes as its all-gather shard). With asynchronous scheduling (one stage of several ranks) every rank keeps the
  step's sampled tokens (int64, one per sampled sequence) for the next step's inputs: broadcast from the sampler,
  or, spread, all-gathered from each rank's share of the sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.config import EngineConfig, ModelConfig
from plait.parallel.sequence import SequenceGrid
from plait.parallel.track import TrackLayout
from plait.plan.shapes import Layout, RankShard, rank_shard

LOGITS_ITEMSIZE = 4  # the LM head gathers fp32 logits (ParallelLMHead)
TOKEN_ITEMSIZE = 8  # sampled token ids are int64


@dataclass(frozen=True)
class Sampling:
    """How the last stage turns logits into tokens. spread: each rank samples a share of the sequences from its
    vocabulary columns (`sampling_parallel`). share_tokens: every rank keeps the sampled tokens on its device for
    the next step's inputs (asynchronous scheduling; the engine allows it with one stage only)."""

    spread: bool = False
    share_tokens: bool = False

    @classmethod
    def of(cls, cfg: EngineConfig) -> "Sampling":
        return cls(cfg.sampling_parallel, cfg.resolved_async_scheduling())


@dataclass(frozen=True)
class Collective:
    op: str  # all_reduce | all_gather | all_to_all | broadcast | send | recv
    bytes: int  # this rank's buffer, as `CommRecord.bytes` counts it (all_to_all: what it sends)
    group_size: int
    # embed | qkv_exchange | out_exchange | o_proj | down_proj | combine | sp_gather | lm_head | tokens | stage_in |
    # stage_out
    site: str
    layer: int | None = None
    peer: int | None = None  # send / recv: the other rank (within the replica)
    wire_bytes: int = 0  # what the cost model sizes: all-reduce buffer, padded all-gather output, message

    def key(self) -> tuple:
        """What a profiler record must match."""
        return (self.op, self.bytes, self.layer, self.peer)


def rank_collectives(m: ModelConfig, layout: Layout, rank: int, tokens: int, logit_rows: int, itemsize: int,
                     samples: int | None = None, sampling: Sampling = Sampling()) -> list[Collective]:
    """In the order the rank runs them; rank counts within a replica. samples: the step's sampled sequences
    (None: every logits row samples, as without prompt logprobs)."""
    body = _body_collectives(m, layout, rank, tokens, itemsize)
    sh = rank_shard(m, layout, rank)
    if not sh.last:
        return body
    stage = layout.tp * layout.sp  # the ranks that hold the logits
    head = layout.tp  # the ranks the LM head splits the vocabulary over (a PT model's M = tp too)
    return body + logits_collectives(sh, head, stage, rank % stage, logit_rows,
                                     logit_rows if samples is None else samples, sampling)


def logits_collectives(sh: RankShard, head: int, stage: int, rank: int, logit_rows: int, samples: int,
                       sampling: Sampling) -> list[Collective]:
    """The last stage's logits to tokens on one of its `stage` ranks (`rank` within them); the LM head splits the
    vocabulary over `head` of them (1: whole on each). Spread sampling and shared tokens as in the module doc; the
    spread share is the engine's split by rows (`StepSampler._owners`) when every sequence weighs one row (no
    prompt logprobs, no seeded sampling): sequences dealt in turn."""
    if logit_rows == 0:
        return []
    out = []
    if head > 1:
        shard, padded = (logit_rows * rows * LOGITS_ITEMSIZE for rows in (sh.vocab_rows, sh.vocab_rows_max))
        out.append(Collective("all_to_all", shard, head, "lm_head", wire_bytes=shard) if sampling.spread
                   else Collective("all_gather", shard, head, "lm_head", wire_bytes=padded * head))
    if sampling.share_tokens and stage > 1 and samples > 0:
        if sampling.spread:
            own, most = samples // stage + (rank < samples % stage), -(-samples // stage)
            out.append(Collective("all_gather", own * TOKEN_ITEMSIZE, stage, "tokens",
                                  wire_bytes=most * TOKEN_ITEMSIZE * stage))
        else:
            out.append(Collective("broadcast", samples * TOKEN_ITEMSIZE, stage, "tokens",
                                  wire_bytes=samples * TOKEN_ITEMSIZE))
    return out


def _body_collectives(m: ModelConfig, layout: Layout, rank: int, tokens: int, itemsize: int) -> list[Collective]:
    """Everything up to the logits."""
    if layout.sp > 1:
        return sequence_collectives(m, layout, rank, tokens, itemsize)
    if m.tracks is not None:
        return track_collectives(m, layout, rank, tokens, itemsize)
    sh = rank_shard(m, layout, rank)
    hidden = tokens * m.hidden_size * itemsize
    tp, out = layout.tp, []
    if not sh.first:
        out += [Collective("recv", hidden, layout.replica, "stage_in", peer=rank - tp, wire_bytes=hidden)] * 2
    if sh.first and tp > 1:
        out.append(Collective("all_reduce", hidden, tp, "embed", wire_bytes=hidden))
    if tp > 1:
        for layer in sh.layers:
            out += [Collective("all_reduce", hidden, tp, site, layer, wire_bytes=hidden) for site in ("o_proj", "down_proj")]
    if not sh.last:
        out += [Collective("send", hidden, layout.replica, "stage_out", peer=rank + tp, wire_bytes=hidden)] * 2
    return out


def sequence_collectives(m: ModelConfig, layout: Layout, rank: int, tokens: int, itemsize: int) -> list[Collective]:
    """The body's collectives under sequence parallelism (one stage of sp x tp ranks), SP-mode or shifted step."""
    S, T = layout.sp, layout.tp
    s, t = divmod(rank, T)
    sh = rank_shard(m, layout, rank)
    heads = [p.heads(m.num_heads, m.num_kv_heads) for p in SequenceGrid(s, S, t, T).peers()]
    shifted = layout.shifted(tokens)
    padded = tokens if shifted else -(-tokens // S) * S
    rows = tokens if shifted else padded // S  # the tokens this rank runs through the layers
    hidden = rows * m.hidden_size * itemsize
    reduce_group = S * T if shifted else T  # the row-parallel layers' sums
    out = [Collective("all_reduce", hidden, T, "embed", wire_bytes=hidden)] if T > 1 else []
    for layer in sh.layers:
        if not shifted:
            qkv = rows * sum(h.num_q + 2 * h.num_kv for h in heads) * m.head_dim * itemsize
            attn = padded * heads[s].num_q * m.head_dim * itemsize
            out += [Collective("all_to_all", qkv, S, "qkv_exchange", layer, wire_bytes=qkv),
                    Collective("all_to_all", attn, S, "out_exchange", layer, wire_bytes=attn)]
        if reduce_group > 1:
            out += [Collective("all_reduce", hidden, reduce_group, site, layer, wire_bytes=hidden)
                    for site in ("o_proj", "down_proj")]
    if not shifted:
        out.append(Collective("all_gather", hidden, S, "sp_gather", wire_bytes=hidden * S))
    return out


def track_collectives(m: ModelConfig, layout: Layout, rank: int, tokens: int, itemsize: int) -> list[Collective]:
    """The body's collectives of a Parallel Track model (one stage of M = tp ranks)."""
    M, sh = layout.tp, rank_shard(m, layout, rank)
    tracks = TrackLayout(m.tracks.num_tracks, M)
    t, combine = tracks.ranks_per_track, len(tracks.combine_groups()[0])
    hidden = tokens * m.hidden_size * itemsize
    out = [Collective("all_reduce", hidden, M, "embed", wire_bytes=hidden)] if M > 1 else []
    for layer in sh.layers:
        if t > 1:
            out += [Collective("all_reduce", hidden, t, site, layer, wire_bytes=hidden) for site in ("o_proj", "down_proj")]
        if combine > 1 and (layer + 1) % m.tracks.block_depth == 0:
            out.append(Collective("all_reduce", hidden, combine, "combine", wire_bytes=hidden))  # no layer's module
    return out
