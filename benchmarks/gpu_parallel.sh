#!/usr/bin/env bash
# Every parallel layout over all G GPUs of the machine (G = 2 on nvidia-h200-x2, 4 on x4), one device call:
# Llama-3.1-8B shape, dummy weights, bf16, `plait bench latency` at batch 1 (128 in / 64 out: TTFT, TPOT) and
# batch 64 (512 in / 64 out: throughput). Most valuable first inside BUDGET (default 560 s): TP=G against PP=G and
# DP=G (issue 5), then Shift and SP (issue 8), then the 4-GPU hybrids; a run that would not fit is skipped and named.
# The GPU tests run first (at most 200 s) unless NO_TESTS=1.
# Usage on the device: OUT=/some/dir [BUDGET=s] [NO_TESTS=1] [DONE="tp2_bs1 pp2_bs64 ..."] bash benchmarks/gpu_parallel.sh
# (DONE: points an earlier call made, left out of this one)
# Results: $OUT/latency_<layout>_bs<batch>.json, $OUT/pytest_gpu.log, $OUT/parallel.log
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-benchmarks/results}
RUNS=$OUT
BUDGET=${BUDGET:-560}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/parallel.log") 2>&1
. benchmarks/budget.sh
G=$NGPU
B="python3 -m plait.cli bench latency llama3-8b --dtype bfloat16 --device cuda --num-iters 2"

if [ -z "${NO_TESTS:-}" ]; then
  timeout 200 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider --tb=short > "$OUT/pytest_gpu.log" 2>&1
  tail -n 2 "$OUT/pytest_gpu.log"
fi

# point LAYOUT BATCH FLAGS...: one bench latency run of LAYOUT at batch 1 or 64, unless named in DONE
point() {
  local layout=$1 batch=$2 shape="--batch-size 1 --input-len 128 --output-len 64 --max-num-seqs 8"; shift 2
  case " ${DONE:-} " in *" ${layout}_bs$batch "*) echo "== ${layout}_bs$batch: done in an earlier call"; return;; esac
  [ "$batch" = 64 ] && shape="--batch-size 64 --input-len 512 --output-len 64 --max-num-seqs 64"
  run "latency_${layout}_bs$batch" 130 $B $shape "$@"
}

point tp$G 1 --tp $G
point pp$G 1 --pp $G
point tp$G 64 --tp $G
point pp$G 64 --pp $G
point dp$G 64 --dp $G
point dp$G 1 --dp $G
point shift$G 1 --sp $G --shift
point shift$G 64 --sp $G --shift
point sp$G 64 --sp $G
point sp$G 1 --sp $G
if need 4 "latency_tp2xpp2 (4-GPU hybrids)"; then
  point tp2xpp2 1 --tp 2 --pp 2
  point tp2xpp2 64 --tp 2 --pp 2
  point sp2xtp2 64 --sp 2 --tp 2
fi
python3 benchmarks/latency_table.py "$OUT" --skipped "$SKIPPED"
