"""Shift's threshold (where SP-mode steps overtake TP-mode ones), the planner's SP / Shift layouts, and the start-up
lines that say which threshold the engine took and what each mode costs in memory."""

from __future__ import annotations

import dataclasses

import pytest

from plait import LLM
from plait.cli import main as cli_main
from plait.config import EngineConfig
from plait.models.loader import resolve_model
from plait.plan.calibration import Calibration, h200_defaults
from plait.plan.collectives import Sampling, rank_collectives
from plait.plan.costs import rank_memory
from plait.plan.planner import Slo, candidates, layouts, plan
from plait.plan.predict import EngineLimits, predict
from plait.plan.shapes import Layout, load_model_config
from plait.plan.shift import choose_threshold, crossover, mode_step_s, resolve_threshold, table_key
from plait.plan.workload import Workload


def test_crossover_is_the_last_step_size_where_tp_wins():
    assert crossover(lambda n: 3.0 + n, lambda n: 2 * n, 2048) == 3  # SP wins above 3 tokens
    assert crossover(lambda n: 1e9 if n <= 300 else 0.0, lambda n: 1.0, 2048) == 300
    assert crossover(lambda n: 2.0, lambda n: 1.0, 2048) == 2048  # TP always: every step runs TP
    assert crossover(lambda n: 0.0, lambda n: 1.0, 2048) == 0  # SP always


def test_model_threshold_is_where_sp_mode_overtakes(llama8b):
    calib, lim = h200_defaults(), EngineLimits()
    n = choose_threshold(llama8b, None, 2, 1, calib, lim).threshold
    assert 0 < n < lim.max_num_batched_tokens
    assert mode_step_s(llama8b, 2, 1, n, calib, lim, False) >= mode_step_s(llama8b, 2, 1, n, calib, lim, True)
    assert mode_step_s(llama8b, 2, 1, n + 1, calib, lim, False) < mode_step_s(llama8b, 2, 1, n + 1, calib, lim, True)
    always = choose_threshold(llama8b, None, 4, 1, calib, lim)  # the eager CPU floor hides SP4's GPU gain
    assert always.threshold == 2048 and "TP mode is predicted faster at every step size" in always.message(Layout(sp=4))


def test_planner_prices_sp_and_shift_with_exact_counts(llama8b):
    calib, lim = h200_defaults(), EngineLimits()
    assert {lay.name for lay in layouts(llama8b, 4)} == {"TP4", "TP2xDP2", "DP4", "PP2xDP2", "PP4", "TP2xPP2",
                                                        "SP4", "TP2xSP2", "SP2xDP2"}
    shift = {lay.name: lay for lay in candidates(llama8b, 4, calib, lim) if lay.shift_threshold is not None}
    assert set(shift) == {"SHIFT4", "TP2xSHIFT2", "SHIFT2xDP2"}
    # Memory: SP replicates the weights over its ranks and caches only its own KV heads.
    tp4, sp4 = (rank_memory(llama8b, lay, calib, 2, 2048) for lay in (Layout(4), Layout(sp=4)))
    assert sp4.weights > 3.5 * tp4.weights and sp4.kv_bytes_per_token == tp4.kv_bytes_per_token
    # Decode steps of a Shift layout run TP over all 4 ranks: the exact per-step collectives of a shifted step.
    p = predict(llama8b, shift["TP2xSHIFT2"], 4, 128, 8, calib, lim)
    # (asynchronous scheduling, the GPU default: every rank gets the sampled tokens by one broadcast)
    decode = rank_collectives(llama8b, shift["TP2xSHIFT2"], 0, tokens=4, logit_rows=4, itemsize=2,
                              sampling=Sampling(share_tokens=True))
    assert p.phases["decode"].collectives == len(decode) == 1 + 64 + 1 + 1 and decode[-1].op == "broadcast"
    sp = predict(llama8b, Layout(2, sp=2), 4, 128, 8, calib, lim)
    assert sp.phases["decode"].collectives == 1 + 4 * 32 + 2 + 1 and p.tpot_s < sp.tpot_s  # TP mode replays graphs
    ranked = plan(llama8b, 4, Workload(128, 16, batch=1), "latency", Slo(), calib, lim)
    names = [c.prediction.layout.name for c in ranked]
    assert {"SP4", "SHIFT4", "TP2xSHIFT2"} <= set(names) and names.index("SHIFT4") < names.index("SP4")
    assert "steps <= 2048 tokens run TP" in next(c.why for c in ranked if c.prediction.layout.name == "SHIFT4")


