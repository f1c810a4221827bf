#!/usr/bin/env bash
# The GPU run of [bench] on a lent machine (device tool): BART-large bf16 ZeRO-3, all four methods,
# most informative points first, each sweep call bounded so the whole run ends inside the lease.
# Results land in $OUT/bart (points.jsonl, table.md, memory.png, throughput.png) and $OUT/logs.tgz.
#
#   bash bench/gpu_checks/device_sweep.sh            # carry .whl (../shared/device/wheelhouse.sh builds it)
#   CHECKS=1 bash bench/gpu_checks/device_sweep.sh   # first the kernels' CUDA checks (~1.5 min), into $OUT/checks.jsonl
#   MODEL=long-t5-tglobal-large BLOCK=32768 bash bench/gpu_checks/device_sweep.sh   # its own plan, --fast_t5_attention
#   PLAN="--tokens 16384 --methods hf_ds_gc,cached" bash bench/gpu_checks/device_sweep.sh   # any plan; PRINT_PLAN=1 lists it
#   PLAIN=1 / BLOCKED_T5=1 ...: streaming lines on plain ops (--plain_cross_attention) / fast T5
#   attention on the blocked code (--blocked_t5_attention); CHECKS=1 sets them where a fused kernel failed
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -z "${NO_WHEELS:-}" ]; then  # NO_WHEELS=1: a dry run where deepspeed is installed (CPU)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/deepspeed-*.whl .whl/hjson-*.whl .whl/pydantic-*.whl .whl/pydantic_core-*.whl \
        .whl/annotated_types-*.whl .whl/typing_inspection-*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-bart-large}
RESULTS=$OUT/${MODEL%%-*}  # only points.jsonl here, and $OUT/logs.tgz: the device tool brings back 8 files
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-420} ))
RUN_ID=${RUN_ID:-$(date +%Y%m%d-%H%M%S)}  # every plan line one sweep run: their rows compare with each other's hf_ds_gc
WORK=${SWEEP_WORK:-/tmp/sweep_work/$RUN_ID}/${MODEL%%-*}  # sweep.py's folder (logs, table, plots) while the plan runs
mkdir -p "$OUT" "$RESULTS" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
[ -n "${PRINT_PLAN:-}" ] && { CHECKS=; BLOCK=${BLOCK:-32768}; }  # listing the plan runs nothing on the GPU
if [ -n "${CHECKS:-}" ]; then  # exactness of the CUDA kernel paths and of a CUDA engine step, before any timing
    for check in ${CHECK_SCRIPTS:-streaming_cross_attention_check t5_attention_check engine_check}; do  # CHECK_SCRIPTS: a subset
        left=$(( DEADLINE - $(date +%s) - ${SWEEP_RESERVE_S:-120} ))  # checks leave the plan's first lines their time
        if [ "$left" -lt 30 ]; then echo "skipped (deadline): $check"; continue; fi
        timeout -k 10 $(( left < 240 ? left : 240 )) python3 "bench/gpu_checks/$check.py" | tee -a "$OUT/checks.jsonl"
    done
fi
# A fused kernel that failed its check while its fallback passed: the plan runs the fallback
# (fallbacks.py); PLAIN=1 / BLOCKED_T5=1 ask for them without checks.
FALLBACKS=$( [ -f "$OUT/checks.jsonl" ] && python3 bench/gpu_checks/fallbacks.py "$OUT/checks.jsonl" )
[[ $FALLBACKS == *--plain_cross_attention* ]] && PLAIN=1
[[ $FALLBACKS == *--blocked_t5_attention* ]] && BLOCKED_T5=1
echo "kernel fallbacks: ${FALLBACKS:-none}"

# The key-block size of the streaming lines: the fastest of a few, timed on this GPU (pick_block.py).
BLOCK=${BLOCK:-$(timeout 90 python3 bench/gpu_checks/pick_block.py --report "$OUT/checks.jsonl" ${PLAIN:+--plain} || true)}
BLOCK=${BLOCK:-32768}
echo "streaming cross-attention key block: $BLOCK"

