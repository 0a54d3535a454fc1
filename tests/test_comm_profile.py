"""The communication profiler over real gloo processes, and the analytical model's exactness against it.

For TP=2, PP=2 and TP2xPP2, and TP=2 with asynchronous scheduling or spread sampling, every step of every rank must
record exactly the collectives the model predicts (op, bytes, layer, peer, in order), the scheduler must make
exactly the predicted steps, and so the whole run's count and bytes of collectives per rank are the predicted ones.
"""

from __future__ import annotations

import json
from collections import Counter
import re

import pytest
import torch

from conftest import make_checkpoint
from plait.bench.comm_profile import main as profile_main
from plait.cli import build_parser, engine_config_from_args, main as cli_main
from plait.comm.communicator import Communicator
from plait.comm.profiler import CommProfiler, step_phase
from plait.plan.check import check_collectives, check_schedule
from plait.plan.collectives import Sampling, rank_collectives
from plait.plan.shapes import Layout, load_model_config
from plait.plan.workload import fixed_batch_steps

# 3 prompts of 20 tokens under a 32-token budget: chunked prefill, a mixed step, then decode; prompt logprobs
# add LM-head rows. Uneven heads (9 over 2 ranks) as in SmolLM2.
WORKLOAD = ["--batch-size", "3", "--input-len", "20", "--output-len", "4", "--max-num-batched-tokens", "32",
            "--prompt-logprobs", "1", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("four_layers")
    make_checkpoint(folder, "llama", num_layers=4)
    return str(folder)


def profile(model: str | None, extra: list[str], out_dir) -> tuple:
    args = build_parser().parse_args(["profile", *([model] if model else []), *WORKLOAD, *extra,
                                      "--profile-comm-dir", str(out_dir)])
    cfg = engine_config_from_args(args)
    return profile_main(args, cfg), args, cfg


def assert_exact(trace, cfg, args, model_config) -> None:
    layout, sampling = Layout.of(cfg), Sampling.of(cfg)
    compared, bad = check_collectives(trace, model_config, layout, 4, sampling)
    assert compared == sum(len(rt.steps) for rt in trace.ranks) > 0
    assert not bad, "\n".join(map(str, bad))
    predicted = fixed_batch_steps(args.batch_size, args.input_len, args.output_len, args.max_num_batched_tokens,
                                  cfg.max_num_seqs, layout.pp, prompt_logprobs=True)
    assert check_schedule(trace, predicted) == (Counter(), Counter())
    for rt in trace.ranks:  # the whole run, per rank: count and bytes of each op
        want = Counter()
        for steps in predicted:
            for s in steps:
                for c in rank_collectives(model_config, layout, rt.rank, s.tokens, s.logit_rows, 4, s.samples, sampling):
                    want[c.op, "n"] += 1
                    want[c.op, "bytes"] += c.bytes
        got = Counter()
        for r in rt.records:
            got[r.op, "n"] += 1
            got[r.op, "bytes"] += r.bytes
        assert got == want, f"rank {rt.rank}"


def test_tp2_cli_writes_traces_that_match_the_model(four_layers, tmp_path, capsys):
    assert cli_main(["profile", four_layers, "--tp", "2", *WORKLOAD, "--profile-comm-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    exact, compared = map(int, re.search(r"collectives: (\d+)/(\d+) rank-steps exactly as predicted", printed).groups())
    assert exact == compared == 10 and "schedule: as predicted" in printed  # 5 steps x 2 ranks

    data = json.loads((tmp_path / "comm_trace.json").read_text())
    assert data["meta"]["tensor_parallel_size"] == 2 and len(data["ranks"]) == 2
    phases = [s["phase"] for s in data["summary"]]
    assert phases[0] == "prefill" and "mixed" in phases and phases[-1] == "decode"
    rank1 = data["ranks"][1]
    ops = Counter((r["op"], r["module"]) for r in rank1["records"] if r["step"] == 0)
    # one embedding all-reduce, two per layer (o_proj, down_proj), one LM-head all-gather of its vocab shard
    assert ops == Counter({("all_reduce", "embed_tokens"): 1, ("all_gather", "lm_head"): 1,
                           **{("all_reduce", f"layers.{i}.{m}"): 1 for i in range(4) for m in ("self_attn.o_proj", "mlp.down_proj")}})
    for r in rank1["records"]:
        assert r["group_ranks"] == [0, 1] and r["duration_s"] > 0 and r["phase"] and r["dtype"] == "float32"
        assert r["layer"] == (int(r["module"].split(".")[1]) if r["module"].startswith("layers.") else None)
    first = rank1["steps"][0]
    assert first["chunks"] == [[0, 20], [0, 12]] and first["logit_rows"] == 19 + 1 + 12  # prompt rows + a sample
    assert 0 < data["summary"][0]["comm_share"] < 1

    chrome = json.loads((tmp_path / "comm_chrome_trace.json").read_text())
    events = [e for e in chrome["traceEvents"] if e["ph"] == "X"]
    assert {e["cat"] for e in events} == {"step", "comm"} and all(e["dur"] >= 0 for e in events)
    assert "comm %" in (tmp_path / "comm_summary.txt").read_text()


def test_pp2_records_stage_sends_exactly(four_layers, tmp_path):
    trace, args, cfg = profile(four_layers, ["--pp", "2"], tmp_path)
    assert_exact(trace, cfg, args, load_model_config(four_layers))
    sends = [r for r in trace.ranks[0].records if r.op == "send"]
    assert sends and all(r.peer == 1 and r.module == "PipelineStage" for r in sends)  # hidden and residual


def test_sp2_tp2_with_shift_records_exactly_the_models_collectives(four_layers, tmp_path):
    """SP=2 x TP=2 on 4 processes, Shift at 8 tokens: the prefill and mixed steps (32 tokens) run SP x TP (all-to-alls
    in the SP pairs, all-reduces in the TP pairs, the final gather), the decode steps (3 tokens) TP over all 4."""
    trace, args, cfg = profile(four_layers, ["--sp", "2", "--tp", "2", "--shift", "--shift-threshold", "8"], tmp_path)
    assert len(trace.ranks) == 4
    assert_exact(trace, cfg, args, load_model_config(four_layers))
    rank1 = trace.ranks[1]  # sequence rank 0, tensor rank 1
    groups = {(r.op, r.module.rsplit(".", 1)[-1], r.phase): r.group_ranks for r in rank1.records}
    assert groups["all_to_all", "self_attn", "prefill"] == (1, 3)  # its SP group
    assert groups["all_reduce", "o_proj", "prefill"] == (0, 1)  # its TP group
    assert groups["all_gather", "", "prefill"] == (1, 3)  # the final hidden states, over the SP group
    assert groups["all_reduce", "o_proj", "decode"] == (0, 1, 2, 3)  # shifted: TP over the whole stage
    assert not any(r.op == "all_to_all" for r in rank1.records if r.phase == "decode")


def test_tp2_async_scheduling_broadcasts_each_steps_tokens_as_predicted(four_layers, tmp_path):
    """Every rank keeps the sampled tokens for the next step's inputs: one broadcast of int64 ids per step, after
    the LM head's gather (prompt-logprob rows sample nothing)."""
    trace, args, cfg = profile(four_layers, ["--tp", "2", "--async-scheduling"], tmp_path)
    assert_exact(trace, cfg, args, load_model_config(four_layers))
    for rt in trace.ranks:
        last = {s.step: [r for r in rt.records if r.step == s.step][-1] for s in rt.steps}
        assert [(last[s.step].op, last[s.step].bytes) for s in rt.steps] == [("broadcast", 8 * s.samples) for s in rt.steps]
    assert [s.samples for s in trace.ranks[0].steps] == [1, 3, 3, 3, 2]


def test_tp2_sampling_parallel_exchanges_logit_blocks_as_predicted(four_layers, tmp_path):
    """Spread sampling: the LM head's all-gather becomes one all-to-all of the same rows' own vocabulary columns."""
    trace, args, cfg = profile(four_layers, ["--tp", "2", "--sampling-parallel"], tmp_path)
    assert_exact(trace, cfg, args, load_model_config(four_layers))
    for rt in trace.ranks:
        assert not [r for r in rt.records if r.op == "all_gather"]
        assert len([r for r in rt.records if r.op == "all_to_all"]) == len(rt.steps)


@pytest.mark.slow
def test_smollm2_tp2_pp2_matches_the_model_exactly(tmp_path):
    trace, args, cfg = profile(None, ["--tp", "2", "--pp", "2"], tmp_path)
    assert len(trace.ranks) == 4
    assert_exact(trace, cfg, args, load_model_config(None))
    # SmolLM2: 30 layers, 15 per stage; 9 heads split 5 + 4; 49152-row vocabulary split 24576 + 24576.
    step0 = [r for r in trace.ranks[3].records if r.step == 0]
    assert Counter(r.op for r in step0) == Counter({"recv": 2, "all_reduce": 30, "all_gather": 1})
    assert {r.group_ranks for r in step0 if r.op == "all_reduce"} == {(2, 3)}


def test_profiler_without_processes_times_tags_and_caps(monkeypatch):
    """A fake two-rank communicator: what the profiler makes of collectives, steps and the record cap."""
    comm = Communicator.single()
    comm.size = 2
    lin = torch.nn.Linear(4, 4)
    lin.comm = comm
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleDict({"7": lin})})
    prof = CommProfiler(0, torch.device("cpu"), [comm], model, max_records=3)
    monkeypatch.setattr(prof, "_group_ranks", lambda c: (0, 1))
    # counted, never timed (as a collective recorded without `with`); runs before the profiler's own hook leaves
    lin.register_forward_hook(lambda m, a, out: m.comm._record("all_reduce", out).__enter__(), prepend=True)
    x = torch.zeros(5, 4)
    with prof.step():
        lin(x)
        with comm._record("all_gather", torch.zeros(2, 3)):
            pass
        prof.tag([(0, 3), (9, 2)], [3, 8], 2, 1)
    with prof.step():
        for _ in range(3):
            lin(x)
        prof.tag([(4, 1)], [4], 1, 1)
    trace = prof.drain()
    assert [s.phase for s in trace.steps] == ["mixed", "decode"] and trace.steps[1].collectives == 3
    assert trace.dropped_records == 2 and len(trace.records) == 3  # steps keep their totals past the cap
    first = trace.records[0]
    assert (first.op, first.bytes, first.layer, first.module, first.phase) == ("all_reduce", 80, 7, "layers.7", "mixed")
    assert trace.records[1].module == "" and trace.records[1].duration_s >= 0
    assert prof.drain().records == []
    assert step_phase([0, 5], [5, 5]) == "mixed" and step_phase([0], [1]) == "prefill"
