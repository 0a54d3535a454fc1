#!/usr/bin/env bash
# Issue 6's validation in one device call (nvidia-h200-x4, about 6.5 to 9 minutes): calibration (group sizes 2 and 4,
# at most 90 s), then TP=1/2/4, PP=2/4 and TP2xPP2 over batch 1, 8, 32 x prompt 128, 2048, 8192 (at most 65536 prompt
# tokens a point; Llama-3.1-8B shape, dummy weights, bf16), timed with decode graphs, then tp2, tp4 and tp2pp2
# profiled, then the report. Every job gets a fair share of the 530 s budget and runs its cheapest points first.
# At most 8 files come back from $OUT: the JSON, the calibration, the log, the report and its 3 plots. A run cut
# short keeps what it measured: run it again with RESUME=1 for the points still missing.
# Usage on the device: OUT=/some/dir bash benchmarks/gpu_comm.sh
# Other configurations (names in benchmarks/comm_validate.py): CONFIGS=tp1,tp8 PROFILE_CONFIGS=tp8 bash ...
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -4
timeout ${LIMIT:-575} python3 benchmarks/comm_validate.py --out-dir "$OUT" --budget-s ${BUDGET:-530} ${RESUME:+--resume} \
  ${CONFIGS:+--configs $CONFIGS} ${PROFILE_CONFIGS:+--profile-configs $PROFILE_CONFIGS} 2>&1 | tail -30
python3 benchmarks/comm_report.py "$OUT/comm_validation.json" --out "$OUT" 2>&1 | tail -2
grep -E "within|Right \(within|^[123]\. " "$OUT/comm_report.md"
