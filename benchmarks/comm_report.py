"""The communication report (issue 6), regenerated from the validation JSON on any machine, GPU or not:

    python benchmarks/comm_report.py benchmarks/results/comm_validation.json [--calibration FILE] [--out benchmarks]

Writes comm_report.md and its plots: the model's exactness (collectives per step, schedule), its accuracy against
the measured grid (TTFT and TPOT as served, with decode graphs; communication time against the profiled, eager
run), the study's three findings restated with these numbers, and how often the planner's first choice is the
measured best. Predictions are made here, from a calibration (default: `calibration_fitted.json` beside the
results, written by `plait calibrate --fit-from`, else the calibration the run wrote), so they track the current
model. When the calibration's engine terms were fitted to some of the configurations (`fit_configs`), accuracy
and the planner are reported for those (in sample) and for the rest (held out) separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

from plait.plan.calibration import Calibration, h200_defaults
from plait.plan.predict import EngineLimits, comm_totals, predict
from plait.plan.shapes import Layout, load_model_config

TOLERANCE = 0.15  # the accuracy target
NEAR_BEST = 0.05  # the planner's first choice counts as right within 5% of the measured best
FITTED_NAME = "calibration_fitted.json"  # what `plait calibrate --fit-from` is told to write beside the results


def _err(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas else float("nan")


def _pct(x: float) -> str:
    return f"{100 * x:+.0f}%"


def predictions(data: dict, calib: Calibration) -> list[dict]:
    """One row per measured point: measured and predicted TTFT, TPOT, latency, comm time and bytes."""
    m = load_model_config(data["model"])
    rows = []
    for name, cfg in data["configs"].items():
        layout = Layout(cfg["tp"], cfg["pp"])
        lim = EngineLimits.recorded(cfg["engine"], cfg.get("features"))
        eager = dataclasses.replace(lim, enforce_eager=True)
        profiled = {(p["batch"], p["input_len"]): p for p in cfg["profiled"]}
        for p in cfg["points"]:
            b, n, out = p["batch"], p["input_len"], p["output_len"]
            pred = predict(m, layout, b, n, out, calib, lim)
            row = {"config": name, "batch": b, "input_len": n, "output_len": out, "fits": pred.fits,
                   "ttft_ms": p["ttft_ms"], "ttft_pred_ms": pred.ttft_s * 1e3,
                   "tpot_ms": p["tpot_ms"], "tpot_pred_ms": pred.tpot_s * 1e3,
                   "latency_ms": p["ttft_ms"] + (out - 1) * p["tpot_ms"], "latency_pred_ms": pred.latency_s * 1e3}
            prof = profiled.get((b, n))
            if prof:
                tot = comm_totals(m, layout, b, n, out, calib, eager)
                inside = [op for op in tot if op not in ("send", "recv")]
                row |= {"exact": f"{prof['exact_steps']}/{prof['steps_compared']}", "schedule_exact": prof["schedule_exact"],
                        "comm_ms": sum(prof["ops"].get(op, {}).get("s", 0.0) for op in inside) * 1e3,
                        "comm_pred_ms": sum(tot[op]["s"] for op in inside) * 1e3,
                        "bytes_per_rank": sum(o["bytes"] for o in prof["ops"].values()),
                        "bytes_pred": sum(o["bytes"] for o in tot.values())}
            rows.append(row)
    return rows


KEYS = ("ttft", "tpot", "comm")


def _has(row: dict, key: str) -> bool:
    return row.get(f"{key}_ms", 0) > 0


def summary(rows: list[dict]) -> list[str]:
    """Per figure: how many points are within the tolerance, median and worst |error|."""
    out = []
    for key in KEYS:
        errs = [abs(_err(r[f"{key}_pred_ms"], r[f"{key}_ms"])) for r in rows if _has(r, key)]
        if errs:
            out.append(f"- {key.upper()}: {sum(e <= TOLERANCE for e in errs)}/{len(errs)} within {TOLERANCE:.0%}; "
                       f"median |error| {100 * statistics.median(errs):.1f}%, worst {100 * max(errs):.1f}%")
    return out


def planner_hits(rows: list[dict]) -> tuple[int, int, list[str]]:
    """Per grid point: is the configuration with the lowest predicted latency within 5% of the measured best?"""
    points: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["fits"]:
            points.setdefault((r["batch"], r["input_len"]), []).append(r)
    hits, lines = 0, []
    for (b, n), rs in sorted(points.items()):
        chosen = min(rs, key=lambda r: r["latency_pred_ms"])
        best = min(rs, key=lambda r: r["latency_ms"])
        ok = chosen["latency_ms"] <= best["latency_ms"] * (1 + NEAR_BEST)
        hits += ok
        over = _pct(chosen["latency_ms"] / best["latency_ms"] - 1)
        lines.append(f"| {b} | {n} | {chosen['config']} | {best['config']} | {over} | {'yes' if ok else 'no'} |")
    return hits, len(points), lines


def findings(rows: list[dict]) -> list[str]:
    """The study's three findings, each checked against this run; a disagreement is said as such."""
    out = []
    short = [r for r in rows if r["input_len"] == min(x["input_len"] for x in rows) and r["batch"] == 1]
    multi = [r for r in short if r["config"] != "tp1"]
    if multi:
        fastest = min(multi, key=lambda r: r["latency_ms"])
        tp1 = next((r for r in short if r["config"] == "tp1"), None)
        most = max((r for r in multi if "bytes_per_rank" in r), key=lambda r: r["bytes_per_rank"], default=None)
        agree = "pp" not in fastest["config"] and (most is None or "pp" not in most["config"])
        out.append(f"1. TP answers short sequences fastest while moving the most bytes: at batch 1, "
                   f"{fastest['input_len']} tokens the fastest multi-GPU layout is {fastest['config']} "
                   f"({fastest['latency_ms']:.1f} ms" + (f"; one GPU: {tp1['latency_ms']:.1f} ms)" if tp1 else ")")
                   + (f"; most bytes per GPU: {most['config']} ({most['bytes_per_rank'] / 1e6:.1f} MB)" if most else "")
                   + ("" if agree else " -- DISAGREES with the study"))
    pp = [r for r in rows if r["config"].startswith("pp") and "bytes_per_rank" in r]
    tp = [r for r in rows if r["config"].startswith("tp") and "pp" not in r["config"] and r["config"] != "tp1"
          and "bytes_per_rank" in r]
    if pp and tp:
        pb, tb = statistics.mean(r["bytes_per_rank"] for r in pp), statistics.mean(r["bytes_per_rank"] for r in tp)
        tp1 = {(r["batch"], r["input_len"]): r["tpot_ms"] for r in rows if r["config"] == "tp1"}
        slower = [r["tpot_ms"] / tp1[(r["batch"], r["input_len"])] for r in pp if (r["batch"], r["input_len"]) in tp1]
        out.append(f"2. PP moves the least and adds latency: mean bytes per GPU per run PP {pb / 1e6:.2f} MB vs TP "
                   f"{tb / 1e6:.2f} MB; PP's TPOT is {statistics.mean(slower):.2f}x TP=1's"
                   + ("" if pb < tb and statistics.mean(slower) > 1 else " -- DISAGREES with the study"))
    hyb = [r for r in rows if r["config"] == "tp2pp2"]
    if hyb:
        ranks = []
        for r in hyb:
            same = sorted((x for x in rows if (x["batch"], x["input_len"]) == (r["batch"], r["input_len"])),
                          key=lambda x: x["latency_ms"])
            ranks.append([x["config"] for x in same].index("tp2pp2") + 1)
        out.append(f"3. Hybrids need tuning: TP2xPP2 ranks {min(ranks)}..{max(ranks)} of {len(data_configs(rows))} "
                   f"across the grid" + ("" if max(ranks) - min(ranks) >= 1 else " (always the same rank here)"))
    return out


