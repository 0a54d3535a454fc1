"""Regenerate the README's performance table from the result JSON files (python3 benchmarks/tables.py)."""

from __future__ import annotations

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"


def latency_rows() -> list[str]:
    rows = []
    for f in sorted((ROOT / "benchmarks/results").glob("latency_*.json")):
        r = json.loads(f.read_text())
        fl = r.get("floors")
        if not fl:
            continue
        label = r.get("parallel", f"tp{r['tensor_parallel_size']}")
        if f.stem.endswith("_nccl"):
            label += " (NCCL all-reduce)"
        if not r.get("async_scheduling"):  # results from before the field were all synchronous
            label += ", sync"
        rows.append(
            f"| {r['model']} | {label} | {r['batch_size']} | {r['input_len']}/{r['output_len']} "
            f"| {r['ttft_ms']['median']:.1f} | {fl['prefill_ms']:.1f} | {r['tpot_ms']['median']:.2f} "
            f"| {fl['decode_ms']:.2f} | {fl['tpot_over_floor']:.2f}x | {r['output_throughput_tok_s']:.0f} | {r['device']} |"
        )
    return rows


def table() -> str:
    head = [
        "| model | parallel | batch | in/out | TTFT ms | TTFT floor | TPOT ms | TPOT floor | TPOT/floor | out tok/s | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    hf = ROOT / "benchmarks/results/hf_compare_tp1.json"
    note = ""
    if hf.exists():
        h = json.loads(hf.read_text())
        note = (f"\nHugging Face transformers {h['transformers']} on the same GPU, same run: TPOT {h['tpot_ms']:.2f} ms "
                f"(static cache, batch 1), prefill of {h['prefill_len']} tokens {h['prefill_ms']:.1f} ms.\n")
    return "\n".join(head + latency_rows()) + "\n" + note


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{BEGIN}\n{table()}{END}"
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), block, text, flags=re.S) if BEGIN in text else text + "\n" + block + "\n"
    readme.write_text(text)


if __name__ == "__main__":
    main()
