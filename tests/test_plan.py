"""The analytical model and the planner: shards, exact collectives, calibration files, fits, predictions, the planner's
choices and its command line (the steps and their costs: test_plan_steps.py)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from plait.cli import main as cli_main
from plait.plan.calibration import Calibration, Curve, curve_key, fit_alpha_beta, h200_defaults
from plait.plan.collectives import rank_collectives
from plait.plan.costs import rank_memory
from plait.plan.overheads import Point, fit
from plait.plan.planner import Slo, effective_tp, latency_tp, layouts, plan
from plait.plan.predict import EngineLimits, comm_totals, predict
from plait.plan.shapes import Layout, load_model_config, rank_shard
from plait.plan.workload import Workload, workload_from_trace

KB, MB = 1024, 1024 * 1024


def test_curves_interpolate_and_fit_alpha_beta():
    sizes = [1 * KB, 1 * MB, 64 * MB]
    alpha, beta = 10e-6, 100e9
    c = Curve(sizes, [alpha + s / beta for s in sizes])
    assert c.alpha == pytest.approx(alpha) and c.beta == pytest.approx(beta)
    assert c.time(100) == c.seconds[0]  # latency does not shrink below the smallest measured size
    assert c.time(512 * KB) == pytest.approx(alpha + 512 * KB / beta)
    assert c.time(128 * MB) == pytest.approx(alpha + 128 * MB / beta)
    bumpy = Curve([16 * KB, 64 * KB], [21.5e-6, 11.8e-6])  # NCCL's 2-GPU graph figures are not monotone
    assert bumpy.time(40 * KB) == pytest.approx(16.65e-6)
    assert fit_alpha_beta([5], [3e-6]) == (3e-6, float("inf"))
    with pytest.raises(ValueError, match="ascending sizes"):
        Curve([2, 1], [1.0, 2.0])


def test_calibration_picks_the_communicators_path_and_scales_group_sizes():
    c = h200_defaults()
    assert c.choose("all_reduce", 8 * KB, graph=True) == ("symm_one_shot", "graph")
    assert c.choose("all_reduce", 1 * MB, graph=False) == ("symm_two_shot", "eager")
    assert c.choose("all_reduce", 16 * MB, graph=True) == ("nccl", "graph")
    assert dataclasses.replace(c, device="cpu").choose("all_reduce", 8, graph=True) == ("gloo", "eager")
    assert c.collective_time("all_reduce", 8 * KB, 1, True) == 0.0
    # Measured at 4 ranks, asked for 8: one NVSwitch hop keeps the latency; the ring's bytes grow by (7/8)/(3/4).
    curve, a, b, how = c.curve("all_reduce", "nccl", "graph", 8)
    assert (a, b) == (1.0, pytest.approx(7 / 8 / (3 / 4))) and "scaled to 8 ranks" in how
    gloo = Calibration("t", "cpu", "cpu", 1, 1.0, 1.0, 1.0, curves={curve_key("all_reduce", "gloo", "eager", 2): Curve([1], [1.0])})
    assert gloo.curve("all_reduce", "gloo", "eager", 4)[1] == 3.0  # a ring of TCP hops: latency x (p - 1)
    _, _, _, how = c.curve("all_gather", "nccl", "eager", 2)
    assert "no eager curve" in how
    with pytest.raises(ValueError, match="no curve for reduce_scatter over nccl"):
        c.curve("reduce_scatter", "nccl", "graph", 2)
    _, _, b, how = c.curve("all_to_all", "nccl", "eager", 2)  # SP-mode steps run eager: scaled down from 4 ranks
    assert b == pytest.approx((1 / 2) / (3 / 4)) and "scaled to 2 ranks" in how


def test_calibration_file_round_trip(tmp_path):
    path = tmp_path / "cal.json"
    h200_defaults().save(str(path))
    back = Calibration.load(str(path))
    assert back.source == f"measured: {path}" and back.curves.keys() == h200_defaults().curves.keys()
    assert back.collective_time("all_reduce", 1 * MB, 2, True) == h200_defaults().collective_time("all_reduce", 1 * MB, 2, True)
    path.write_text(json.dumps({**json.loads(path.read_text()), "bogus": 1}))
    with pytest.raises(ValueError, match="unknown fields \\['bogus'\\]"):
        Calibration.load(str(path))
    with pytest.raises(ValueError, match="cannot read calibration file"):
        Calibration.load(str(tmp_path / "missing.json"))


def test_uneven_shards_follow_the_engines_plan(smollm2_config):
    r0, r1 = (rank_shard(smollm2_config, Layout(2), r) for r in range(2))
    assert (r0.q_heads, r0.kv_heads, r1.q_heads, r1.kv_heads) == (5, 2, 4, 2)  # KV head 1 replicated
    assert r0.intermediate + r1.intermediate == 1536 and r0.vocab_rows == r1.vocab_rows == 24576
    s = rank_shard(smollm2_config, Layout(3, 2), 4)  # stage 1, tensor rank 1
    assert (s.stage, s.tp_rank, s.layers, s.first, s.last) == (1, 1, range(15, 30), False, True)
    assert rank_shard(load_model_config("llama3-8b"), Layout(3), 2).vocab_rows == 42752  # 128256 / 3


def test_collectives_of_a_step_are_exact(smollm2_config):
    # decode of 4 sequences at TP=2: embedding + 2 per layer all-reduces of [4, 576] bf16; the LM head's shard.
    coll = rank_collectives(smollm2_config, Layout(2), 1, tokens=4, logit_rows=4, itemsize=2)
    assert [c.op for c in coll] == ["all_reduce"] * 61 + ["all_gather"]
    assert {c.bytes for c in coll[:-1]} == {4 * 576 * 2} and coll[-1].bytes == 4 * 24576 * 4
    assert coll[1].layer == 0 and coll[-2].layer == 29 and coll[-1].wire_bytes == 4 * 49152 * 4
    assert rank_collectives(smollm2_config, Layout(2), 0, tokens=40, logit_rows=0, itemsize=2)[-1].op == "all_reduce"
    assert rank_collectives(smollm2_config, Layout(1), 0, 4, 4, 2) == []
    # PP=2: stage 0 sends hidden and residual; stage 1 receives them; no TP collectives.
    s0, s1 = (rank_collectives(smollm2_config, Layout(1, 2), r, 4, 4, 2) for r in range(2))
    assert [(c.op, c.peer, c.bytes) for c in s0] == [("send", 1, 4608)] * 2
    assert [(c.op, c.peer) for c in s1] == [("recv", 0)] * 2
    # TP2 x PP2, rank 3 (stage 1): recv x2 from rank 1, 30 all-reduces, the all-gather.
    ops = [c.op for c in rank_collectives(smollm2_config, Layout(2, 2), 3, 4, 4, 2)]
    assert ops == ["recv"] * 2 + ["all_reduce"] * 30 + ["all_gather"]


def test_sequence_parallel_collectives(smollm2_config, llama8b):
    """SmolLM2 (9 heads, 3 KV, head_dim 64) at SP=2: 5 tokens padded to 6, 3 per rank; rank 1 attends with heads 5..8
    (KV heads 1, 2). No all-reduce: the weights are whole. The shard gather, and no LM-head gather."""
    coll = rank_collectives(smollm2_config, Layout(sp=2), 1, tokens=5, logit_rows=2, itemsize=2)
    assert [c.op for c in coll] == ["all_to_all"] * 60 + ["all_gather"]
    qkv, out = coll[0], coll[1]
    assert qkv.bytes == 3 * ((5 + 2 * 2) + (4 + 2 * 2)) * 64 * 2 and out.bytes == 6 * 4 * 64 * 2 and out.layer == 0
    assert coll[-1].bytes == 3 * 576 * 2 and coll[-1].site == "sp_gather"
    # SP=2 x TP=2 (rank 3: sequence rank 1, tensor rank 1): the TP pair reduces [2, 4096], the SP pair exchanges.
    coll = rank_collectives(llama8b, Layout(2, sp=2), 3, tokens=4, logit_rows=4, itemsize=2)
    per_layer = ["all_to_all", "all_to_all", "all_reduce", "all_reduce"]
    assert [c.op for c in coll] == ["all_reduce"] + per_layer * 32 + ["all_gather", "all_gather"]
    assert {c.group_size for c in coll if c.op == "all_reduce"} == {2} and coll[0].bytes == 2 * 4096 * 2
    # Shift at 4 tokens: this step runs TP over all 4 ranks; the embedding and LM head stay on the TP pair.
    shifted = rank_collectives(llama8b, Layout(2, sp=2, shift_threshold=4), 3, tokens=4, logit_rows=4, itemsize=2)
    assert [(c.op, c.group_size) for c in shifted] == [("all_reduce", 2)] + [("all_reduce", 4)] * 64 + [("all_gather", 2)]
    assert Layout(2, sp=2, shift_threshold=4).name == "TP2xSHIFT2"
    with pytest.raises(ValueError, match=r"sequence_parallel_size \(4\) x tensor_parallel_size \(4\) = 16 ranks"):
        Layout(4, sp=4).check(smollm2_config)


def test_parallel_track_collectives_and_shards():
    """pt-llama3-8b-t4-d4 (4 tracks of 8 heads, 2 KV heads, MLP 3584; 32 layers): a track per rank meets every 4
    layers (1 + 8 all-reduces instead of TP's 1 + 64); over 8 ranks each track is tensor-parallel over 2."""
    m = load_model_config("pt-llama3-8b-t4-d4")
    coll = rank_collectives(m, Layout(4), 2, tokens=3, logit_rows=3, itemsize=2)
    assert [(c.op, c.group_size, c.site) for c in coll] == (
        [("all_reduce", 4, "embed")] + [("all_reduce", 4, "combine")] * 8 + [("all_gather", 4, "lm_head")])
    assert coll[1].bytes == 3 * 4096 * 2
    wide = rank_collectives(m, Layout(8), 5, tokens=3, logit_rows=3, itemsize=2)
    assert [(c.group_size, c.site) for c in wide[1:6]] == [(2, "o_proj"), (2, "down_proj")] * 2 + [(2, "o_proj")]
    assert sum(c.site == "combine" and c.group_size == 4 for c in wide) == 8 and wide[0].group_size == 8
    assert (rank_shard(m, Layout(4), 1).q_heads, rank_shard(m, Layout(8), 1).intermediate) == (8, 1792)
    assert (rank_shard(m, Layout(2), 1).q_heads, rank_shard(m, Layout(2), 1).kv_heads) == (16, 4)  # two tracks
    with pytest.raises(ValueError, match="one pipeline stage, no sequence parallelism"):
        Layout(2, pp=2).check(m)


def _grid(m, truth, async_scheduling: bool) -> dict:
    """A validation grid whose 'measurements' are the model's own figures with the `truth` terms; tp4's are
    doubled, so a fit that used them would be spoiled."""
    engine = {"dtype": "bfloat16", "max_num_batched_tokens": 8192, "max_num_seqs": 32, "max_prefill_graph_tokens": 512,
              "async_scheduling": async_scheduling}
    lim = EngineLimits.recorded(engine, EngineLimits().features())
    configs = {}
    for name, tp in (("tp1", 1), ("tp2", 2), ("tp4", 4)):
        points = []
        for b, n in ((1, 128), (8, 128), (32, 128), (1, 2048), (1, 8192), (8, 2048), (32, 2048), (8, 8192)):
            p = predict(m, Layout(tp), b, n, 8, truth, lim)
            scale = 2.0 if name == "tp4" else 1.0
            points.append({"batch": b, "input_len": n, "output_len": 8, "ttft_ms": scale * 1e3 * p.ttft_s,
                           "tpot_ms": scale * 1e3 * p.tpot_s})
        configs[name] = {"tp": tp, "pp": 1, "points": points, "engine": engine, "features": lim.features()}
    return {"model": "llama3-8b", "configs": configs, "device": "NVIDIA H200", "git_commit": "abc"}


def test_fit_recovers_the_engine_terms_from_a_grid(llama8b):
    """`plait calibrate --fit-from`: measurements made by the model with known terms are fitted back from a
    different start, on tp1 and tp2 only (the tp4 points are left out and must not be used). A synchronous grid
    shows the host's time in every step; the eager and attention terms come out of it alone."""
    from plait.plan.fit import TERMS, fit_validation

    truth = h200_defaults()
    sync = _grid(llama8b, truth, async_scheduling=False)
    start = dataclasses.replace(truth, **{k: 1.5 * getattr(truth, k) for k in TERMS})
    fitted = fit_validation(start, [sync])
    assert fitted.fit_configs == ["tp1", "tp2"] and "16 timed points of tp1, tp2 (sync scheduling" in fitted.notes[-1]
    for k in ("host_step_s", "eager_layer_s", "eager_seq_layer_s", "eager_collective_s", "paged_attention_efficiency",
              "decode_token_s"):
        assert getattr(fitted, k) == pytest.approx(getattr(truth, k), rel=0.05), k
    with pytest.raises(ValueError, match="no timed points of pp2"):
        fit_validation(start, [sync], ("pp2",))
    with pytest.raises(ValueError, match="different models"):
        fit_validation(start, [sync, {**sync, "model": "qwen2.5-32b"}])


def test_fit_of_both_schedulings_tells_host_time_from_graph_time(llama8b):
    """A grid of each scheduling mode fitted together (every point of both used): the host's terms, which only
    the synchronous steps add to the GPU's, and the graph's per-layer time, which both show, come back."""
    from plait.plan.fit import TERMS, fit_validation

    truth = dataclasses.replace(h200_defaults(), graph_layer_s=20e-6)
    grids = [_grid(llama8b, truth, async_scheduling=mode) for mode in (False, True)]
    start = dataclasses.replace(truth, **{k: 1.5 * getattr(truth, k) for k in TERMS})
    fitted = fit_validation(start, grids)
    assert "32 timed points of tp1, tp2 (async+sync scheduling" in fitted.notes[-1]
    for k in ("host_step_s", "graph_layer_s"):
        assert getattr(fitted, k) == pytest.approx(getattr(truth, k), rel=0.05), k


def test_predictions_tp_dp_and_memory(llama8b):
    calib = h200_defaults()
    tp1, tp2 = (predict(llama8b, Layout(tp), 1, 128, 64, calib) for tp in (1, 2))
    assert tp1.comm_share == 0 and 0.1 < tp2.comm_share < 0.8 and tp2.tpot_s < tp1.tpot_s
    sync = predict(llama8b, Layout(1), 1, 128, 64, calib, EngineLimits(async_scheduling=False))
    assert sync.tpot_s == pytest.approx(5.09e-3, rel=0.05)  # benchmarks/results/comm: tp1, batch 1 x 128, synchronous
    assert tp1.tpot_s < sync.tpot_s  # on a GPU the host's work hides behind the next step by default
    dp = predict(llama8b, Layout(1, 1, 2), 8, 128, 64, calib)
    half = predict(llama8b, Layout(1), 4, 128, 64, calib)
    assert dp.tpot_s == pytest.approx(half.tpot_s) and dp.throughput == pytest.approx(2 * half.throughput)
    big = load_model_config("llama3-70b")
    assert rank_memory(big, Layout(1), calib, 2, 2048).kv_cache == 0  # 140 GB of weights
    assert rank_memory(big, Layout(2), calib, 2, 2048).kv_tokens > 100_000
    assert not predict(big, Layout(1), 1, 128, 8, calib).fits


def test_planner_enumerates_ranks_and_finds_te(smollm2_config, llama8b):
    assert {lay.name for lay in layouts(llama8b, 4) if lay.sp == 1} == {"TP4", "TP2xDP2", "DP4", "PP2xDP2", "PP4", "TP2xPP2"}
    assert "PP4" not in {lay.name for lay in layouts(smollm2_config, 4)}  # 30 layers do not split evenly in 4
    calib, lim = h200_defaults(), EngineLimits()
    w = Workload(128, 64, batch=1)
    ranked = plan(llama8b, 4, w, "latency", Slo(), calib, lim)
    lat = [c.prediction.latency_s for c in ranked if c.ok]
    assert lat == sorted(lat) and ranked[0].prediction.layout.name == "TP4"
    tp, sweep = latency_tp(llama8b, 4, w, calib, lim)
    assert tp == min(sweep, key=lambda p: p.latency_s).layout.tp
    thr = plan(llama8b, 4, w, "throughput", Slo(), calib, lim)
    assert thr[0].prediction.throughput == max(c.prediction.throughput for c in thr if c.ok)
    slo = plan(llama8b, 4, w, "slo", Slo(tpot_s=6e-3), calib, lim)
    assert all(c.prediction.tpot_s <= 6e-3 for c in slo if c.ok)
    with pytest.raises(ValueError, match="needs --slo-ttft and/or --slo-tpot"):
        plan(llama8b, 4, w, "slo", Slo(), calib, lim)
    rate = plan(llama8b, 2, Workload(128, 64, request_rate=5.0), "latency", Slo(), calib, lim)
    assert all(math.ceil(5.0 * c.prediction.latency_s) <= c.prediction.batch + 1 for c in rate if c.ok)


def test_a_request_rate_sizes_every_goal_by_littles_law(llama8b):
    """With a rate every layout runs at the concurrency rate x latency, not at its largest batch; the throughput and
    slo goals rank by what it serves, min(rate, capacity) x output_len, so one that cannot keep up serves less and is
    not ok; the SLOs are checked at the rate's concurrency; the lowest-latency TP degree is found at it too."""
    calib, lim, rate = h200_defaults(), EngineLimits(), 120.0
    w = Workload(128, 64, request_rate=rate)
    for goal, slo in (("throughput", Slo()), ("slo", Slo(tpot_s=6e-3))):
        ranked = plan(llama8b, 2, w, goal, slo, calib, lim)
        largest = {c.prediction.layout.name: c.prediction for c in plan(llama8b, 2, Workload(128, 64), goal, slo,
                                                                         calib, lim)}
        ok = [c for c in ranked if c.ok]
        assert ok and ranked[:len(ok)] == ok and all(slo.met(c.prediction) for c in ok)
        for c in ok:
            p = c.prediction
            assert c.served == pytest.approx(rate * 64) and p.batch == max(p.layout.dp, math.ceil(rate * p.latency_s))
            assert p.batch < largest[p.layout.name].batch
        assert [c.prediction.latency_s for c in ok] == sorted(c.prediction.latency_s for c in ok)  # served alike
        sp2 = next(c for c in ranked if c.prediction.layout.name == "SP2")
        assert not sp2.ok and sp2.served < rate * 64 and "saturated below 120 req/s" in sp2.why
        assert sp2.served == pytest.approx(sp2.prediction.batch / sp2.prediction.latency_s * 64)
    tp, preds = latency_tp(llama8b, 2, w, calib, lim)
    assert tp == 2 and [p.layout.tp for p in preds] == [2]  # one TP1 replica cannot keep up
    assert preds[0].batch == math.ceil(rate * preds[0].latency_s)
    assert len(latency_tp(llama8b, 2, Workload(128, 64, batch=1), calib, lim)[1]) == 2


def test_te_is_the_tp_degree_of_most_throughput_over_a_fixed_number_of_gpus(smollm2_config, llama8b):
    """Replicas = GPUs / TP, each as full as it can be: a model that fits one GPU gains nothing from TP at
    saturation (t_e = 1, though TP lowers one request's latency), a 70B that does not fit one GPU starts at TP2."""
    calib, lim, w = h200_defaults(), EngineLimits(), Workload(256, 128)
    for m, want in ((smollm2_config, 1), (llama8b, 1), (load_model_config("llama3-70b"), 2)):
        te, preds = effective_tp(m, 4, w, calib, lim)
        assert {p.layout.tp * p.layout.dp for p in preds} == {4} and all(p.fits for p in preds)
        assert te == want == max(preds, key=lambda p: p.throughput).layout.tp
    assert [p.layout.name for p in effective_tp(load_model_config("llama3-70b"), 4, w, calib, lim)[1]] == ["TP2xDP2", "TP4"]
    assert latency_tp(llama8b, 4, Workload(256, 128, batch=1), calib, lim)[0] == 4


def test_trace_workloads_and_their_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"timestamp": t, "input_len": 100 + t, "output_len": 10}) for t in range(5)))
    assert workload_from_trace(str(path)) == Workload(102, 10, request_rate=1.0)
    path.write_text('{"timestamp": 0, "input_len": 5}\n')
    with pytest.raises(ValueError, match="missing \\['output_len'\\]"):
        workload_from_trace(str(path))
    with pytest.raises(ValueError, match="request_rate must be > 0"):
        Workload(1, 1, request_rate=0)