def data_configs(rows: list[dict]) -> set[str]:
    return {r["config"] for r in rows}


def plots(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label in (("tpot", "TPOT (ms)"), ("ttft", "TTFT (ms)"), ("comm", "communication per rank (ms)")):
        pts = [r for r in rows if f"{key}_ms" in r]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for name in sorted(data_configs(pts)):
            mine = [r for r in pts if r["config"] == name]
            ax.scatter([r[f"{key}_ms"] for r in mine], [r[f"{key}_pred_ms"] for r in mine], label=name, s=18)
        lo = min(min(r[f"{key}_ms"], r[f"{key}_pred_ms"]) for r in pts)
        hi = max(max(r[f"{key}_ms"], r[f"{key}_pred_ms"]) for r in pts)
        lo = max(lo, 1e-3)
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
        ax.fill_between([lo, hi], [lo * (1 - TOLERANCE), hi * (1 - TOLERANCE)], [lo * (1 + TOLERANCE), hi * (1 + TOLERANCE)],
                        color="grey", alpha=0.15, label="±15%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"comm_report_{key}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write(data: dict, calib: Calibration, out_dir: str) -> str:
    rows = predictions(data, calib)
    lines = [f"# Communication model: validation on {data.get('device', '?')}", "",
             f"Generated by `benchmarks/comm_report.py` from `{data.get('command', 'comm_validate.py')}` "
             f"(commit {data.get('git_commit', '?')}, {data.get('date', '?')}). Model {data['model']}, dummy weights. "
             f"Figures: {calib.source}.", ""]
    if data.get("skipped"):
        lines += ["Not measured: " + ", ".join(f"{s['config']} ({s['why']})" for s in data["skipped"]), ""]
    lines += ["## Exactness (profiled run: every rank, every step)", "", "| config | batch | input | steps exact | schedule |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['batch']} | {r['input_len']} | {r['exact']} | "
              f"{'exact' if r['schedule_exact'] else 'DIFFERS'} |" for r in rows if "exact" in r]
    lines += ["", f"## Accuracy (target: within {TOLERANCE:.0%})", "",
              "TTFT and TPOT as served (decode graphs); communication: all-reduce + all-gather time per rank over the "
              "profiled (eager) run against the model's eager prediction (send/recv waits are not transfers, so left out).", "",
              "| config | batch | input | TTFT ms | pred | err | TPOT ms | pred | err | comm ms | pred | err |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for key in KEYS:
            if _has(r, key):
                e = _err(r[f"{key}_pred_ms"], r[f"{key}_ms"])
                cells.append(f"{r[f'{key}_ms']:.3f} | {r[f'{key}_pred_ms']:.3f} | {_pct(e)}")
            else:
                cells.append("- | - | -")
        lines.append(f"| {r['config']} | {r['batch']} | {r['input_len']} | " + " | ".join(cells) + " |")
    lines.append("")
    fitted = set(calib.fit_configs)
    sets = [("all points", lambda r: True)]
    if fitted:
        sets += [(f"in sample ({', '.join(sorted(fitted))}: the engine terms were fitted to these)",
                  lambda r: r["config"] in fitted),
                 ("held out (not used in the fit)", lambda r: r["config"] not in fitted)]
    for label, keep in sets:
        lines += [f"{label.capitalize()}:", "", *summary([r for r in rows if keep(r)]), ""]
    if fitted:
        lines += ["", "The profiled communication time is not fitted: it tests the eager-issue term out of sample."]
    hits, total, table = planner_hits(rows)
    lines += ["", "## The planner's first choice (lowest request latency)", "",
              f"Right (within {NEAR_BEST:.0%} of the measured best) in {hits}/{total} grid points"
              + (f" ({100 * hits / total:.0f}%; target 90%)." if total else ".")
              + (f" Choosing among the in-sample configurations only: {planner_hits([r for r in rows if r['config'] in fitted])[0]}"
                 f"/{total}." if fitted else ""),
              "",
              "| batch | input | predicted best | measured best | chosen vs best | ok |", "|---|---|---|---|---|---|", *table,
              "", "## The study's findings, with our numbers", "", *findings(rows), ""]
    lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots(rows, out_dir)]
    path = os.path.join(out_dir, "comm_report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results")
    p.add_argument("--calibration", default=None, help="default: the calibration.json beside the results, else built-in")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with open(args.results) as f:
        data = json.load(f)
    folder = os.path.dirname(args.results)
    beside = [os.path.join(folder, name) for name in (FITTED_NAME, data.get("calibration")) if name]
    path = args.calibration or next((p for p in beside if os.path.isfile(p)), None)
    calib = Calibration.load(path) if path else h200_defaults()
    print(f"wrote {write(data, calib, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
