"""Configuration dataclasses: one place for every knob, its default, its help text and its checks.

Each config is frozen and validated in `__post_init__`, so a bad value fails at construction with a
`ValueError` that names the value and the allowed range, never later inside a forward pass. The CLI
builds its flags from these fields (`field(metadata={"help": ...})`), so names and defaults live here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def default_async_scheduling(device: str, pipeline_stages: int) -> bool:
    """Asynchronous scheduling left to its default: on where it was measured to pay, on the GPU (the host plans
    while the device computes), with one pipeline stage. The engine and the planner's replay both read it here."""
    return device == "cuda" and pipeline_stages == 1


@dataclass(frozen=True)
class TrackConfig:
    """The Parallel Track shape of a model (docs/parallel_track.md): `num_tracks` narrow decoder stacks at full
    residual width, whose states are combined (mean or sum) at the end of every block of `block_depth` layers.
    The widths are per track; `plait.models.track_format` reads them from config.json."""

    num_tracks: int
    block_depth: int
    combine: str  # "mean" | "sum"
    num_heads: int  # query heads of one track
    num_kv_heads: int  # KV heads of one track
    intermediate_size: int  # MLP width of one track

    def __post_init__(self) -> None:
        for name in ("num_tracks", "block_depth", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"track config: {name} must be >= 1, got {getattr(self, name)}")
        if self.combine not in ("mean", "sum"):
            raise ValueError(f"track_combine must be 'mean' or 'sum'; got {self.combine!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, normalised across families (Llama, Mistral, Qwen2, Qwen3).

    Built from a Hugging Face config by `plait.models.registry.model_config_from_hf`; the raw HF config is
    kept for rotary parameters (transformers computes every rope variant for us).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tracks: TrackConfig | None = None  # a Parallel Track model; None for a dense one
    hf_config: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )

    def step_activation_bytes(self, tokens: int, tp: int, itemsize: int) -> int:
        """Peak bytes of one step's temporaries at `tokens` tokens on one of tp ranks (hidden states and residual,
        q/k/v and the attention output, the MLP's gate|up and activation), plus 2 GiB for cuBLAS workspaces and the
        like: what the KV cache leaves free (the model runner sizes it so, the planner predicts it so)."""
        per_token = (3 * self.hidden_size + 2 * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim // tp
                     + 3 * self.intermediate_size // tp)
        return tokens * per_token * itemsize + (2 << 30)


@dataclass(frozen=True)
class ParallelConfig:
    """World = DP x PP x SP x TP. Inside one replica, rank r is tensor rank r % tp of pipeline stage r // tp; with
    sequence parallelism (one stage) rank r = s * tp + t is tensor rank t of sequence rank s (plait.parallel.sequence)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    pp_layer_partition: tuple[int, ...] | None = None  # layers per stage; None = as even as possible
    sequence_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "sequence_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel_size > 1 and self.pipeline_parallel_size > 1:
            raise ValueError(
                f"sequence_parallel_size ({self.sequence_parallel_size}) with pipeline_parallel_size "
                f"({self.pipeline_parallel_size}) > 1 is not supported yet: use --sp with --tp (and --shift) on one stage"
            )
        if self.pp_layer_partition is not None and len(self.pp_layer_partition) != self.pipeline_parallel_size:
            raise ValueError(
                f"pp_layer_partition {list(self.pp_layer_partition)} has {len(self.pp_layer_partition)} entries; "
                f"pipeline_parallel_size is {self.pipeline_parallel_size}"
            )

    @property
    def replica_world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.sequence_parallel_size

    @property
    def world_size(self) -> int:
        return self.replica_world_size * self.data_parallel_size


@dataclass(frozen=True)
class NodeLayout:
    """Where the ranks of one replica run: `nnodes` machines with `world / nnodes` ranks each, node k holding the
    global ranks k * per_node .. (k + 1) * per_node - 1 (local rank = device index). Node 0 hosts the rendezvous
    at master_addr:master_port and the driver (docs/architecture.md, "More than one machine")."""

    world: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, {self.nnodes - 1}] for nnodes {self.nnodes}, got {self.node_rank}")
        if self.world % self.nnodes:
            raise ValueError(f"the world of {self.world} ranks (tp x pp x sp) does not divide over nnodes {self.nnodes}: "
                             f"every node runs the same number of ranks")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"master_port must be in [1, 65535], got {self.master_port}")
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError(f"nnodes {self.nnodes} needs --master-port: every node must meet node 0 on the same port")
        if self.timeout_s <= 0:
            raise ValueError(f"dist_timeout must be > 0 seconds, got {self.timeout_s}")

    @property
    def ranks_per_node(self) -> int:
        return self.world // self.nnodes

    def ranks_of(self, node: int) -> range:
        return range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node)

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def spans_nodes(self, group_size: int) -> bool:
        """Whether aligned groups of `group_size` consecutive ranks (the tensor-parallel groups) cross a machine."""
        return self.ranks_per_node % group_size != 0


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs besides the weights. Field names follow vLLM's EngineArgs."""

    model: str | None = _help("HF checkpoint folder, GGUF file or preset name; empty = embedded SmolLM2.", default=None)
    tokenizer: str | None = _help("Tokenizer folder if not the model's.", default=None)
    load_format: str = _help("auto | safetensors | gguf | dummy (random weights of the config).", default="auto")
    dtype: str = _help("auto | float32 | bfloat16 | float16.", default="auto")
    device: str = _help("cpu | cuda | auto.", default="auto")
    tensor_parallel_size: int = _help("Tensor-parallel ranks, one process each.", default=1)
    pipeline_parallel_size: int = _help("Pipeline stages, each of tensor_parallel_size ranks.", default=1)
    data_parallel_size: int = _help("Independent replicas behind one front end (each TP x PP).", default=1)
    pp_layer_partition: str | None = _help("Layers per pipeline stage, comma-separated (default: even).", default=None)
    sequence_parallel_size: int = _help("Ulysses sequence-parallel ranks: tokens split, heads exchanged; times "
                                        "tensor_parallel_size ranks in all (weights sharded by the TP part).", default=1)
    shift_parallel: bool = _help("Shift: steps of at most --shift-threshold tokens run tensor-parallel over all "
                                 "sp x tp ranks (same KV cache).", default=False)
    shift_threshold: int | None = _help("Scheduled tokens at or below which a Shift step runs tensor-parallel. "
                                        "Default: with --calibration, where the analytical model predicts SP-mode steps to "
                                        "become faster than TP-mode ones for this model and degree (a table of measured "
                                        "step times there wins); without, 256. Printed at start-up.", default=None)
    calibration: str | None = _help("A `plait calibrate` file whose figures choose the default --shift-threshold "
                                    "(default: the built-in H200 figures, as `plait plan`).", default=None)
    max_model_len: int | None = _help("Longest prompt + output, in tokens (default: the model's).", default=None)
    max_num_seqs: int = _help("Most sequences in one step.", default=64)
    max_num_batched_tokens: int | None = _help("Token budget of one step (default: 2048 or max_model_len).", default=None)
    enable_chunked_prefill: bool = _help("Split long prompts over steps.", default=True)
    enable_prefix_caching: bool = _help("Share the KV blocks of a prompt's leading full blocks with earlier requests "
                                        "that had the same tokens, and compute only the rest (vLLM's automatic "
                                        "prefix caching).", default=True)
    block_size: int = _help("Tokens per KV-cache block.", default=16)
    gpu_memory_utilization: float = _help("Share of GPU memory the engine may use (weights + KV cache).", default=0.9)
    kv_cache_memory_bytes: int | None = _help("KV-cache size per rank in bytes (default on CPU: 1 GiB).", default=None)
    num_gpu_blocks_override: int | None = _help("Force the number of KV-cache blocks (tests, debugging).", default=None)
    attention_backend: str = _help("auto | torch (reference) | triton (paged kernels); auto = triton on GPU.", default="auto")
    all_reduce_backend: str = _help("auto | nccl | symm_mem (P2P one/two-shot for messages up to 4 MB; auto = symm_mem on GPU).",
                                    default="auto")
    fused_allreduce_norm: str = _help("auto | on | off: finish each row-parallel all-reduce inside the next RMSNorm, "
                                      "one symmetric-memory kernel on GPU (docs/fused_allreduce_norm.md); auto = on "
                                      "GPU for the step sizes where it was measured faster.", default="auto")
    token_split_overlap: bool = _help("Split steps of at least --overlap-min-tokens in two and run one half's "
                                      "all-reduce + norm under the other half's compute (TokenWeave). Off by "
                                      "default until measured on the GPUs (docs/fused_allreduce_norm.md).",
                                      default=False)
    overlap_min_tokens: int = _help("Smallest step the token-split overlap splits.", default=1024)
    skip_all_reduce: bool = _help("Benchmarks only: every tensor-parallel all-reduce returns its input unreduced, "
                                  "so a step costs what it would without communication (wrong outputs).", default=False)
    enforce_eager: bool = _help("Never replay steps from CUDA graphs.", default=False)
    max_prefill_graph_tokens: int = _help("Largest step with new prompt tokens that replays from a CUDA graph: a new "
                                          "prompt alone in its step, or several sequences mixing prompts, chunks and "
                                          "decodes; such short steps are launch-bound (0: always eager).", default=512)
    async_scheduling: bool | None = _help("Plan step N+1 while the ranks run step N; sampled tokens feed the next step "
                                          "on the device and reach the host a step later (docs/step_loop.md). "
                                          "Default: on with a GPU and one pipeline stage, else off.", default=None)
    async_output_proc: bool = _help("Detokenize, check stop strings and build outputs in a process behind "
                                    "the step loop; outputs come a step later.", default=False)
    sampling_parallel: bool = _help("Each tensor-parallel rank samples its share of the batch from vocab-parallel "
                                    "logits (all-to-all) instead of one rank sampling gathered logits.", default=False)
    profile_comm: bool = _help("Record every collective (op, bytes, group, step, layer, time); runs eager "
                               "(docs/communication.md).", default=False)
    seed: int = _help("Seed for dummy weights and for requests without their own seed.", default=0)
    nnodes: int = _help("Machines the ranks are spread over (as torchrun): each starts world / nnodes of them.",
                        default=1)
    node_rank: int = _help("This machine's index, 0 .. nnodes - 1; node 0 runs the scheduler (the driver), the others "
                           "follow it.", default=0)
    master_addr: str = _help("Address of node 0, where every rank meets (the rendezvous).", default="127.0.0.1")
    master_port: int | None = _help("Port of the rendezvous on node 0 (default on one machine: a free one).",
                                    default=None)
    dist_timeout: float = _help("Seconds to wait for every node to join the rendezvous, and for a node to reach "
                                "node 0, before failing.", default=300.0)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be cpu, cuda or auto; got {self.device!r}")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(f"load_format must be auto, safetensors, gguf or dummy; got {self.load_format!r}")
        if self.all_reduce_backend not in ("auto", "nccl", "symm_mem"):
            raise ValueError(f"all_reduce_backend must be auto, nccl or symm_mem; got {self.all_reduce_backend!r}")
        if self.fused_allreduce_norm not in ("auto", "on", "off"):
            raise ValueError(f"fused_allreduce_norm must be auto, on or off; got {self.fused_allreduce_norm!r}")
        forced = ("fused_allreduce_norm='on'" if self.fused_allreduce_norm == "on"
                  else "token_split_overlap" if self.token_split_overlap else None)
        if forced and (self.pipeline_parallel_size > 1 or self.sequence_parallel_size > 1):
            raise ValueError(
                f"{forced} needs pipeline_parallel_size 1 and sequence_parallel_size 1 (got "
                f"{self.pipeline_parallel_size} and {self.sequence_parallel_size}): it fuses the tensor-parallel "
                f"all-reduce into the next layer's norm, which a pipeline stage boundary or a sequence split separates"
            )
        if self.token_split_overlap and self.fused_allreduce_norm == "off":
            raise ValueError("token_split_overlap needs fused_allreduce_norm auto or on: the halves overlap at the "
                             "norms that finish each all-reduce")
        if self.overlap_min_tokens < 2:
            raise ValueError(f"overlap_min_tokens must be >= 2 (a step is split in two), got {self.overlap_min_tokens}")
        if self.shift_parallel and self.sequence_parallel_size == 1:
            raise ValueError("shift_parallel needs sequence_parallel_size > 1: Shift switches between SP and TP over those ranks")
        if self.shift_threshold is not None and (not self.shift_parallel or self.shift_threshold < 0):
            raise ValueError(f"shift_threshold ({self.shift_threshold}) needs shift_parallel and must be >= 0 tokens")
        if self.sampling_parallel and self.sequence_parallel_size > 1 and self.tensor_parallel_size > 1:
            raise ValueError(
                f"sampling_parallel with sequence_parallel_size ({self.sequence_parallel_size}) x tensor_parallel_size "
                f"({self.tensor_parallel_size}) is not supported: the LM head splits the vocabulary over the "
                f"{self.tensor_parallel_size} TP ranks, sampling would spread over all "
                f"{self.sequence_parallel_size * self.tensor_parallel_size}; drop --sampling-parallel"
            )
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton; got {self.attention_backend!r}")
        self.parallel  # noqa: B018 - validates the degrees
        self.nodes  # noqa: B018 - validates the placement over machines
        if self.nnodes > 1 and self.data_parallel_size > 1:
            raise ValueError(
                f"data_parallel_size ({self.data_parallel_size}) with nnodes ({self.nnodes}) > 1 is not supported yet: "
                f"the ranks of one replica (tp x pp x sp) are what spans the machines"
            )
        if self.all_reduce_backend == "symm_mem" and self.nodes.spans_nodes(self.tensor_parallel_size * self.sequence_parallel_size):
            raise ValueError(
                f"all_reduce_backend='symm_mem' needs each tensor-parallel group on one machine; with "
                f"{self.nodes.ranks_per_node} ranks per node a group of {self.tensor_parallel_size * self.sequence_parallel_size} "
                f"spans nodes: use nccl (or auto)"
            )
        if self.async_scheduling and self.pipeline_parallel_size > 1:
            raise ValueError(
                f"async_scheduling needs pipeline_parallel_size 1, got {self.pipeline_parallel_size}: with stages, "
                f"one plan per micro-batch is already in flight while the driver plans the next"
            )
        for name, low in (("max_num_seqs", 1), ("block_size", 1), ("max_prefill_graph_tokens", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")

    @property
    def parallel(self) -> ParallelConfig:
        partition = None
        if self.pp_layer_partition:
            try:
                partition = tuple(int(n) for n in self.pp_layer_partition.split(","))
            except ValueError:
                raise ValueError(f"pp_layer_partition must be comma-separated integers, got {self.pp_layer_partition!r}") from None
        return ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size, self.data_parallel_size, partition,
                              self.sequence_parallel_size)

    @property
    def nodes(self) -> NodeLayout:
        return NodeLayout(self.parallel.replica_world_size, self.nnodes, self.node_rank, self.master_addr,
                          self.master_port, self.dist_timeout)

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but torch sees no CUDA device; use device='cpu'")
        return self.device

    def resolved_async_scheduling(self) -> bool:
        if self.async_scheduling is None:
            return default_async_scheduling(self.resolved_device(), self.pipeline_parallel_size)
        return self.async_scheduling

    def resolved_attention_backend(self) -> str:
        if self.attention_backend == "auto":
            return "triton" if self.resolved_device() == "cuda" else "torch"
        return self.attention_backend

    def torch_dtype(self, model_dtype: torch.dtype | None = None) -> torch.dtype:
        """'auto' means bf16 on GPU (the model's own dtype when it is a 16-bit one) and fp32 on CPU."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.resolved_device() == "cpu":
            return torch.float32
        return model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's limits, resolved against the model (see `resolve_scheduler_config`)."""

    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    block_size: int

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_model_len ({self.max_model_len}), or a long prompt could never be scheduled"
            )


def resolve_scheduler_config(cfg: EngineConfig, model: ModelConfig) -> SchedulerConfig:
    max_len = cfg.max_model_len or model.max_position_embeddings
    if max_len < 1:
        raise ValueError(f"max_model_len must be >= 1, got {max_len}")
    if max_len > model.max_position_embeddings:
        raise ValueError(
            f"max_model_len ({max_len}) exceeds the model's max_position_embeddings ({model.max_position_embeddings})"
        )
    budget = cfg.max_num_batched_tokens or (2048 if cfg.enable_chunked_prefill else max(2048, max_len))
    return SchedulerConfig(max_len, cfg.max_num_seqs, budget, cfg.enable_chunked_prefill, cfg.block_size)
