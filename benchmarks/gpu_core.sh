#!/usr/bin/env bash
# The core's GPU checks and speed benchmarks in one device call (Llama-3.1-8B shape, dummy weights, bf16).
# Each decode shape runs with the default step loop (asynchronous on the GPU; profiled) and synchronous
# (docs/step_loop.md).
# Usage on the device: OUT=/some/dir [NO_TESTS=1] [HF=1] bash benchmarks/gpu_core.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
B="python3 -m plait.cli bench latency llama3-8b --dtype bfloat16 --device cuda"
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')

if [ -z "${NO_TESTS:-}" ]; then
  timeout 240 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider --tb=short > "$OUT/pytest_gpu.log" 2>&1
  # the kernels compile for many shapes on the GPU: 120 s was not enough for the whole file
  timeout 300 python3 -m pytest -q tests/test_triton_attention.py tests/test_fused_kernels.py -p no:cacheprovider --tb=short > "$OUT/pytest_kernels.log" 2>&1
  echo "kernel tests exit status $? (124: cut by the timeout)" >> "$OUT/pytest_kernels.log"
  tail -n 3 "$OUT/pytest_gpu.log" "$OUT/pytest_kernels.log"
fi
SYNC="--no-async-scheduling"
timeout 200 $B --batch-size 1 --input-len 128 --output-len 256 --num-iters 3 --max-num-seqs 8 --profile --output-json "$OUT/latency_tp1_bs1.json" | tail -48
timeout 200 $B --batch-size 1 --input-len 128 --output-len 256 --num-iters 3 --max-num-seqs 8 $SYNC --output-json "$OUT/latency_tp1_bs1_sync.json" | tail -5
timeout 200 $B --batch-size 64 --input-len 512 --output-len 192 --num-iters 2 --max-num-seqs 64 --profile --output-json "$OUT/latency_tp1_bs64.json" | tail -48
timeout 200 $B --batch-size 64 --input-len 512 --output-len 192 --num-iters 2 --max-num-seqs 64 $SYNC --output-json "$OUT/latency_tp1_bs64_sync.json" | tail -5
timeout 200 $B --batch-size 1 --input-len 8192 --output-len 2 --num-iters 3 --max-num-seqs 1 --output-json "$OUT/latency_tp1_prefill8k.json" | tail -4
if [ "$ngpu" -ge 2 ]; then
  timeout 200 $B --tp 2 --batch-size 1 --input-len 128 --output-len 256 --num-iters 3 --max-num-seqs 8 --output-json "$OUT/latency_tp2_bs1.json" | tail -4
  timeout 200 $B --tp 2 --all-reduce-backend nccl --batch-size 1 --input-len 128 --output-len 256 --num-iters 3 --max-num-seqs 8 --output-json "$OUT/latency_tp2_bs1_nccl.json" | tail -4
fi
timeout 150 python3 benchmarks/small_m_gemv.py --output-json "$OUT/small_m_gemv.json" | tail -21
[ -n "${HF:-}" ] && timeout 240 python3 benchmarks/hf_compare.py --preset llama3-8b --output-json "$OUT/hf_compare_tp1.json" 2>&1 | tail -2
python3 benchmarks/latency_table.py "$OUT"
