"""The short table the device scripts print last: every `plait bench latency` result in a folder, with its floors.

    python3 benchmarks/latency_table.py OUT_DIR [--skipped "runs not made"]

One line per JSON whose benchmark is latency (TTFT beside the prefill floor, TPOT beside the decode floor and the
ratio, output tokens per second) or hf_compare; other JSON files are left out.
"""

from __future__ import annotations

import argparse
import json
import pathlib


def line(name: str, r: dict) -> str | None:
    if r.get("benchmark") == "hf_compare":
        return f"{name:28s} HF TPOT {r['tpot_ms']:.2f} ms  prefill {r['prefill_ms']:.1f} ms"
    if r.get("benchmark") != "latency":
        return None
    fl = r.get("floors", {})
    return (f"{name:28s} {r.get('parallel', ''):8s} bs={r['batch_size']:<3d} in={r['input_len']:<5d} "
            f"TTFT {r['ttft_ms']['median']:8.2f} ms (floor {fl.get('prefill_ms', 0):7.2f})  "
            f"TPOT {r['tpot_ms']['median']:7.3f} ms (floor {fl.get('decode_ms', 0):6.3f}, x{fl.get('tpot_over_floor', 0):.2f})  "
            f"{r['output_throughput_tok_s']:8.1f} tok/s  all-reduce {fl.get('all_reduce_us', 0):.1f} us")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=pathlib.Path)
    p.add_argument("--skipped", default="")
    args = p.parse_args()
    for f in sorted(args.out_dir.glob("*.json")):
        text = line(f.stem, json.loads(f.read_text()))
        if text:
            print(text)
    print("skipped:", args.skipped.strip() or "none")


if __name__ == "__main__":
    main()
