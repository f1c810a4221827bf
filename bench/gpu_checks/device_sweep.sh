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
mkdir -p "$OUT"
MODEL=${MODEL:-bart-large}
RESULTS=$OUT/${MODEL%%-*}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-420} ))
RUN_ID=${RUN_ID:-$(date +%Y%m%d-%H%M%S)}  # every plan line one sweep run: their rows compare with each other's hf_ds_gc
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
[ -n "${PRINT_PLAN:-}" ] && { CHECKS=; BLOCK=${BLOCK:-32768}; }  # listing the plan runs nothing on the GPU
if [ -n "${CHECKS:-}" ]; then  # exactness of the CUDA kernel paths and of a CUDA engine step, before any timing
    for check in ${CHECK_SCRIPTS:-streaming_cross_attention_check t5_attention_check engine_check}; do  # CHECK_SCRIPTS: a subset
        timeout 240 python3 "bench/gpu_checks/$check.py" | tee -a "$OUT/checks.jsonl"
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
    timeout "$left" python3 bench/sweep.py --model "$MODEL" --dtype bf16 --zero_stage 3 --out "$RESULTS" --run_id "$RUN_ID" ${SWEEP_ARGS:-} \
        --warmup "${WARMUP:-2}" --steps 2 --point_timeout "${POINT_TIMEOUT:-240}" "$@" 2>&1 | grep -v "sweep points"
}
# PLAN: one sweep per line (its arguments; a line's --warmup/--steps win over the defaults), the
# open questions first (results/2026-11-27-nvidia-h200*/NOTES.md). 256K comes back profiled for
# both methods: the profiles so far counted each kernel twice, so how long the device idles in
# a `cached` step is still unknown. Then the two levers on `cached`'s extra launches at 256K
# (16 groups run twice; `hf_ds_gc` runs 256 windows as one batch): groups of 64K tokens (4x
# fewer encoder calls and fp32 gradient sums, about 3x the recompute memory), and a 40 GiB budget
# of encoder graphs kept from the forward (no recompute for the groups it holds); 64K (0.83x in
# the first session), profiled: `cached` was 0.18 s slower per step, and its breakdown (decoder
# backward 0.473 s, recompute 0.308 s, against 0.528 s for all of `hf_ds_gc`'s backward; the
# decoder backward was 0.447 s at 256K) cannot say which part is the excess; then with a budget
# that holds all 4 groups, and both methods with HF's hidden² reduce bucket (1M elements for
# BART-large and LongT5-large), which the sessions so far ran; the shipped configs now set 5e7
# (docs/engine.md: 387 ZeRO-3 flushes per step become 9; the host waits
# on the GPU whenever 3 are pending, stage3.py max_param_reduce_events = 2, and `cached` makes
# every encoder flush in its last window group, which the breakdown now clocks apart), and both
# with ZeRO-3's linear wrapper back on (--memory_efficient_linear: DeepSpeed's default, which the
# sessions so far ran; zero3.json now turns it off, docs/engine.md). Then the growth
# per token with streaming after the window plan stopped copying ids and masks and the documents
# stayed in host memory (2M and 4M; 6196 B/token before, 6144 the floor), each with one more step
# under the allocator's trace (--memory_trace: table.md lists what each source line adds per
# token between the two), the offloaded reach and growth (4M, 16M: never measured),
# 512K profiled (the 300K tok/s target), and the rest. A step costs about 5.7 s per million
# tokens (H200), so lines of 2M and more take one step with no warm-up (the peak memory is the
# figure there) and no breakdown step. 256K
# takes the median of 3 steps: two runs of one and two timed steps gave 0.94x and 1.01x; its
# first line keeps the breakdown step (about 2 s a method), which now clocks each window group.
LONG="--steps 1 --no_breakdown"
BART_PLAN="--tokens 262144 --methods hf_ds_gc,cached --steps 3 --profile
--tokens 262144 --methods cached --group_tokens 65536 --steps 3 --no_breakdown
--tokens 262144 --methods cached --keep_graphs_gib 40 --steps 3 --no_breakdown
--tokens 65536 --methods hf_ds_gc,cached --profile
--tokens 65536 --methods cached --keep_graphs_gib 40
--tokens 65536 --methods hf_ds_gc,cached --reduce_bucket_size 1048576
--tokens 65536 --methods hf_ds_gc,cached --memory_efficient_linear
--tokens 2097152 --methods cached --cross_attention_block $BLOCK --warmup 0 $LONG --memory_trace
--tokens 4194304 --methods cached --cross_attention_block $BLOCK --warmup 0 $LONG --memory_trace
--tokens 4194304 --methods cached --cross_attention_block $BLOCK --offload --warmup 0 $LONG
--tokens 16777216 --methods cached --cross_attention_block $BLOCK --offload --warmup 0 $LONG --point_timeout 600
--tokens 524288 --methods cached --cross_attention_block $BLOCK --warmup 1 --steps 1 --profile
--tokens 1048576 --methods hf_ds_gc,cached,full_gc --warmup 1
--tokens 262144 --methods full,full_gc
--tokens 8388608 --methods cached --cross_attention_block $BLOCK --warmup 0 $LONG --point_timeout 600"
# LongT5-tglobal-large ([t5-speed]): the speed ratio (>= 5x hf_ds_gc) needs the lengths where HF
# still fits: 16K and 64K (1.24x and 2.12x on the H200, with HF's cross-attention and decoder
# checkpointing). Now `cached` streams the decoder's cross-attention: at 16K 0.36 s of decoder
# forward and 0.70 s of decoder backward against 0.22 s of no-grad encode, where the decoder's
# device work is tens of ms (1024 targets): HF's T5 cross-attention adds an N-sized zero bias
# and an fp32 softmax per layer, and checkpointing runs it all twice under ZeRO-3's hooks
# (the decoder now kept gathered: keep_decoder_gathered). Both lengths profiled first, then each
# with the encoder's attention on SDPA over blocks instead of flex (--local_sdpa_t5_attention,
# cached_ds/local_sdpa.py; its CUDA exactness is a case of t5_attention_check.py); then 16K
# with its one window group's encoder graph kept from the forward (no recompute: 3 encoder passes
# where hf_ds_gc's checkpointing runs 4), without streaming (the H200 sessions' setting) and with
# ZeRO-3's decoder hooks back on (the A/B of keep_decoder_gathered), and both methods with HF's
# hidden² reduce bucket and with the linear wrapper (as in the BART plan); then the 4M target.
LONGT5_PLAN="--tokens 16384 --methods hf_ds_gc,cached --cross_attention_block $BLOCK --profile --no_breakdown
--tokens 65536 --methods hf_ds_gc,cached --cross_attention_block $BLOCK --warmup 1 --steps 1 --profile --no_breakdown
--tokens 16384 --methods cached --cross_attention_block $BLOCK --local_sdpa_t5_attention --profile --no_breakdown
--tokens 65536 --methods cached --cross_attention_block $BLOCK --local_sdpa_t5_attention --warmup 1 --steps 1 --profile --no_breakdown
--tokens 16384 --methods cached --cross_attention_block $BLOCK --keep_graphs_gib 40 --no_breakdown
--tokens 16384 --methods cached --no_breakdown
--tokens 16384 --methods cached --cross_attention_block $BLOCK --zero3_decoder_hooks --no_breakdown
--tokens 16384 --methods hf_ds_gc,cached --cross_attention_block $BLOCK --reduce_bucket_size 1048576 --no_breakdown
--tokens 16384 --methods hf_ds_gc,cached --cross_attention_block $BLOCK --memory_efficient_linear --no_breakdown
--tokens 4194304 --methods cached --cross_attention_block $BLOCK --warmup 0 $LONG --point_timeout 600
--tokens 262144 --methods cached --cross_attention_block $BLOCK --warmup 1
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
tar czf "$OUT/logs.tgz" -C "$RESULTS" logs && rm -rf "$RESULTS/logs"
cat "$RESULTS/table.md"