def test_overhead_fit_recovers_known_terms():
    truth = {"host_step_s": 200e-6, "host_per_seq_s": 10e-6, "graph_layer_s": 20e-6, "sync_per_collective_s": 15e-6}
    points = []
    for layers, tp, n in ((32, 1, 0), (2, 1, 0), (32, 2, 65)):
        for b in (1, 16):
            resid = (truth["host_step_s"] + b * truth["host_per_seq_s"] + layers * truth["graph_layer_s"]
                     + n * truth["sync_per_collective_s"])
            points.append(Point(layers, tp, b, n, ttft_s=layers * 400e-6, tpot_s=1e-3 + resid, base_ttft_s=0.0, base_tpot_s=1e-3))
    fitted = fit(points, "cuda")
    for k, v in truth.items():
        assert fitted[k] == pytest.approx(v, rel=1e-6)
    assert fitted["eager_layer_s"] == pytest.approx(400e-6)


def test_plan_cli_says_where_its_figures_come_from(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli_main(["plan", "llama3-8b", "--gpus", "2", "--input-len", "256", "--output-len", "32",
                     "--plot", str(tmp_path / "p.png"), "--output-json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "figures: built-in defaults: H200 figures of ../shared/DEVICE.md" in text and "t_e = " in text
    assert "(most throughput over 2 GPUs, replicas = GPUs / TP)" in text and "lowest request latency" in text
    data = json.loads(out.read_text())
    assert {r["config"] for r in data["ranked"]} == {"TP2", "DP2", "PP2", "SP2", "SHIFT2"}
    assert [r["config"] for r in data["tp_sweep"]] == ["DP2", "TP2"] and data["t_e"] in (1, 2)
    assert all(r["served_tok_s"] == r["throughput_tok_s"] for r in data["ranked"])  # no rate: at its own batch
    assert (tmp_path / "p.png").stat().st_size > 0 and "SHIFT2: shift threshold" in text
    assert cli_main(["plan", "llama3-8b", "--gpus", "0"]) == 2
    assert "--gpus must be >= 1" in capsys.readouterr().err


def test_calibrate_on_cpu_writes_a_file_plan_reads(tmp_path, capsys):
    """gloo over 2 real processes, small messages, few iterations: the whole path, quickly."""
    path = tmp_path / "cal.json"
    assert cli_main(["calibrate", "--device", "cpu", "--sizes", "4096,65536", "--iters", "2", "--output", str(path)]) == 0
    cal = Calibration.load(str(path))
    assert cal.device == "cpu" and cal.matmul_flops > 0 and cal.copy_bytes_s > 0
    for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"):
        curve = cal.curves[curve_key(op, "gloo", "eager", 2)]
        assert curve.sizes == [4096, 65536] and all(s > 0 for s in curve.seconds)
    capsys.readouterr()
    assert cli_main(["plan", "--gpus", "2", "--calibration", str(path), "--input-len", "32", "--output-len", "4"]) == 0
    assert f"figures: measured: {path}" in capsys.readouterr().out


def test_calibration_cut_short_keeps_what_it_measured(tmp_path, capsys):
    """GPU runs measure only the engine's group sizes; a run cut short writes its figures and says what is missing;
    one that measured nothing writes no file, so `plait plan` stays on its built-in figures."""
    from plait.plan.calibrate import Measured, build, group_sizes

    assert group_sizes(8, "cuda") == [2, 4, 8] and group_sizes(3, "cpu") == [2, 3]
    rates = {"matmul_flops": 1e12, "gemv_bytes_s": 1e11, "copy_bytes_s": 1e11, "memory_bytes": 1 << 30}
    got = Measured(rates, {curve_key("all_reduce", "gloo", "eager", 2): [(4096, 1e-4), (65536, 2e-4)]}, groups=1,
                   problem="no answer within 5 s")
    cal = build(got, "cpu", 4, str(tmp_path / "cal.json"))
    assert cal.matmul_flops == 1e12 and "group sizes not measured: 3, 4" in " ".join(cal.notes)
    assert cal.collective_time("all_reduce", 4096, 4, graph=False) > 1e-4  # 4 ranks: scaled from the 2 measured
    with pytest.raises(RuntimeError, match="measured nothing"):
        build(Measured(problem="rank 1 exited"), "cpu", 2, "x.json")
    path = tmp_path / "none.json"
    assert cli_main(["calibrate", "--device", "cpu", "--timeout", "0.1", "--output", str(path)]) == 1
    assert not path.exists() and "no calibration written" in capsys.readouterr().out


def test_validation_report_from_results_json(tmp_path, smollm2_config):
    """benchmarks/comm_report.py on a small results file whose 'measurements' are the model's own figures x 1.1."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "comm_report.py"
    spec = importlib.util.spec_from_file_location("comm_report", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    calib, configs = h200_defaults(), {}
    engine = {"dtype": "bfloat16", "max_num_batched_tokens": 2048, "max_num_seqs": 8, "max_prefill_graph_tokens": 512,
              "async_scheduling": None}
    lim = EngineLimits.recorded(engine, EngineLimits().features())  # the engine's default scheduling, as recorded
    for name, (tp, pp) in {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}.items():
        points, profiled = [], []
        for b, n in ((1, 128), (8, 512)):
            p = predict(smollm2_config, Layout(tp, pp), b, n, 8, calib, lim)
            points.append({"batch": b, "input_len": n, "output_len": 8, "ttft_ms": 1.1e3 * p.ttft_s, "tpot_ms": 1.1e3 * p.tpot_s})
            eager = dataclasses.replace(lim, enforce_eager=True)
            ops = {op: {k: v * (1.1 if k == "s" else 1) for k, v in o.items()}
                   for op, o in comm_totals(smollm2_config, Layout(tp, pp), b, n, 8, calib, eager).items()}
            profiled.append({"batch": b, "input_len": n, "ops": ops, "exact_steps": 3, "steps_compared": 3, "schedule_exact": True})
        configs[name] = {"tp": tp, "pp": pp, "engine": engine, "features": lim.features(), "points": points,
                         "profiled": profiled}
    md = pathlib.Path(report.write({"model": "smollm2-135m", "configs": configs, "skipped": []}, calib, str(tmp_path))).read_text()
    assert "- TPOT: 6/6 within 15%; median |error| 9.1%" in md and "- COMM: 2/2 within 15%" in md
    assert "in 2/2 grid points" in md and "| tp1 | 1 | 128 | 3/3 | exact |" in md
    assert "In sample (tp1, tp2: the engine terms were fitted to these):\n\n- TTFT: 4/4" in md
    assert "Held out (not used in the fit):\n\n- TTFT: 2/2" in md
    assert "2. PP moves the least" in md and (tmp_path / "comm_report_tpot.png").exists()


@pytest.mark.parametrize("folder,lines", [("comm", 9), ("comm_tp1_h200x1/async", 5), ("comm_tp1_h200x1/sync", 5)])
def test_committed_comm_report_regenerates_from_its_json(tmp_path, folder, lines):
    """A committed comm_report.md, regenerated from its JSON as benchmarks/gpu_comm.sh runs it, states the same
    accuracy and planner figures: a model change that moves them (or, for the TP=1 grids, priced by the built-in
    figures, a change of those) must regenerate the report."""
    import importlib.util
    import pathlib

    root = pathlib.Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("comm_report", root / "benchmarks" / "comm_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    committed = root / "benchmarks" / "results" / folder
    assert report.main([str(committed / "comm_validation.json"), "--out", str(tmp_path)]) == 0

    def figures(md: str) -> list[str]:
        return [line for line in md.splitlines() if line.startswith(("- TTFT", "- TPOT", "- COMM", "Right (within"))]

    want = figures((committed / "comm_report.md").read_text())
    assert len(want) == lines and want == figures((tmp_path / "comm_report.md").read_text())
