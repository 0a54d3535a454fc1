# Sourced by the device scripts: runs inside one call's time budget, and skips what needs more GPUs than the machine
# has, naming each skipped run. The script sets BUDGET (seconds for all of it) and RUNS (where run NAME writes
# NAME.json) first; this sets NGPU and SKIPPED.
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
SKIPPED=""

# need GPUS NAME: true when the machine has GPUS GPUs, else records NAME as skipped
need() {
  [ "$NGPU" -ge "$1" ] && return 0
  echo "== $2: skipped (needs $1 GPUs, have $NGPU)"; SKIPPED="$SKIPPED $2"; return 1
}

# run NAME LIMIT_S COMMAND...: runs under min(LIMIT_S, what is left) when at least half of LIMIT_S is left, else
# records NAME as skipped; the command gets --output-json $RUNS/NAME.json
run() {
  local name=$1 limit=$2 left=$((BUDGET - SECONDS)); shift 2
  if [ "$left" -lt $((limit / 2)) ]; then
    echo "== $name: skipped ($left s left, allowed $limit)"; SKIPPED="$SKIPPED $name"; return
  fi
  echo "== $name ($SECONDS s)"
  timeout $((left < limit ? left : limit)) "$@" --output-json "$RUNS/$name.json" 2>&1 | grep -v "it/s\]" | tail -6
}
