#!/usr/bin/env bash
# Issues 4, 5, 8 and 12 in one device call on nvidia-h200-x4 or x8 (G = the GPUs there; on one GPU only the tp1
# layout runs): `plait serve` (MODEL, default llama3-8b: Llama-3.1-8B shape; dummy weights, bf16) in each parallel
# layout of G GPUs, loaded by `plait bench serve` on loopback with the same workloads:
#   low512 .. low16384  one request at a time (3 each), 512 / 4096 / 16384 tokens in, 256 out: TTFT, TPOT, completion
#   sat              saturation: 256 requests, 128 in flight, 512 in / 128 out: throughput
#   trace            benchmarks/serving_trace.jsonl replayed by timestamp (Poisson + bursts, long-tailed inputs)
#   rate             TP=G only (issue 4): 200 random requests at 20/s, at most 32 in flight, goodput, plots
#   prefix           TP=G only: 128 requests sharing a 2048-token prefix (+128 own, 64 out), 16 in flight: what
#                    prefix caching serves (the server's /metrics hit counters show it)
# Layouts in order of value (G=4): tp4 shift4 (SP4 <-> TP4) dp4 sp4 pp4 tp2pp2 sp2tp2, each one server start (~30-60 s)
# and its workloads (~50 s, tp4 ~65 s). Inside the 560 s budget a layout starts only with 75 s left (plus 15 for the
# report), a workload only with half its 60 s limit left; what does not fit is skipped and named in the result, so a
# second call can run it, e.g.: bash benchmarks/gpu_serving.sh tp2pp2 sp2tp2
# The qwen2.5-32b pass is a call of its own (prepare .tok/qwen2.5-32b as below):
#   MODEL=qwen2.5-32b OUT=$OUT/qwen2.5-32b bash benchmarks/gpu_serving.sh
#
# Prepare here, once (neither is committed: /.whl/ and /.tok/ are ignored; about 3 MB each):
#   xargs -a <(grep -v '^#' benchmarks/serving_wheels.txt) python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl          # the server's packages that the device's image lacks
#   .venv/bin/python benchmarks/serving_tokenizer.py llama3-8b .tok/llama3-8b    # a preset has no tokenizer (and
#   the same for qwen2.5-32b)
# Device: run(kind="nvidia-h200-x4", carry=[".whl", ".tok"], timeout_s=600, command="bash benchmarks/gpu_serving.sh")
# ENGINE_FLAGS="--async-scheduling ..." adds engine flags to every server; WORKLOADS="sat rate" runs only those.
# The engine in a process of its own (the default) against a thread of the server (one GPU, both in one call):
#   OUT=$OUT/process WORKLOADS="sat rate" bash benchmarks/gpu_serving.sh; \
#   OUT=$OUT/thread ENGINE_FLAGS=--no-frontend-multiprocessing WORKLOADS="sat rate" bash benchmarks/gpu_serving.sh
# Results: $OUT/serving.json (every run by layout and workload, issue 8's targets met or missed, what was skipped or
# failed), serving.log, serving.png (TPOT against throughput; the trace's p99 completion time), tp4_rate-*.png.
# CPU dry run of the plumbing (smollm2-135m dummy weights on 2 ranks, tiny workloads; not a measurement; ~10 min):
#   DRY_RUN=1 PY=.venv/bin/python OUT=/tmp/serving bash benchmarks/gpu_serving.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-benchmarks/results}
BUDGET=${BUDGET:-560}
PY=${PY:-python3}
PORT=${PORT:-18400}
mkdir -p "$OUT"
RUNS=$(mktemp -d)  # one JSON per run, merged into serving.json (at most 8 files come back)
exec > >(tee -a "$OUT/serving.log") 2>&1
SKIPPED="" FAILED=""

