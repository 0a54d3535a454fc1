#!/usr/bin/env bash
# Issue 6's asynchronous-scheduling check in one device call (one H200, about 9 minutes):
#  1. the GPU test that launches every kind of step under torch's sync debug mode (set to error), at this tree and
#     at this tree with `hidden[rows]` put back in the eager step (the sync it found: that run must fail);
#  2. the TP=1 validation grid (batch 1, 8, 64 x prompt 128, 2048, 8192) with asynchronous and with synchronous
#     scheduling, one folder each, for `plait calibrate --fit-from` (both grids together) and the report.
# Usage on the device: OUT=/some/dir bash benchmarks/gpu_async_host.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT/async" "$OUT/sync"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
GPU_TEST="tests/gpu/test_gpu.py -m gpu -k async_submit -q -p no:cacheprovider"
timeout 150 python3 -m pytest $GPU_TEST 2>&1 | tail -3 | tee "$OUT/sync_probe.log"
OLD=$(mktemp -d) && cp -r plait tests pyproject.toml "$OLD" && (cd "$OLD" &&
  sed -i 's/hidden.index_select(0, self._as_tensor(rows))/hidden[rows]/' plait/engine/model_runner.py &&
  grep -c "hidden\[rows\]" plait/engine/model_runner.py &&
  PYTHONPATH=$OLD timeout 150 python3 -m pytest $GPU_TEST 2>&1 | grep -E "passed|failed|RuntimeError" | tail -3) \
  | sed 's/^/with hidden[rows]: /' | tee -a "$OUT/sync_probe.log"
GRID="--configs tp1 --profile-configs '' --batches 1,8,64 --input-lens 128,2048,8192 --skip-calibration"
for mode in async sync; do
  eval timeout $((${BUDGET:-200} + 30)) python3 benchmarks/comm_validate.py --out-dir "$OUT/$mode" $GRID \
    --async-scheduling $([ $mode = async ] && echo on || echo off) --budget-s ${BUDGET:-200} 2>&1 | tail -2
  rm -f "$OUT/$mode/comm_validation.log"
done
python3 - "$OUT" <<'PY'
import json, sys
rows = {m: {(p["batch"], p["input_len"]): p for p in json.load(open(f"{sys.argv[1]}/{m}/comm_validation.json"))
            ["configs"].get("tp1", {}).get("points", [])} for m in ("async", "sync")}
print(f"{'point':>10} {'TTFT async':>10} {'sync':>8} {'TPOT async':>10} {'sync':>8}  (ms)")
for k in sorted(set(rows["async"]) | set(rows["sync"])):
    a, s = rows["async"].get(k, {}), rows["sync"].get(k, {})
    print(f"{k[0]:>4}x{k[1]:<5} {a.get('ttft_ms', 0):10.1f} {s.get('ttft_ms', 0):8.1f} {a.get('tpot_ms', 0):10.2f} "
          f"{s.get('tpot_ms', 0):8.2f}")
PY
