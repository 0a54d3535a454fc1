"""The exact collectives of one step on one rank: what the profiler must record, op by op, byte for byte.

Where they come from (plait/layers, plait/parallel/pipeline.py):
- tensor parallel (tp > 1): the vocab-parallel embedding all-reduces [T, hidden] once (first stage); each layer's
  two row-parallel linears (o_proj, down_proj) all-reduce [T, hidden]; the LM head all-gathers fp32 logits of
  only the rows that need them (one per sampled sequence plus prompt-logprob rows; last stage, none if no rows).
  The all-gather's record is this rank's own shard (uneven vocabularies differ by rank); on the wire every
  shard is padded to the largest.
- pipeline (pp > 1): a stage receives the hidden state and the residual stream ([T, hidden] each) from the
  stage before and sends its own to the stage after: one send/recv pair per tensor per boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.config import ModelConfig
from plait.plan.shapes import Layout, rank_shard

LOGITS_ITEMSIZE = 4  # the LM head gathers fp32 logits (ParallelLMHead)


@dataclass(frozen=True)
class Collective:
    op: str  # all_reduce | all_gather | send | recv
    bytes: int  # this rank's buffer, as `CommRecord.bytes` counts it
    group_size: int
    site: str  # embed | o_proj | down_proj | lm_head | stage_in | stage_out
    layer: int | None = None
    peer: int | None = None  # send / recv: the other rank (within the replica)
    wire_bytes: int = 0  # what the cost model sizes: all-reduce buffer, padded all-gather output, message

    def key(self) -> tuple:
        """What a profiler record must match."""
        return (self.op, self.bytes, self.layer, self.peer)


def rank_collectives(m: ModelConfig, layout: Layout, rank: int, tokens: int, logit_rows: int,
                     itemsize: int) -> list[Collective]:
    """In the order the rank runs them; rank counts within a replica."""
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
    if sh.last and tp > 1 and logit_rows > 0:
        shard, padded = (logit_rows * rows * LOGITS_ITEMSIZE for rows in (sh.vocab_rows, sh.vocab_rows_max))
        out.append(Collective("all_gather", shard, tp, "lm_head", wire_bytes=padded * tp))
    return out


def replica_collectives(m: ModelConfig, layout: Layout, tokens: int, logit_rows: int, itemsize: int) -> list[list[Collective]]:
    """rank_collectives for every rank of one replica."""
    return [rank_collectives(m, layout, r, tokens, logit_rows, itemsize) for r in range(layout.replica)]