if [ -n "${DRY_RUN:-}" ]; then  # the same sections on CPU: plumbing only
  G=2 MODEL=smollm2-135m ENGINE="--device cpu --dtype float32 --max-model-len 512"
  LOW_IN="32 128 384" LOW_N=2 LOW_OUT=8 SAT="--num-prompts 8 --max-concurrency 4 --random-input-len 32 --random-output-len 8"
  RATE="--num-prompts 8 --request-rate 4 --max-concurrency 4 --random-input-len 32 --random-output-len 8"
  PREFIX="--num-prompts 8 --max-concurrency 4 --random-prefix-len 64 --random-input-len 16 --random-output-len 8"
  TRACE=$RUNS/trace.jsonl START_S=180 MIN_S=40 RUN_S=90
  $PY benchmarks/serving_trace.py "$TRACE" --duration 2 --rate 2 --bursts 1 --burst-size 3 --input-median 24 \
    --input-max 128 --output-median 6 --output-max 8
else
  G=${G:-$($PY -c 'import torch; print(torch.cuda.device_count())')}
  MODEL=${MODEL:-llama3-8b} ENGINE="--device cuda --dtype bfloat16 --max-model-len 17408"  # 16k in + 256 out fit
  LOW_IN="512 4096 16384" LOW_N=3 LOW_OUT=256
  SAT="--num-prompts 256 --max-concurrency 128 --random-input-len 512 --random-output-len 128"
  RATE="--num-prompts 200 --request-rate 20 --max-concurrency 32 --random-input-len 512 --random-output-len 128"
  PREFIX="--num-prompts 128 --max-concurrency 16 --random-prefix-len 2048 --random-input-len 128 --random-output-len 64"
  TRACE=benchmarks/serving_trace.jsonl START_S=150 MIN_S=75 RUN_S=60
  if ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  fi
fi
TOKENIZER=.tok/$MODEL
if [ ! -d "$TOKENIZER" ]; then
  if [ -n "${DRY_RUN:-}" ]; then $PY benchmarks/serving_tokenizer.py "$MODEL" "$TOKENIZER"
  else echo "$TOKENIZER is missing: make it with benchmarks/serving_tokenizer.py and carry .tok"; exit 1; fi
fi
ENGINE="$MODEL --tokenizer $TOKENIZER $ENGINE --max-num-seqs 128 --max-num-batched-tokens 8192 ${ENGINE_FLAGS:-}"
H=$((G / 2))
declare -A LAYOUT=([tp$G]="--tp $G")
if [ "$G" -gt 1 ]; then
  LAYOUT+=([shift$G]="--sp $G --shift" [dp$G]="--dp $G" [sp$G]="--sp $G" [pp$G]="--pp $G")
  SECTIONS=${*:-tp$G shift$G dp$G sp$G pp$G}
  if [ "$H" -gt 1 ]; then  # the hybrids (on 2 GPUs they would be pp2 and sp2 again)
    LAYOUT+=([sp2tp$H]="--sp 2 --tp $H" [tp${H}pp2]="--tp $H --pp 2")
    SECTIONS=${*:-tp$G shift$G dp$G sp$G pp$G tp${H}pp2 sp2tp$H}
  fi
else  # one GPU: the server at TP=1 only (issue 4)
  SECTIONS=${*:-tp1}
fi

wants() { [[ " ${WORKLOADS:-low sat trace rate prefix} " == *" $1 "* ]]; }  # WORKLOADS="sat rate": only those

run() {  # run NAME LIMIT_S COMMAND...: under min(LIMIT_S, time left), or skipped when less than half of it is left
  local name=$1 limit=$2 left=$((BUDGET - SECONDS)); shift 2
  if [ "$left" -lt $((limit / 2)) ]; then echo "== $name: skipped ($left s left)"; SKIPPED="$SKIPPED $name"; return; fi
  echo "== $name ($SECONDS s)"
  timeout $((left < limit ? left : limit)) "$@"
}

