"""Merge benchmarks/gpu_serving.sh's runs into one JSON, print a table per layout and issue 8's targets (met or
missed, with the ratio), and plot TPOT against throughput for every layout and the trace's p99 completion time.

    python benchmarks/serving_report.py RUNS_DIR OUT_DIR --ranks 4 --model llama3-8b --skipped "..." --failed "..."

RUNS_DIR holds LAYOUT_WORKLOAD.json (`plait bench serve --output-json`) and layouts.txt (each layout's name and
parallel flags, one a line, in the order they ran).
Per-request inter-token gaps are dropped from the merged JSON (their statistics stay), which keeps it small.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from plait.bench.results import provenance


def load(runs_dir: pathlib.Path) -> tuple[dict[str, str], dict[str, dict[str, dict]]]:
    lines = (runs_dir / "layouts.txt").read_text().splitlines() if (runs_dir / "layouts.txt").exists() else []
    layouts = dict(line.split(" ", 1) for line in lines)
    runs: dict[str, dict[str, dict]] = {name: {} for name in layouts}
    for f in sorted(runs_dir.glob("*_*.json"), key=lambda f: f.stat().st_mtime):  # in the order they ran
        layout, workload = f.stem.rsplit("_", 1)
        record = json.loads(f.read_text())
        record.pop("itls", None)
        runs.setdefault(layout, {})[workload] = record
    return layouts, runs


def targets(runs: dict[str, dict[str, dict]], g: int) -> list[dict]:
    """Issue 8's targets for shift against TP (and DP / SP at saturation), where the runs exist."""
    tp, shift, dp, sp = (runs.get(f"{k}{g}", {}) for k in ("tp", "shift", "dp", "sp"))
    out = []

    def get(run: dict, workload: str, key: str) -> float | None:
        return run.get(workload, {}).get(key) or None

    def ratio(name: str, num: float | None, den: float | None, goal, ratio_is: str) -> None:
        if num and den:
            out.append({"target": name, "ratio": round(num / den, 3), "met": goal(num / den), "ratio_is": ratio_is})

    lows = sorted((w for w in tp if w.startswith("low")), key=lambda w: int(w[3:]))
    for low in lows:
        ratio(f"{low}: shift completion time within 5% of TP", get(shift, low, "median_e2el_ms"),
              get(tp, low, "median_e2el_ms"), lambda r: r <= 1.05, "shift / TP median E2EL")
    for low in (w for w in lows if int(w[3:]) >= 4096):  # the TTFT target is for 4k-16k-token prompts
        ratio(f"{low}: shift TTFT >= 1.3x faster than TP", get(tp, low, "median_ttft_ms"),
              get(shift, low, "median_ttft_ms"), lambda r: r >= 1.3, "TP / shift median TTFT")
    sat = get(shift, "sat", "output_throughput")
    ratio("sat: shift throughput >= 1.4x TP", sat, get(tp, "sat", "output_throughput"), lambda r: r >= 1.4,
          "shift / TP output tok/s")
    best = max(filter(None, (get(dp, "sat", "output_throughput"), get(sp, "sat", "output_throughput"))), default=None)
    ratio("sat: shift throughput within 10% of the best of DP / SP", sat, best, lambda r: r >= 0.9,
          "shift / max(DP, SP) output tok/s")
    p99 = {name: get(r, "trace", "p99_e2el_ms") for name, r in runs.items() if get(r, "trace", "p99_e2el_ms")}
    others = [v for k, v in p99.items() if k != f"shift{g}"]
    ratio("trace: shift has the lowest p99 completion time", p99.get(f"shift{g}"), min(others, default=None),
          lambda r: r <= 1.0, "shift / best other p99 E2EL")
    return out


def table(runs: dict[str, dict[str, dict]]) -> str:
    columns = [f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "e2el") for stat in ("median", "p99")]
    rows = [f"{'run':22s} {'ok/fail':>8s} {'out tok/s':>10s}" +
            "".join(f"{c[:-3].replace('median', 'p50'):>11s}" for c in columns) + "  (ms)"]
    for layout, workloads in runs.items():
        for workload, r in workloads.items():
            ok_fail = f"{r['completed']}/{r['failed']}"
            rows.append(f"{layout + '_' + workload:22s} {ok_fail:>8s} {r['output_throughput']:10.0f}" +
                        "".join(f"{r.get(c) or 0:11.1f}" for c in columns))
    return "\n".join(rows)


def plot(runs: dict[str, dict[str, dict]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for layout, workloads in runs.items():
        points = sorted((r["output_throughput"], r["median_tpot_ms"]) for r in workloads.values()
                        if r.get("median_tpot_ms"))
        if points:
            left.plot(*zip(*points), "o-", label=layout)
    left.set(xlabel="output tokens/s", ylabel="median TPOT (ms)", title="latency against throughput (every workload)")
    left.legend()
    left.grid(alpha=0.3)
    trace = {k: r["trace"]["p99_e2el_ms"] for k, r in runs.items() if r.get("trace", {}).get("p99_e2el_ms")}
    right.bar(list(trace), list(trace.values()), color="tab:orange")
    right.set(ylabel="p99 completion time (ms)", title="bursty trace: p99 end-to-end latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs_dir", type=pathlib.Path)
    p.add_argument("out_dir", type=pathlib.Path)
    p.add_argument("--ranks", type=int, default=4, help="GPUs per layout (names are tp4, shift4, ...)")
    p.add_argument("--model", default="llama3-8b", help="the preset served")
    p.add_argument("--skipped", default="", help="sections and runs that did not fit the budget")
    p.add_argument("--failed", default="", help="layouts whose server did not come up, runs that exited non-zero")
    p.add_argument("--command", default=None, help="the command that made the runs (recorded with commit and device)")
    args = p.parse_args()
    layouts, runs = load(args.runs_dir)
    goals = targets(runs, args.ranks)
    result = {"benchmark": "serving", "model": args.model, "layouts": layouts, "runs": runs, "targets": goals,
              "skipped": args.skipped.split(), "failed": args.failed.split(), **provenance()}
    if args.command:
        result["command"] = args.command
    (args.out_dir / "serving.json").write_text(json.dumps(result, indent=1))
    print(table(runs))
    for t in goals:
        print(f"{'met   ' if t['met'] else 'MISSED'} {t['target']}: x{t['ratio']} ({t['ratio_is']})")
    if any(runs.values()):
        plot(runs, args.out_dir / "serving.png")
    print("skipped:", args.skipped.strip() or "none", "| failed:", args.failed.strip() or "none")


if __name__ == "__main__":
    main()
