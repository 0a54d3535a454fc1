"""Collect the study's runs into one results JSON, a markdown table and a plot (held-out loss against D).

    python -m benchmarks.pt_quality.report --runs .ptq/runs --output-json benchmarks/results/pt_quality.json \
        --plot benchmarks/results/pt_quality.png
"""

from __future__ import annotations

import argparse
import glob
import json
import os

from plait.bench.results import write_result

# Apple's reported trend (MMLU, 8 tracks) for context in the table: larger models tolerate larger D.
PAPER_TREND = "Apple PT paper, 8 tracks: 6B MMLU 0.56 -> 0.36 at D=8; 13B 0.583 -> 0.575; 30B 0.63 -> ~0.615"


def load_runs(folder: str) -> list[dict]:
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "*", "result.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    if not runs:
        raise ValueError(f"no */result.json under {folder!r}: train the runs first (benchmarks/pt_quality/train.py)")
    return sorted(runs, key=lambda r: (r["model"]["num_tracks"] > 1, r["model"]["block_depth"]))


def paired_train_loss(run: dict, dense: dict, points: int = 10) -> tuple[float, float]:
    """(run, dense) mean training loss over the run's last `points` curve entries, at the same steps. Every run reads
    the same batch at each step under the same learning-rate schedule, so this compares them at equal tokens also
    when a run was stopped early by its time budget (its held-out loss then comes from a model not annealed)."""
    dense_at = dict(dense["train_curve"])
    pairs = [(loss, dense_at[step]) for step, loss in run["train_curve"][-points:] if step in dense_at]
    return sum(a for a, _ in pairs) / len(pairs), sum(b for _, b in pairs) / len(pairs)


def table(runs: list[dict]) -> str:
    dense = next((r for r in runs if r["model"]["num_tracks"] == 1), None)
    lines = ["| run | tracks | D | syncs/forward | params | tokens | held-out bits/byte | vs dense "
             "| train loss vs dense, same steps |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m = r["model"]
        syncs = m["num_layers"] // m["block_depth"] if m["num_tracks"] > 1 else 2 * m["num_layers"]
        delta = f"{(r['val_bits_per_byte'] / dense['val_bits_per_byte'] - 1) * 100:+.2f}%" if dense else "-"
        paired = "-"
        if dense and r is not dense:
            mine, theirs = paired_train_loss(r, dense)
            paired = f"{mine:.4f} vs {theirs:.4f} ({(mine / theirs - 1) * 100:+.2f}%, steps {r['train_curve'][-10][0]}-{r['steps_done']})"
        done = "" if r["complete"] else f" (stopped at {r['steps_done']}/{r['steps']} steps)"
        lines.append(f"| {r.get('name', '?')} | {m['num_tracks']} | {m['block_depth'] if m['num_tracks'] > 1 else '-'} | "
                     f"{syncs} | {r['params'] / 1e6:.2f}M | {r['tokens_seen'] / 1e6:.1f}M{done} | "
                     f"{r['val_bits_per_byte']:.4f} | {delta} | {paired} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_d, ax_curve) = plt.subplots(1, 2, figsize=(11, 4))
    pt = [r for r in runs if r["model"]["num_tracks"] > 1]
    ax_d.plot([r["model"]["block_depth"] for r in pt], [r["val_bits_per_byte"] for r in pt], "o-",
              label=f"PT, {pt[0]['model']['num_tracks']} tracks" if pt else "PT")
    stopped = [r for r in pt if not r["complete"]]
    if stopped:  # hollow: cut by the time budget before the end of its schedule
        ax_d.plot([r["model"]["block_depth"] for r in stopped], [r["val_bits_per_byte"] for r in stopped], "o",
                  mfc="white", label="stopped early (fewer tokens, not annealed)")
    for r in runs:
        if r["model"]["num_tracks"] == 1:
            ax_d.axhline(r["val_bits_per_byte"], color="k", ls="--", label="dense (TP syncs 2 per layer)")
        ax_curve.plot([s for s, _ in r["train_curve"]], [loss for _, loss in r["train_curve"]], label=r.get("name", "?"))
    ax_d.set_xscale("log", base=2)
    ax_d.minorticks_off()
    ax_d.set_xticks([r["model"]["block_depth"] for r in pt], [str(r["model"]["block_depth"]) for r in pt])
    ax_d.set(xlabel="block depth D (layers between syncs)", ylabel="held-out bits per byte", title="quality against sync interval")
    ax_curve.set(xlabel="step", ylabel="training loss (nats/byte)", title="training curves")
    for ax in (ax_d, ax_curve):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True)
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    runs = load_runs(args.runs)
    text = table(runs)
    print(text, f"\n\ncontext: {PAPER_TREND}")
    result = {"benchmark": "pt_quality", "table": text, "paper_trend": PAPER_TREND, "runs": runs}
    samples = os.path.join(args.runs, "samples.json")
    if os.path.exists(samples):  # what each checkpoint generated when served by plait (sample.py)
        with open(samples) as f:
            result["samples"] = json.load(f)
    write_result(result, args.output_json)
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