def test_engine_takes_the_calibrations_measured_threshold_and_keeps_an_explicit_one(checkpoints, tmp_path, capsys):
    """A table where SP-mode steps win above 20 tokens gives 20; it is printed with its source and the memory line."""
    folder, _ = checkpoints["llama"]
    rows = [[n, 30e-6 + n * 0.5e-6, 10e-6 + n * 1.5e-6] for n in (1, 8, 16, 32, 64, 128)]  # equal at 20 tokens
    calib = dataclasses.replace(h200_defaults(), shift_steps={table_key(resolve_model(folder).name, 2, 1): rows})
    path = tmp_path / "cal.json"
    calib.save(str(path))
    kw = dict(sequence_parallel_size=2, shift_parallel=True, dtype="float32", device="cpu", max_model_len=64)
    llm = LLM(folder, calibration=str(path), **kw)
    try:
        assert llm.engine.cfg.shift_threshold == 20
    finally:
        llm.shutdown()
    out = capsys.readouterr().out
    assert f"shift threshold 20 tokens (measured step times in measured: {path})" in out
    assert "memory per GPU (SHIFT2): weights held" in out and "TP mode reads a" in out and "KV heads of its own" in out
    explicit = EngineConfig(folder, shift_threshold=5, **kw)
    assert resolve_threshold(explicit, load_model_config(folder), "any", 2048, 4) == (explicit, "shift threshold 5 tokens (--shift-threshold)")
    with pytest.raises(ValueError, match="shift_threshold \\(5\\) needs shift_parallel"):
        EngineConfig(folder, shift_threshold=5)


def test_shift_steps_measures_both_modes_into_the_calibration_the_engine_reads(checkpoints, tmp_path, capsys):
    """`plait bench shift-steps` times decode steps (sizes up to max_num_seqs) and prompt steps in each mode, adds
    the table to the calibration file, and an engine started on that file takes its threshold from it."""
    folder, _ = checkpoints["llama"]
    path = tmp_path / "cal.json"
    h200_defaults().save(str(path))
    flags = ["--sp", "2", "--shift", "--device", "cpu", "--dtype", "float32", "--max-num-seqs", "4",
             "--max-num-batched-tokens", "64", "--calibration", str(path)]
    assert cli_main(["bench", "shift-steps", folder, *flags, "--tokens", "2,40,500", "--context", "8",
                     "--repeats", "2"]) == 0
    rows = Calibration.load(str(path)).shift_steps[table_key(resolve_model(folder).name, 2, 1)]
    assert [r[0] for r in rows] == [2, 40, 64]  # 500 clipped to the token budget
    assert all(r[1] > 0 and r[2] > 0 for r in rows)
    threshold = int(capsys.readouterr().out.split("run steps of at most ")[1].split()[0])
    llm = LLM(folder, calibration=str(path), sequence_parallel_size=2, shift_parallel=True, dtype="float32",
              device="cpu", max_num_seqs=4, max_num_batched_tokens=64)
    try:
        assert llm.engine.cfg.shift_threshold == threshold
    finally:
        llm.shutdown()
    assert cli_main(["bench", "shift-steps", folder, "--sp", "2", "--device", "cpu", "--calibration", str(path)]) == 2
