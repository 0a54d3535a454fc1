"""`plait profile`: one fixed batch with every collective recorded, written out, and checked against the model.

Writes comm_trace.json (every record and step of every rank), comm_chrome_trace.json (open it in
ui.perfetto.dev or chrome://tracing) and comm_summary.txt (per phase: collectives, bytes, comm time and its
share of the step), then says whether the analytical model predicted each step's collectives and the schedule
exactly. Profiling runs eager (no decode graphs): the times are eager collectives' (docs/communication.md).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from plait.comm.trace import CommTrace, collect
from plait.config import EngineConfig
from plait.engine.data_parallel import make_engine
from plait.plan.check import check_collectives, check_schedule
from plait.plan.collectives import Sampling
from plait.plan.shapes import Layout
from plait.plan.workload import fixed_batch_steps
from plait.sampling_params import SamplingParams


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--prompt-logprobs", type=int, default=None, help="ask for prompt logprobs (more LM-head rows)")


@dataclass(frozen=True)
class BatchTimes:
    """As the predictor defines them: TTFT = until every sequence has a token; TPOT = mean over sequences of
    (last token - first token) / (output_len - 1); total = first step to last token."""

    ttft_s: float
    tpot_s: float
    total_s: float


def run_batch(engine, batch: int, input_len: int, output_len: int, prompt_logprobs: int | None = None,
              seed: int = 0) -> BatchTimes:
    """`batch` random prompts of `input_len` tokens added at once, each generating exactly `output_len` tokens."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, prompt_logprobs=prompt_logprobs)
    ids = [engine.add_request(torch.randint(0, vocab, (input_len,), generator=g).tolist(), params) for _ in range(batch)]
    cuda = engine.cfg.resolved_device() == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter() - start
        for out in outs:
            if out.outputs[0].token_ids:
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
    assert set(first) == set(ids), "every request must have produced a token"
    tpot = sum(last[r] - first[r] for r in ids) / (batch * (output_len - 1)) if output_len > 1 else 0.0
    return BatchTimes(max(first.values()), tpot, max(last.values()))


def check(trace: CommTrace, engine, args) -> list[str]:
    """The model's predictions against the trace, as lines to print (empty problems list = exact)."""
    layout = Layout.of(engine.cfg)
    itemsize = torch.empty(0, dtype=engine.cfg.torch_dtype()).element_size()
    compared, bad = check_collectives(trace, engine.model_config, layout, itemsize, Sampling.of(engine.cfg))
    lines = [f"collectives: {compared - len(bad)}/{compared} rank-steps exactly as predicted"]
    lines += [f"  {b}" for b in bad[:5]]
    sched = engine.sched_config
    share = -(-args.batch_size // layout.dp)  # replica 0's share of the batch
    predicted = fixed_batch_steps(share, args.input_len, args.output_len, sched.max_num_batched_tokens,
                                  sched.max_num_seqs, layout.pp, args.prompt_logprobs is not None)
    missing, extra = check_schedule(trace, predicted)
    differs = f"{sum(missing.values())} predicted steps not run, {sum(extra.values())} run steps not predicted"
    lines.append("schedule: " + ("as predicted" if not missing and not extra else differs))
    return lines


def main(args: argparse.Namespace, cfg: EngineConfig) -> CommTrace:
    cfg = cfg.replace(profile_comm=True, max_num_seqs=max(cfg.max_num_seqs, args.batch_size),
                      max_num_batched_tokens=cfg.max_num_batched_tokens or args.batch_size * args.input_len,
                      max_model_len=cfg.max_model_len or args.input_len + args.output_len + 16)
    engine = make_engine(cfg)
    try:
        times = run_batch(engine, args.batch_size, args.input_len, args.output_len, args.prompt_logprobs)
        trace = collect(engine)
        trace.meta |= {"batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
                       "ttft_ms": times.ttft_s * 1e3, "tpot_ms": times.tpot_s * 1e3}
        paths = trace.write(args.profile_comm_dir)
        print(trace.table())
        print(f"TTFT {times.ttft_s * 1e3:.2f} ms, TPOT {times.tpot_s * 1e3:.3f} ms (eager, profiled)")
        for line in check(trace, engine, args):
            print(line)
        print("wrote " + ", ".join(paths.values()))
    finally:
        engine.shutdown()
    return trace
