"""Gather-then-sample against spread sampling, the LM head and the sampler alone, on R GPUs.

One rank per GPU (one process each). A step: the LM head on [batch, hidden] bf16 hidden states, then the step's
sampling as the engine runs it with asynchronous scheduling (every rank ends with every token on its device):
gathered = all-gather fp32 logits [batch, vocab] to every rank, rank 0 samples, broadcast tokens; spread =
all-to-all of logit blocks, each rank samples batch/R rows, all-gather tokens. Timed over many steps after a
warm-up, greedy and with temperature/top-k/top-p; the answers are resolved (tokens on the host) in each step.

    python3 benchmarks/spread_sampling.py --gpus 4 --batch-size 256 --output-json out.json   # qwen2.5 vocabulary
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plait.bench.results import write_result  # noqa: E402
from plait.comm.communicator import Communicator  # noqa: E402
from plait.config import EngineConfig  # noqa: E402
from plait.engine.sampled_tokens import SampledTokens  # noqa: E402
from plait.engine.step_sampling import StepSampler  # noqa: E402
from plait.executor.executor import free_port  # noqa: E402
from plait.layers.embedding import ParallelLMHead  # noqa: E402
from plait.parallel.context import RankContext  # noqa: E402
from plait.parallel.tensor import TensorParallel  # noqa: E402
from plait.sampling_params import SamplingParams  # noqa: E402

WORKLOADS = {"greedy": SamplingParams(temperature=0.0),
             "top_k_top_p": SamplingParams(temperature=0.8, top_k=50, top_p=0.95)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rank_main(rank: int, args, port: int, queue) -> None:
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.gpus)
    comm = Communicator(dist.group.WORLD, rank, args.gpus)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.manual_seed(rank)
    with torch.device(device):
        dtype = torch.bfloat16 if cuda else torch.float32
        model = nn.ModuleDict({"lm_head": ParallelLMHead(args.vocab, args.hidden, TensorParallel(comm))}).to(dtype)
        model.lm_head.weight.normal_(0, 0.02)
        hidden = torch.randn(args.batch_size, args.hidden, dtype=dtype)
    ctx = RankContext(rank, comm, None)
    figures = {}
    for name, params in WORKLOADS.items():
        mirrors = {i: ([1, 2, 3, 4], params, 4) for i in range(args.batch_size)}
        rows = {i: i for i in range(args.batch_size)}
        for spread in (False, True):
            cfg = EngineConfig(device=args.device, async_scheduling=True, sampling_parallel=spread)
            sampler = StepSampler(cfg, ctx, device, {0}, model, SampledTokens(device))
            times = []
            for i in range(args.warmup + args.iters):
                _sync(device)
                dist.barrier()
                start = time.perf_counter()
                answer = sampler.run(list(rows), model.lm_head(hidden), rows, {}, mirrors)
                if answer is not None:
                    answer.resolve()
                _sync(device)
                dist.barrier()
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
            figures[f"{name}_{'spread' if spread else 'gathered'}_ms"] = statistics.median(times) * 1e3
    if rank == 0:
        queue.put(figures)
    dist.barrier()
    os._exit(0)  # leave without NCCL teardown (../shared/DEVICE.md)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=4, help="ranks: one GPU each (or CPU processes)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=152064)  # Qwen2.5
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=rank_main, args=(r, args, port, queue)) for r in range(args.gpus)]
    for p in procs:
        p.start()
    figures = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=30)
    result = {"benchmark": "spread_sampling", "gpus": args.gpus, "batch_size": args.batch_size, "vocab": args.vocab,
              "hidden": args.hidden, **figures}
    for name in WORKLOADS:
        result[f"{name}_speedup"] = figures[f"{name}_gathered_ms"] / figures[f"{name}_spread_ms"]
        gathered, spread = figures[f"{name}_gathered_ms"], figures[f"{name}_spread_ms"]
        print(f"{name:12s} gathered {gathered:7.3f} ms  spread {spread:7.3f} ms  x{result[f'{name}_speedup']:.2f}")
    write_result(result, args.output_json)


if __name__ == "__main__":
    main()