sweep() {  # sweep ARGS...: run if the deadline leaves time, bounded by it
    local left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -lt 30 ]; then echo "skipped (deadline): $*"; return; fi
    # tqdm redraws its bar with \r on the line that carries each point's result: split them, drop the bar
    timeout -k 15 "$left" python3 bench/sweep.py --model "$MODEL" --dtype bf16 --zero_stage 3 --out "$WORK" --run_id "$RUN_ID" ${SWEEP_ARGS:-} \
        --warmup "${WARMUP:-2}" --steps 2 --point_timeout "${POINT_TIMEOUT:-240}" "$@" --deadline $(( DEADLINE - 5 )) 2>&1 \
        | tr '\r' '\n' | grep -v -e "sweep points" -e '^ *$'
    # after every line, so a call stopped at its limit still brings back what ran
    [ -f "$WORK/points.jsonl" ] && cp -f "$WORK/points.jsonl" "$RESULTS/points.jsonl"
    [ -d "$WORK/logs" ] && tar czf "$WORK/logs.tgz" -C "$WORK" logs && cp -f "$WORK/logs.tgz" "$OUT/logs.tgz"
}
# PLAN: one sweep per line (its arguments; a line's --warmup/--steps win over the defaults), the
# open questions first (results/2026-11-27-nvidia-h200*/NOTES.md). A session has about 150 s for
# BART after the checks and about 240 s for LongT5, so each list starts with what decides its
# target and leaves the A/Bs for later calls.
# BART-large: the [bench] ratio at the lengths not yet run in one run id (64K 1.85x, 256K 1.03x,
# 512K 1.00x on 2026-11-28: results/2026-11-28-nvidia-h200/NOTES.md): 16K, 32K and 128K, then 512K
# again with more steps (it was level with one), then [decoder-memory]'s open figures: the growth
# per token with streaming (2M, 4M, with the allocator's trace), the offloaded reach (4M, 16M: 16M
# pins 96 GiB of host memory), 1M with its baseline, the other methods, and the A/Bs last. A step
# costs about 5.7 s per million tokens (H200): lines of 2M and more take one step, no warm-up, no
# breakdown step.
LONG="--steps 1 --no_breakdown"
BART_PLAN="--tokens 16384,32768,131072 --methods hf_ds_gc,cached
--tokens 524288 --methods hf_ds_gc,cached --cross_attention_block $BLOCK --warmup 1 --steps 3 --no_breakdown
--tokens 2097152 --methods cached --cross_attention_block $BLOCK --warmup 0 $LONG --memory_trace
--tokens 4194304 --methods cached --cross_attention_block $BLOCK --warmup 0 $LONG --memory_trace
--tokens 4194304 --methods cached --cross_attention_block $BLOCK --offload --warmup 0 $LONG
--tokens 16777216 --methods cached --cross_attention_block $BLOCK --offload --warmup 0 $LONG --point_timeout 600
--tokens 1048576 --methods hf_ds_gc,cached,full_gc --warmup 1
--tokens 262144 --methods full,full_gc
--tokens 65536 --methods cached --cross_attention_block $BLOCK
--tokens 65536 --methods cached --keep_graphs_gib 40
--tokens 65536 --methods hf_ds_gc,cached --memory_efficient_linear
--tokens 262144 --methods cached --group_tokens 65536 --steps 3 --no_breakdown
--tokens 8388608 --methods cached --cross_attention_block $BLOCK --warmup 0 $LONG --point_timeout 600"
# LongT5-tglobal-large ([t5-speed]: >= 5x hf_ds_gc; 1.98x at 16K with streaming cross-attention on
# 2026-11-28, 2.12x at 64K without it earlier). 64K both ways with streaming first, then the 4M
# target, then the A/Bs. At 16K the encoder's flex attention (T5 bias score_mod) was most of the
# step (its forward kernel 392 ms for 72 calls, ~5 TFLOP/s); the flex score_mod now reads its bias
# tables heads-first (coalesced), so 16K profiled comes first: the kernel's time against that, and
# the ratio. local_sdpa was as fast with 1.8x the memory.
LONGT5_PLAN="--tokens 16384 --methods hf_ds_gc,cached --cross_attention_block $BLOCK --profile
--tokens 65536 --methods cached --cross_attention_block $BLOCK --warmup 1 --steps 1
--tokens 65536 --methods hf_ds_gc --cross_attention_block $BLOCK --warmup 1 --steps 1 --no_breakdown
--tokens 4194304 --methods cached --cross_attention_block $BLOCK --warmup 0 $LONG --point_timeout 600
--tokens 262144 --methods cached --cross_attention_block $BLOCK --warmup 1
--tokens 16384 --methods cached --cross_attention_block $BLOCK --keep_graphs_gib 40 --no_breakdown
--tokens 16384 --methods cached --cross_attention_block $BLOCK --zero3_decoder_hooks --no_breakdown
--tokens 32768 --methods hf_ds_gc,cached --cross_attention_block $BLOCK"
case "$MODEL" in
    long-t5*) PLAN=${PLAN:-$LONGT5_PLAN}; SWEEP_ARGS=${SWEEP_ARGS-"--fast_t5_attention"} ;;
    *) PLAN=${PLAN:-$BART_PLAN} ;;
esac
while IFS= read -r line; do
    # shellcheck disable=SC2086  # each line is word-split into arguments on purpose
    line=${line//\$BLOCK/$BLOCK}  # a PLAN given in single quotes may name $BLOCK and $LONG too
    line=${line//\$LONG/$LONG}
    if [ -n "${PLAIN:-}" ] && [[ $line == *--cross_attention_block* ]]; then line="$line --plain_cross_attention"; fi
    if [ -n "${BLOCKED_T5:-}" ] && [[ "$line ${SWEEP_ARGS:-}" == *--fast_t5_attention* ]] && [[ $line != *--local_sdpa_t5_attention* ]]; then
        line="$line --blocked_t5_attention"  # flex failed its check; the SDPA lines use no flex in the encoder
    fi
    if [ -n "${PRINT_PLAN:-}" ]; then echo "plan: $line"; continue; fi  # PRINT_PLAN=1: list the lines, run none
    [ -n "$line" ] && sweep $line </dev/null  # the plan's remaining lines are this loop's stdin
done <<< "$PLAN"
[ -n "${PRINT_PLAN:-}" ] && exit 0
[ -f "$WORK/table.md" ] && cat "$WORK/table.md"
