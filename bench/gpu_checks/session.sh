#!/usr/bin/env bash
# A lent GPU's whole session in ONE device call (each call's start costs minutes of the budget):
# the kernel checks and the BART-large plan for BART_S seconds, then LongT5-tglobal-large with the
# key block and kernel fallbacks the first part chose, all ending within TOTAL_S seconds.
#
#   bash bench/gpu_checks/session.sh 2>&1       # carry .whl; device timeout_s 600
#   BLOCK=65536 BART_S=300 TOTAL_S=520 bash bench/gpu_checks/session.sh 2>&1
#   CHECK_SCRIPTS=t5_attention_check BLOCK=65536 bash bench/gpu_checks/session.sh   # rerun one check; a block timed before
#
# The device tool brings back at most 8 files: this leaves 7 (checks.jsonl, bart.log, long.log,
# bart_logs.tgz, logs.tgz, bart/points.jsonl, long/points.jsonl); the tables and plots are
# rebuilt from points.jsonl by bench/report.py.
set -uo pipefail
OUT=${OUT:-/tmp/out}
export OUT
# One sweep run id for the whole session (both models, every plan line, and a second device call that
# passes RUN_ID on): rows compare with the hf_ds_gc row of the same run id (bench/report.py comparable).
export RUN_ID=${RUN_ID:-$(date +%Y%m%d-%H%M%S)}
echo "sweep run id: $RUN_ID (a second device call: RUN_ID=$RUN_ID bash bench/gpu_checks/session.sh ...)"
mkdir -p "$OUT"
start=$(date +%s)
CHECKS=1 BUDGET_S=${BART_S:-360} bash bench/gpu_checks/device_sweep.sh 2>&1 | tee "$OUT/bart.log"
[ -f "$OUT/logs.tgz" ] && mv "$OUT/logs.tgz" "$OUT/bart_logs.tgz"
block=$(grep -o 'key block: [0-9]*' "$OUT/bart.log" | grep -o '[0-9]*$' | tail -1)
left=$(( ${TOTAL_S:-560} - ($(date +%s) - start) ))
# FLEX_VARIANTS=1: first where LongT5's flex attention loses its time ([t5-speed]), about a minute
# (most of it compiling), where 4 minutes are left for the LongT5 plan after it (e.g. BART_S=200)
if [ "${FLEX_VARIANTS:-0}" = 1 ] && [ "$left" -gt 330 ]; then
    PYTHONPATH=/tmp/site:$PWD timeout -k 10 90 python3 bench/gpu_checks/flex_variants.py | tee -a "$OUT/checks.jsonl"
    left=$(( ${TOTAL_S:-560} - ($(date +%s) - start) ))
fi
# the wheels are installed by now (NO_WHEELS); the fallbacks come from $OUT/checks.jsonl
MODEL=long-t5-tglobal-large BLOCK=${block:-32768} BUDGET_S=$left NO_WHEELS=1 \
    bash bench/gpu_checks/device_sweep.sh 2>&1 | tee "$OUT/long.log"
rm -f "$OUT"/*/table.md "$OUT"/*/*.png
