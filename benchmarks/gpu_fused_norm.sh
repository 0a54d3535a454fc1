#!/usr/bin/env bash
# Issue 9 in one device call on nvidia-h200-x4 (or x2, x8; sections in order inside a 560 s budget; one that would
# not fit is skipped and named): the GPU tests of the fused all-reduce + norm, the kernel sweep at TP=2, 4 and 8 as
# far as the machine has GPUs (hidden 4096 and 8192; updates the tuning table for the group sizes run), then
# Llama-3.1-8B shape (dummy weights, bf16) at TP = all the machine's GPUs: prefill of 8k and 2k tokens and decode at
# batch 1 and 64 with the fusion off / on / on + token-split overlap / communication removed (--skip-all-reduce).
# Usage on the device: OUT=/some/dir bash benchmarks/gpu_fused_norm.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-benchmarks/results}
BUDGET=${BUDGET:-560}
mkdir -p "$OUT"
RUNS=$(mktemp -d)  # one JSON per run, merged into fused_norm_e2e.json (at most 8 files come back)
exec > >(tee -a "$OUT/fused_norm.log") 2>&1
SKIPPED=""
# run NAME LIMIT_S COMMAND...: under min(LIMIT_S, time left), or skipped when less than half of it is left; prints
# the last $KEEP lines of its output. Never pipe a call: SKIPPED would be set in a subshell and lost.
run() {
  local name=$1 limit=$2 left=$((BUDGET - SECONDS)); shift 2
  if [ "$left" -lt $((limit / 2)) ]; then echo "== $name: skipped ($left s left)"; SKIPPED="$SKIPPED $name"; return; fi
  echo "== $name ($SECONDS s)"
  timeout $((left < limit ? left : limit)) "$@" 2>&1 | grep -v "^check" | tail -n "${KEEP:-60}"
}

run tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/gpu/test_fused_norm_gpu.py \
  "tests/gpu/test_gpu.py::test_two_gpu_modes_match_single_rank" -k "tensor_parallel or fused"
G=$(python3 -c 'import torch; print(torch.cuda.device_count())')
# The tuning table's entries for the group sizes this machine has are replaced (TP=2 on x2; 2 and 4 on x4; 2, 4, 8 on
# x8), 75 s each.
WORLDS=$(for w in 2 4 8; do [ "$w" -le "$G" ] && echo $w; done)
run kernel $((75 * $(echo $WORLDS | wc -w))) python3 benchmarks/fused_norm.py --gpus "$(echo $WORLDS | tr ' ' ,)" \
  --output-json "$OUT/fused_norm_kernel.json" --table plait/comm/fused_norm_table.json
cp plait/comm/fused_norm_table.json "$OUT/"
B="python3 -m plait.cli bench latency llama3-8b --dtype bfloat16 --device cuda --tp $G --num-iters 3"
PREFILL="--batch-size 1 --output-len 2 --max-num-seqs 1 --max-num-batched-tokens 8192"
for len in 8192 2048; do
  for mode in off on; do
    KEEP=1 run "prefill${len}_$mode" 60 $B $PREFILL --input-len $len --fused-allreduce-norm $mode \
      --output-json "$RUNS/prefill${len}_$mode.json"
  done
  KEEP=1 run "prefill${len}_split" 60 $B $PREFILL --input-len $len --fused-allreduce-norm on --token-split-overlap \
    --output-json "$RUNS/prefill${len}_split.json"
  KEEP=1 run "prefill${len}_nocomm" 60 $B $PREFILL --input-len $len --fused-allreduce-norm off --skip-all-reduce \
    --output-json "$RUNS/prefill${len}_nocomm.json"
done
for bs in 1 64; do
  for mode in off auto; do
    KEEP=1 run "decode_bs${bs}_$mode" 70 $B --batch-size $bs --input-len 512 --output-len 64 --max-num-seqs 64 \
      --fused-allreduce-norm $mode --output-json "$RUNS/decode_bs${bs}_$mode.json"
  done
done
python3 - "$OUT" "$SKIPPED" "$RUNS" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {f.stem: json.loads(f.read_text()) for f in sorted(pathlib.Path(sys.argv[3]).glob("*.json"))}
(out / "fused_norm_e2e.json").write_text(json.dumps({"runs": runs, "skipped": sys.argv[2].split()}, indent=1))
for name, r in runs.items():
    print(f"{name:22s} TTFT {r['ttft_ms']['median']:8.2f} ms  TPOT {r['tpot_ms']['median']:7.3f} ms")
for n in ("8192", "2048"):
    t = {m: runs.get(f"prefill{n}_{m}", {}).get("ttft_ms", {}).get("median") for m in ("off", "on", "split", "nocomm")}
    for m in ("on", "split"):
        if t["off"] and t[m]:
            print(f"prefill {n}: off/{m} x{t['off'] / t[m]:.3f}" + (f", {m} vs no-comm x{t[m] / t['nocomm']:.3f}" if t["nocomm"] else ""))
print("skipped:", sys.argv[2] or "none")
PY
