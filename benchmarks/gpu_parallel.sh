#!/usr/bin/env bash
# Every parallel mode on one machine of 4 GPUs, one device call: GPU tests, then Llama-3.1-8B-shape latency
# (dummy weights, bf16) for TP/PP/DP/SP/Shift. Usage on the device: OUT=/some/dir bash benchmarks/gpu_parallel.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
B="timeout 120 python3 -m plait.cli bench latency llama3-8b --dtype bfloat16 --device cuda --num-iters 2"

timeout 200 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider --tb=short > "$OUT/pytest_gpu.log" 2>&1
tail -2 "$OUT/pytest_gpu.log"
SMALL="--batch-size 1 --input-len 128 --output-len 64 --max-num-seqs 8"
$B --tp 4 $SMALL --output-json "$OUT/latency_tp4_bs1.json" | tail -4
$B --sp 4 --shift $SMALL --output-json "$OUT/latency_shift4_bs1.json" | tail -4
$B --sp 4 $SMALL --output-json "$OUT/latency_sp4_bs1.json" | tail -4
$B --tp 2 --pp 2 $SMALL --output-json "$OUT/latency_tp2xpp2_bs1.json" | tail -4
$B --pp 4 $SMALL --output-json "$OUT/latency_pp4_bs1.json" | tail -4
BIG="--batch-size 64 --input-len 512 --output-len 64 --max-num-seqs 64"
$B --tp 4 $BIG --output-json "$OUT/latency_tp4_bs64.json" | tail -4
$B --sp 4 --shift $BIG --output-json "$OUT/latency_shift4_bs64.json" | tail -4
$B --dp 4 $BIG --output-json "$OUT/latency_dp4_bs64.json" | tail -4
$B --sp 4 $BIG --output-json "$OUT/latency_sp4_bs64.json" | tail -4
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("latency_*.json")):
    r = json.loads(f.read_text()); fl = r.get("floors", {})
    print(f"{r['parallel']:8s} bs={r['batch_size']:<3d} TTFT {r['ttft_ms']['median']:8.2f} ms  TPOT {r['tpot_ms']['median']:7.3f} ms"
          f" (floor {fl.get('decode_ms', 0):6.3f}, x{fl.get('tpot_over_floor', 0):.2f})  {r['output_throughput_tok_s']:8.1f} tok/s")
PY
