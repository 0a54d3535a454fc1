#!/usr/bin/env bash
# Parallel Track on one machine of 4 GPUs, in one device call of at most ~9.5 minutes (every step has a timeout);
# on one GPU the quality phase runs alone (its five trainings share the GPU; no serving with a track per GPU):
#   quality: dense and PT (T=4, D = 1, 2, 4, 8) trained at equal parameters and tokens on the byte-level Python
#            corpus, in parallel over the GPUs; held-out loss table and plot; every checkpoint served by plait
#            (on 1 GPU, and the D=4 one with a track per GPU).
#   speed:   the PT GPU tests, then Llama-3.1-8B shape, dummy weights, bf16, T GPUs: dense TP=T against
#            pt-llama3-8b-tT-dD (a track per GPU), D = 4 first, then 1, 2, 8 (T = 2, 4 or 8 as the GPUs allow;
#            TRACKS=T picks fewer).
# Build the corpus here first and carry it:  .venv/bin/python -m benchmarks.pt_quality.corpus --out .ptq/corpus.npz
# Usage on the device (carry .ptq):  OUT=/some/dir bash benchmarks/gpu_parallel_track.sh [all|quality|speed]
# A run cut by its budget says so in the results (steps done, figures missing); run the phases as two calls with
# larger budgets then, e.g. TRAIN_SECONDS=420 ... quality and VARIANT_SECONDS=100 ... speed.
# Writes to $OUT: pt_quality.json, pt_quality.png, pt_speed.json, pt_device.log, pytest_pt_gpu.log.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# The device's copied .git can be older than the tree it runs: pass PLAIT_COMMIT=<hash of the tree> from here.
export PLAIT_COMMIT=${PLAIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
OUT=${OUT:-benchmarks/results}
PHASE=${1:-all}
WORK=${WORK:-/tmp/pt}
CORPUS=${CORPUS:-.ptq/corpus.npz}
TRAIN_SECONDS=${TRAIN_SECONDS:-120}    # per training run (5 runs share the GPUs at once)
# Tokens per run, the same for all. On one GPU the PT runs (4 tracks in one process) are about half as fast as dense:
# 400 s there reached 17.6M tokens (benchmarks/results/pt_quality_h200x1.json), so 14M lets every run finish its
# schedule (a run cut by the budget is compared at equal steps only).
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
TOKENS=${TOKENS:-$([ "$ngpu" -ge 4 ] && echo 32000000 || echo 14000000)}
SEED=${SEED:-0}                        # a second study with another seed shows the spread between runs
VARIANT_SECONDS=${VARIANT_SECONDS:-55}  # per model of the speed sweep, startup included
mkdir -p "$OUT" "$WORK/runs" "$WORK/speed"
exec > >(tee -a "$OUT/pt_device.log") 2>&1
echo "phase $PHASE on $ngpu GPUs, $(date -u +%FT%TZ)"

quality() {
  if [ ! -f "$CORPUS" ]; then  # not carried: this machine's own packages (the manifest in the results says which)
    CORPUS=$WORK/corpus.npz
    python3 -m benchmarks.pt_quality.corpus --out "$CORPUS" | tail -n 1
  fi
  local i=0 pids=()
  for spec in dense:1:16 pt-t4-d1:4:1 pt-t4-d2:4:2 pt-t4-d4:4:4 pt-t4-d8:4:8; do
    IFS=: read -r name tracks depth <<< "$spec"
    CUDA_VISIBLE_DEVICES=$((i % ngpu)) timeout $((TRAIN_SECONDS + 40)) python3 -m benchmarks.pt_quality.train \
      --corpus "$CORPUS" --out "$WORK/runs" --name "$name" --tracks "$tracks" --block-depth "$depth" \
      --max-seconds "$TRAIN_SECONDS" --tokens "$TOKENS" --seed "$SEED" > "$WORK/train_$name.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
  done
  wait "${pids[@]}"
  tail -n 2 "$WORK"/train_*.log
  timeout 45 python3 -m benchmarks.pt_quality.sample --runs "$WORK/runs" --device cuda --max-tokens 120 | tail -n 30
  [ "$ngpu" -ge 4 ] && timeout 40 python3 -m benchmarks.pt_quality.sample --runs "$WORK/runs" --names pt-t4-d4 --tp 4 \
    --device cuda | tail -n 8
  python3 -m benchmarks.pt_quality.report --runs "$WORK/runs" --output-json "$OUT/pt_quality.json" --plot "$OUT/pt_quality.png"
}

speed() {
  timeout 90 python3 -m pytest -q -m gpu tests/gpu/test_parallel_track_gpu.py -p no:cacheprovider --tb=short \
    > "$OUT/pytest_pt_gpu.log" 2>&1; tail -n 2 "$OUT/pytest_pt_gpu.log"
  # dense first (every ratio needs it), then D=4 (the targets), then the rest of the sweep; T = TRACKS, by default
  # the most of 2, 4, 8 that the machine's GPUs hold (8 on x8, 4 on x4, 2 on x2), against dense TP=T
  t=${TRACKS:-$(for w in 2 4 8; do [ "$w" -le "$ngpu" ] && echo $w; done | tail -n 1)}
  for spec in dense:llama3-8b pt-d4:pt-llama3-8b-t$t-d4 pt-d1:pt-llama3-8b-t$t-d1 pt-d2:pt-llama3-8b-t$t-d2 pt-d8:pt-llama3-8b-t$t-d8; do
    IFS=: read -r label model <<< "$spec"
    timeout "$VARIANT_SECONDS" python3 benchmarks/pt_speed.py run "$model" --tp "$t" --label "$label" --num-prompts 32 \
      --output-json "$WORK/speed/pt_speed_$label.json" | grep -v "^$label tpot\|^$label ttft"
  done
  python3 benchmarks/pt_speed.py report "$WORK/speed" --output-json "$OUT/pt_speed.json"
}

case "$PHASE" in
  quality) quality ;;
  speed) speed ;;
  all) quality; speed ;;
  *) echo "usage: $0 [all|quality|speed]"; exit 2 ;;
esac
