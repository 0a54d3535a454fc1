#!/usr/bin/env bash
# The step loop's measurements (docs/step_loop.md) in one device call on nvidia-h200-x4, each with the overlap
# switches off and on: the GPU's idle gap between steps, spread vs gathered sampling, throughput where host work
# matters most, and the t_e sweep (TP = 1, 2, 4 over 4 GPUs, replicas = 4 / TP) for an 8B and a 32B shape.
# Dummy weights, bf16. Sections run in order inside a 580 s budget; one that would not fit is skipped and named in
# the result, so a second call can run it: bash benchmarks/gpu_step_loop.sh te32b
# Usage on the device: OUT=/some/dir [BUDGET=s] [MODES="off on"] bash benchmarks/gpu_step_loop.sh [gap sampling throughput te8b te32b]
# Results: $OUT/step_loop.json (every run's JSON, keyed by name) and $OUT/step_loop.log.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-benchmarks/results}
RUNS=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/step_loop.log") 2>&1
SECTIONS=${*:-gap sampling throughput te8b te32b}
BUDGET=${BUDGET:-580}
P="python3 -m plait.cli"
OFF="--no-async-scheduling"  # asynchronous scheduling is on by default on the GPU
ON="--async-scheduling --async-output-proc"
ON_TP="--async-scheduling --async-output-proc --sampling-parallel"
. benchmarks/budget.sh

for section in $SECTIONS; do
  case $section in
  gap)  # GPU idle between decode steps (CUDA events on every rank), Llama-3.1-8B shape
    L="$P bench latency llama3-8b --dtype bfloat16 --device cuda --num-iters 2"
    need 4 gap_tp4_bs64_off && run gap_tp4_bs64_off 100 $L --tp 4 --batch-size 64 --input-len 512 --output-len 64 --max-num-seqs 64 $OFF
    need 4 gap_tp4_bs64_on && run gap_tp4_bs64_on 100 $L --tp 4 --batch-size 64 --input-len 512 --output-len 64 --max-num-seqs 64 $ON_TP
    run gap_tp1_bs1_off 70 $L --batch-size 1 --input-len 128 --output-len 128 --max-num-seqs 8 $OFF
    run gap_tp1_bs1_on 70 $L --batch-size 1 --input-len 128 --output-len 128 --max-num-seqs 8 $ON
    ;;
  sampling)  # TP=4, Qwen2.5's 152k vocabulary, batch 256
    need 4 sampling_tp4_bs256 && run sampling_tp4_bs256 90 python3 benchmarks/spread_sampling.py --gpus 4 --batch-size 256
    ;;
  throughput)  # where host work matters most: SmolLM2 on one GPU, Llama-3.2-1B at TP=2
    # 4096 prompts: 512 lasted 1.5-2.5 s and varied by a third between identical runs. Each setting twice,
    # alternating, so a drift of the machine touches both. With SmolLM2's tokenizer (carry .tok, made as
    # benchmarks/serving_tokenizer.py says), so every token is detokenized as a user's would be.
    T="$P bench throughput --dtype bfloat16 --device cuda --num-prompts 4096 --input-len 64 --output-len 128 --max-num-seqs 256"
    TS=$T TL=$T  # each model with its own tokenizer (Llama-3.2-1B's ids run past SmolLM2's vocabulary)
    if [ -d .tok/smollm2-135m ]; then TS="$T --tokenizer .tok/smollm2-135m"; else echo "== no .tok/smollm2-135m: no detokenization"; fi
    if [ -d .tok/llama3-8b ]; then TL="$T --tokenizer .tok/llama3-8b"; else echo "== no .tok/llama3-8b: no detokenization"; fi
    # MODES picks the settings (default all three; "off on" when device time is short).
    for i in 1 2; do
      for mode in ${MODES:-off sched on}; do
        case $mode in off) flags=$OFF ;; sched) flags=--async-scheduling ;; on) flags=$ON ;; esac
        run throughput_smollm2_tp1_${mode}_$i 100 $TS smollm2-135m $flags
      done
    done
    need 2 throughput_llama1b_tp2_off && run throughput_llama1b_tp2_off 80 $TL llama3.2-1b --tp 2 $OFF
    need 2 throughput_llama1b_tp2_on && run throughput_llama1b_tp2_on 80 $TL llama3.2-1b --tp 2 $ON_TP
    ;;
  te8b | te32b)
    model=$([ "$section" = te8b ] && echo llama3-8b || echo qwen2.5-32b)
    S="$P bench tp-sweep $model --dtype bfloat16 --device cuda --gpus 4 --tp-sizes 1,2,4 --num-prompts 512 \
       --input-len 256 --output-len 128 --max-num-seqs 128"
    need 4 "${section}_off" && run "${section}_off" 300 $S $OFF
    need 4 "${section}_on" && run "${section}_on" 300 $S $ON_TP
    run "${section}_plan" 60 $P plan $model --gpus 4 --input-len 256 --output-len 128 --max-num-seqs 128 --goal throughput
    ;;
  *) echo "unknown section $section"; SKIPPED="$SKIPPED $section" ;;
  esac
done

python3 - "$RUNS" "$OUT/step_loop.json" "$SKIPPED" <<'PY'
import json, pathlib, sys
runs = {f.stem: json.loads(f.read_text()) for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps({"runs": runs, "skipped": sys.argv[3].split()}, indent=2))
for name, r in runs.items():
    if r.get("benchmark") == "latency":
        gaps = [t["gap_ms"]["median"] for t in r.get("gpu_timeline") or [] if t and t.get("gap_ms")]
        busy = [t["busy_ms"]["median"] for t in r.get("gpu_timeline") or [] if t and t.get("busy_ms")]
        print(f"{name:28s} TPOT {r['tpot_ms']['median']:7.3f} ms  GPU busy {busy[:1]} idle {gaps[:1]} ms (rank 0)")
    elif r.get("benchmark") == "throughput":
        busy = r.get("gpu_busy_fraction") or [0]
        print(f"{name:28s} {r['output_tok_s']:10.1f} output tok/s, GPU busy {100 * busy[0]:.0f}% (rank 0)")
    elif r.get("benchmark") == "tp_sweep":
        print(f"{name:28s} t_e={r['t_e']}  " + "  ".join(f"tp{p['tensor_parallel_size']}: {p['output_tok_s']:.0f}" for p in r["points"]))
    elif r.get("benchmark") == "spread_sampling":
        print(f"{name:28s} greedy x{r['greedy_speedup']:.2f}  top-k/top-p x{r['top_k_top_p_speedup']:.2f}")
print("skipped:", sys.argv[3] or "none")
PY