bench() {  # bench NAME FLAGS...: one `plait bench serve` against the server on $PORT; key lines to the log
  local name=$1 rc; shift
  run "$name" $RUN_S $PY -m plait.cli bench serve --port $PORT --ignore-eos --disable-tqdm \
    --metric-percentiles 50,99 --output-json "$RUNS/$name.json" "$@" > "$RUNS/$name.txt" 2>&1
  rc=$?
  grep -E "^(== |Successful|Failed|Benchmark duration|Output token|Median (TTFT|TPOT)|P99 E2EL|failed|.*Error)" "$RUNS/$name.txt"
  [ $rc = 0 ] || { echo "   exit $rc"; FAILED="$FAILED $name"; }
}

serve() {  # serve LAYOUT: start the server, run the workloads, stop it (SIGTERM to its process group, then KILL)
  local name=$1 left=$((BUDGET - SECONDS)) pid up=""
  echo "== $name: plait serve ${LAYOUT[$name]} ($SECONDS s)"
  echo "$name ${LAYOUT[$name]}" >> "$RUNS/layouts.txt"
  setsid $PY -m plait.cli serve $ENGINE ${LAYOUT[$name]} --port $PORT --disable-uvicorn-access-log \
    --drain-timeout 5 > "$RUNS/$name.server.log" 2>&1 &
  pid=$!
  for ((i = 0; i < (left < START_S ? left : START_S); i++)); do
    (exec 3<> "/dev/tcp/127.0.0.1/$PORT") 2> /dev/null && up=1 && break  # it listens once it can serve
    kill -0 $pid 2> /dev/null || break
    sleep 1
  done
  if [ -n "$up" ]; then
    echo "   up after $i s"
    if wants low; then
      for len in $LOW_IN; do
        bench "${name}_low$len" --num-prompts $LOW_N --max-concurrency 1 --random-input-len $len --random-output-len $LOW_OUT
      done
    fi
    wants sat && bench "${name}_sat" $SAT
    wants trace && bench "${name}_trace" --dataset-name trace --dataset-path "$TRACE"
    [ "$name" = "tp$G" ] && wants rate && bench "${name}_rate" $RATE --goodput ttft:500 tpot:50 --plot "$OUT/${name}_rate"
    [ "$name" = "tp$G" ] && wants prefix && bench "${name}_prefix" $PREFIX
  else
    echo "   no server after $i s"; FAILED="$FAILED $name"
  fi
  kill -TERM -- -$pid 2> /dev/null
  for ((i = 0; i < 20; i++)); do kill -0 -- -$pid 2> /dev/null || break; sleep 1; done
  kill -KILL -- -$pid 2> /dev/null
  if [ -z "$up" ] || grep -qE "Traceback|ERROR" "$RUNS/$name.server.log"; then
    tail -n 25 "$RUNS/$name.server.log" | sed "s/^/   [$name] /"
  fi
  PORT=$((PORT + 1))  # the next server never waits for this one's socket
}

for section in $SECTIONS; do
  if [ -z "${LAYOUT[$section]:-}" ]; then
    echo "unknown section $section (layouts: ${!LAYOUT[*]})"; SKIPPED="$SKIPPED $section"; continue
  fi
  # a layout starts only with time left for a start and a first workload (MIN_S), and for the report (15 s)
  if [ $((BUDGET - 15 - SECONDS)) -lt $MIN_S ]; then
    echo "== $section: skipped ($((BUDGET - SECONDS)) s left)"; SKIPPED="$SKIPPED $section"; continue
  fi
  serve "$section"
done
$PY benchmarks/serving_report.py "$RUNS" "$OUT" --ranks $G --model $MODEL --skipped "$SKIPPED" --failed "$FAILED" \
  --command "ENGINE_FLAGS='${ENGINE_FLAGS:-}' WORKLOADS='${WORKLOADS:-}' MODEL=$MODEL BUDGET=$BUDGET bash benchmarks/gpu_serving.sh"
