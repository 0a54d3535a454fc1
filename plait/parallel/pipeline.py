"""Pipeline parallelism as data: which layers a stage owns, and the stage that runs them.

A stage is the model with the layers it does not own deleted (and the embedding on all but the first stage,
the final norm and LM head on all but the last): the model file knows nothing of pipelines. Between stages
the hidden state and the residual stream travel by send/recv through the communicator, one pair per boundary.
A stage's step is receive, body, send on: the body alone goes into a decode CUDA graph (plait.engine.cuda_graph),
the send/recv stay outside it, eager (PyTorch cannot capture NCCL point-to-point ops in a graph).
"""

from __future__ import annotations

import torch
from torch import nn

from plait.comm.communicator import Communicator
from plait.parallel.tensor import split_range


def stage_layers(num_layers: int, num_stages: int, partition: tuple[int, ...] | None) -> list[range]:
    """Each stage's contiguous layer range: `partition` (layers per stage) if given, else as even as possible."""
    if partition is None:
        return [range(*split_range(num_layers, num_stages, s)) for s in range(num_stages)]
    if sum(partition) != num_layers or min(partition) < 1:
        raise ValueError(
            f"pp_layer_partition {list(partition)} must give every stage at least one layer and sum to the "
            f"model's {num_layers} layers"
        )
    starts = [sum(partition[:s]) for s in range(num_stages)]
    return [range(a, a + n) for a, n in zip(starts, partition)]


def check_pipeline(num_layers: int, num_stages: int, partition: tuple[int, ...] | None) -> None:
    if num_stages > num_layers:
        raise ValueError(f"pipeline_parallel_size ({num_stages}) is larger than the model's {num_layers} layers")
    if partition is None and num_layers % num_stages:
        raise ValueError(
            f"the model's {num_layers} layers do not divide into {num_stages} pipeline stages; give "
            f"--pp-layer-partition (e.g. {','.join(str(len(r)) for r in stage_layers(num_layers, num_stages, None))})"
        )
    stage_layers(num_layers, num_stages, partition)


class PipelineStage(nn.Module):
    """One stage of a pipeline over `model`: receive (x, residual), run the owned layers, send them on."""

    def __init__(self, model: nn.Module, stage: int, num_stages: int, pipe: Communicator, prev_rank: int, next_rank: int):
        super().__init__()
        self.model, self.pipe = model, pipe
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.prev_rank, self.next_rank = prev_rank, next_rank
        dropped = []
        if not self.first and not (self.last and model.cfg.tie_word_embeddings):
            dropped.append("embed_tokens")  # a tied LM head on the last stage still reads this weight
        if not self.last:
            dropped += ["norm", "lm_head"]
        for name in dropped:
            delattr(model, name)
        model.dropped = tuple(dropped)  # the weight loader skips what the stage does not hold

    @property
    def cfg(self):
        return self.model.cfg

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor | None:
        """Returns the final hidden states on the last stage, None elsewhere."""
        out = self.body(ids, self.receive(ids.shape[0], ids.device), positions, meta)
        if self.last:
            return out
        self.send_on(*out)
        return None

    def receive(self, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stage before's (x, residual), each [T, hidden]; None on the first stage."""
        if self.first:
            return None
        shape, dtype = (num_tokens, self.model.cfg.hidden_size), next(self.model.parameters()).dtype
        x = self.pipe.recv(shape, dtype, device, self.prev_rank)
        return x, self.pipe.recv(shape, dtype, device, self.prev_rank)

    def body(self, ids: torch.Tensor, carried: tuple[torch.Tensor, torch.Tensor] | None, positions: torch.Tensor, meta):
        """The stage's own work, nothing sent between stages, so a CUDA graph can hold it (a TP group's collectives
        inside it are capturable): embed the ids (first stage) or go on from `carried`, run the owned layers, and on
        the last stage the final norm. -> the final hidden states [T, hidden] on the last stage, else (x, residual)
        for the next."""
        x, residual = (self.model.embed_tokens(ids), None) if carried is None else carried
        x, residual = self.model.run_layers(x, residual, positions, meta)
        return self.model.final_norm(x, residual) if self.last else (x, residual)

    def send_on(self, x: torch.Tensor, residual: torch.Tensor) -> None:
        self.pipe.send(x, self.next_rank)
        self.pipe.send(residual, self.next_rank)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(h)

    def attention_layers(self):
        return self.model.attention_layers()
