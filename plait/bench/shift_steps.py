"""`plait bench shift-steps`: the step times of Shift's two modes by step size, written into a calibration file.

Shift runs steps of at most the threshold tensor-parallel over all SP x TP ranks and bigger ones sequence-parallel;
the engine picks the threshold from a table of measured step times where its `--calibration` file has one
(`Calibration.shift_steps`, plait.plan.shift). This measures that table on the machine it runs on. For each mode the
engine starts with the threshold pinned (the token budget: every step runs TP mode; 0: every step SP mode), then for
each step size n of `--tokens`:
- n <= max_num_seqs: n sequences with prompts of `--context` tokens decode together; the median decode step.
- larger: a new prompt of n tokens (fresh ids each repeat, so no prefix is cached) alone in its step; the median
  step. A real step of that size would carry up to max_num_seqs - 1 decodes beside the chunk, which cost little
  next to it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from plait.bench.results import provenance
from plait.config import EngineConfig
from plait.engine.engine import LLMEngine
from plait.plan.calibration import Calibration
from plait.plan.predict import EngineLimits
from plait.plan.shift import choose_threshold, table_key
from plait.sampling_params import SamplingParams


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", default="1,4,16,64,256,1024,4096",
                        help="step sizes to time, comma-separated (clipped to the token budget and max_model_len)")
    parser.add_argument("--context", type=int, default=1024, help="prompt length of each decoding sequence")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per size (the median is kept)")


def _decode_step_s(engine: LLMEngine, n: int, context: int, repeats: int, rng: torch.Generator) -> float:
    """n sequences prefilled, then `repeats` decode steps of all n timed one by one."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=repeats + 2, ignore_eos=True)
    for _ in range(n):
        engine.add_request(torch.randint(0, vocab, (context,), generator=rng).tolist(), params)
    known = 0
    while known < n:  # prefill (maybe over several steps), until every sequence has its first token
        known += sum(1 for out in engine.step() if len(out.outputs[0].token_ids) == 1)
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[:repeats])


def _prefill_step_s(engine: LLMEngine, n: int, repeats: int, rng: torch.Generator) -> float:
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for _ in range(repeats):
        engine.add_request(torch.randint(0, vocab, (n,), generator=rng).tolist(), params)
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _mode_times(cfg: EngineConfig, threshold: int, tokens: list[int], args) -> tuple[list[int], list[float], LLMEngine]:
    """Step times at each size up to the engine's token budget; returns (sizes, seconds, the engine, shut down)."""
    engine = LLMEngine(cfg.replace(shift_threshold=threshold))
    rng = torch.Generator().manual_seed(0)
    try:
        limit = min(engine.sched_config.max_num_batched_tokens, engine.sched_config.max_model_len - 1)
        sizes = sorted({min(n, limit) for n in tokens})
        _prefill_step_s(engine, min(sizes[-1], 64), 1, rng)  # compile and tune outside the timing
        return sizes, [_decode_step_s(engine, n, args.context, args.repeats, rng) if n <= cfg.max_num_seqs
                       else _prefill_step_s(engine, n, args.repeats, rng) for n in sizes], engine
    finally:
        engine.shutdown()


def main(args: argparse.Namespace, cfg: EngineConfig) -> dict:
    if not cfg.shift_parallel or cfg.data_parallel_size > 1:
        raise ValueError("shift-steps times Shift's two modes of one replica: give --sp S (and --tp T) with --shift, "
                         "and no --dp")
    if not cfg.calibration or not os.path.exists(cfg.calibration):
        raise ValueError("--calibration FILE must name an existing calibration file (`plait calibrate` writes one): "
                         "the measured table is added to it")
    calib = Calibration.load(cfg.calibration)
    tokens = [int(t) for t in args.tokens.split(",")]
    cfg = cfg.replace(max_model_len=cfg.max_model_len or max(max(tokens), args.context + args.repeats) + 8)
    sizes, sp_s, _ = _mode_times(cfg, 0, tokens, args)  # every step sequence-parallel
    _, tp_s, engine = _mode_times(cfg, 1 << 30, tokens, args)  # every step tensor-parallel over all ranks
    rows = [[n, a, b] for n, a, b in zip(sizes, sp_s, tp_s)]
    sp, tp = cfg.sequence_parallel_size, cfg.tensor_parallel_size
    key = table_key(engine.model_name, sp, tp)
    calib.shift_steps[key] = rows
    where = provenance()
    calib.notes.append(f"shift_steps[{key}]: `{where['command']}` on {where['device']}, {where['date']}")
    calib.save(cfg.calibration)
    lim = EngineLimits.of(cfg, engine.sched_config.max_num_batched_tokens, engine.itemsize)
    choice = choose_threshold(engine.model_config, engine.model_name, sp, tp, Calibration.load(cfg.calibration), lim)
    print(f"{'tokens':>8s} {'SP mode ms':>11s} {'TP mode ms':>11s}")
    for n, a, b in rows:
        print(f"{n:8d} {a * 1e3:11.3f} {b * 1e3:11.3f}")
    print(f"wrote shift_steps[{key}] to {cfg.calibration}: the engine will run steps of at most {choice.threshold} "
          f"tokens in TP mode")
    return {"key": key, "rows": rows, "threshold": choice.threshold}
