#!/usr/bin/env bash
# Issue 8: Shift's measured step-time tables on nvidia-h200-x4 (Llama-3.1-8B shape, dummy weights, bf16), SP4 and
# SP2 x TP2, each mode timed by `plait bench shift-steps` and added to a copy of the fitted calibration; the engine's
# threshold then comes from them (--calibration $OUT/calibration_shift.json). About 4 minutes.
# Usage on the device: OUT=/some/dir bash benchmarks/gpu_shift_steps.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-benchmarks/results/comm}
mkdir -p "$OUT"
CAL=$OUT/calibration_shift.json
[ -f "$CAL" ] || cp benchmarks/results/comm/calibration_fitted.json "$CAL"
S="python3 -m plait.cli bench shift-steps llama3-8b --shift --device cuda --dtype bfloat16 --max-num-seqs 128 \
   --max-num-batched-tokens 8192 --calibration $CAL --tokens 1,8,32,128,512,2048,8192 --context 1024 --repeats 5"
timeout 150 $S --sp 4 2>&1 | grep -v "it/s\]" | tail -10
timeout 150 $S --sp 2 --tp 2 2>&1 | grep -v "it/s\]" | tail -10
