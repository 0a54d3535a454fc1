#!/usr/bin/env bash
# Issue 12's runs on one nvidia-h200-x8, one device call per group (dummy weights, bf16; each group under `timeout`,
# its JSON in $OUT, a short table printed last):
#   core     TP=8 speed of the llama3-70b and llama3-8b presets: TPOT at batch 1 (2048-token prompt, which also gives
#            TTFT at 2k) and batch 64, TTFT of an 8k prompt; each beside its floor (weights / HBM bandwidth, plus the
#            measured all-reduce latency per layer)
#   serving  Shift (SP=8 <-> TP=8) against TP=8 and DP=8, Llama-3.1-8B shape, low load / saturation / bursty trace
#            (benchmarks/gpu_serving.sh; carry .whl and .tok as it says). 70B is left out: SP replicates the weights,
#            140 GB, more than one H200 holds beside a KV cache.
#   fused    fused all-reduce + RMSNorm and the token-split overlap at TP=8 against the unfused path, and the kernel
#            sweep at 2, 4, 8 GPUs (benchmarks/gpu_fused_norm.sh)
#   track    Parallel Track, 8 tracks against dense TP=8 (benchmarks/gpu_parallel_track.sh speed)
#   comm     the communication model's validation and the t_e sweep up to TP=8 (benchmarks/gpu_comm.sh)
# Usage on the device: OUT=/some/dir bash benchmarks/gpu_x8.sh GROUP
#   run(kind="nvidia-h200-x8", timeout_s=600, command="bash benchmarks/gpu_x8.sh core")
# On fewer GPUs core, serving, fused and track run at the machine's size (layouts named by it: tp4, shift4, ...); comm
# asks for 8. MODELS="llama3-8b" limits core to the models named (a 70B start takes about a minute).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-benchmarks/results}
LIMIT=${LIMIT:-585}  # the whole group; the device allows 600 s a call
RUNS=$OUT BUDGET=$((LIMIT - 15))  # for budget.sh's `run` (core)
mkdir -p "$OUT"
. benchmarks/budget.sh
G=$NGPU

core() {
  local model B
  for model in ${MODELS:-llama3-70b llama3-8b}; do
    B="python3 -m plait.cli bench latency $model --dtype bfloat16 --device cuda --tp $G --num-iters 2"
    B="$B --max-num-batched-tokens 8192"
    run "x8_${model}_bs1" 120 $B --batch-size 1 --input-len 2048 --output-len 128 --max-num-seqs 8
    run "x8_${model}_bs64" 120 $B --batch-size 64 --input-len 512 --output-len 128 --max-num-seqs 64
    run "x8_${model}_prefill8k" 90 $B --batch-size 1 --input-len 8192 --output-len 2 --max-num-seqs 1
  done
  python3 benchmarks/latency_table.py "$OUT" --skipped "$SKIPPED"
}

case "${1:-}" in
  core) core 2>&1 | tee -a "$OUT/x8_core.log" ;;
  serving) timeout "$LIMIT" bash benchmarks/gpu_serving.sh tp$G shift$G dp$G ;;
  fused) timeout "$LIMIT" bash benchmarks/gpu_fused_norm.sh ;;
  track) timeout "$LIMIT" bash benchmarks/gpu_parallel_track.sh speed ;;
  comm) CONFIGS=tp1,tp2,tp4,tp8,pp8,tp4pp2 PROFILE_CONFIGS=tp8,tp4pp2 timeout "$LIMIT" bash benchmarks/gpu_comm.sh ;;
  *) echo "usage: $0 core|serving|fused|track|comm"; exit 2 ;;
esac
