#!/usr/bin/env bash
# The GPU matrix: one prepared run on one H100 / H200, at most 8 minutes (GPU_CHECK_BUDGET_S, default 480 s).
# Parts run in order of value, so a run cut short by its budget loses the least; each has its own time-out (in
# brackets) and is also cut to what is left of the whole budget:
#    0. preflight     install what is missing from wheelhouse/ (when present) into $SITE (default /tmp/site), then
#                     launch/gpu_preflight.py: versions, CUDA, bf16, FP8; what a missing package disables     [60 s]
#    1. pytest        the GPU tests (-m gpu): tests/test_gpu*.py: a bf16 step is finite, SDPA's fused path, no host
#                     sync in a steady-state step (sync debug mode), ZeRO-3 on one GPU against the single engine
#                     behind a frozen prefix with non-reentrant checkpointing, FP8 where the card has it       [180 s]
#    2. zero3_2b14    ViT-2B/14 (configs/mae_2b14.yaml: 6 frozen blocks, every trained block checkpointed) on
#                     DeepSpeed ZeRO-3, 1 rank, batch 128: DeepSpeed's first steps on a GPU (needs deepspeed)   [100 s]
#    3. fsdp2_2b14    the same on FSDP2, beside it (the H200 baseline: 39.7 % MFU with the foreach AdamW)       [80 s]
#    4. kernels       launch/bench_kernels.py: the card's own bf16 rate on the recipes' products and attention  [40 s]
#    5. l16_every / l16_selective / l16_off: ViT-L/16 (configs/mae_l16.yaml) single engine, checkpointing of
#                     every trained block / selective / off, each at the largest batch that fits (--batch auto) [60 s each]
#    6. 2b14_selective  ViT-2B/14 FSDP2, selective checkpointing, --batch auto                                 [90 s]
#    7. l16_compiled / 2b14_compiled: per-block torch.compile with selective checkpointing, at the batch the eager
#                     row of the same setting found                                                       [120 / 150 s]
#    8. fp8_l16       model.float8 (torchao, with compile) where the card and torchao have FP8, beside 7     [120 s]
#    9. dali          DALI mixed (GPU) decoding of multi-crop views, only where nvidia.dali imports            [45 s]
#   10. calibrate     launch/plan.py --calibrate on this run's rows: the planner's step time against the measured
#                     one, before and after fitting its efficiency (CPU only)                                  [30 s]
# Every benchmark times its throughput window with no region timer in it (the breakdown comes from one more step
# timed region by region) and steps with the fused AdamW (engine.optimizer_impl=auto on a GPU).
# Results go to $OUT (./gpu_results when unset). Every part appends its line to summary.txt and its JSON object
# to results.jsonl the moment it ends (part, status ok / fail / timeout / skipped, rc, seconds, budget, detail,
# log), so a crash or a time-out keeps everything finished before it. Also there: preflight.json, one log per
# part, pytest_gpu.xml, benchmarks.md / benchmarks.jsonl (one row per benchmark), kernels.jsonl,
# efficiency.json (the calibration). Without CUDA every part says "skipped: no CUDA" at once (pytest still runs:
# its GPU tests skip, which proves they collect).
# No weights (random init: throughput does not depend on them), no data (synthetic crops; the DALI part makes
# its own tiny shards).
#
#   bash launch/gpu_check.sh       # PYTHON=... (default python3), OUT=..., SITE=..., GPU_CHECK_BUDGET_S=...
#   GPU_CHECK_PARTS="pytest zero3_2b14" bash launch/gpu_check.sh    # only these parts (preflight always runs)
#   GPU_CHECK_SMOKE=1 bash launch/gpu_check.sh     # on a CPU: every command as the GPU runs it, on a tiny ViT and
#                                                  # 1-2 steps (tests/test_gpu_check.py: no typo costs a GPU run)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this checkout (not pip-installed there)
OUT="${OUT:-./gpu_results}"
PY="${PYTHON:-python3}"
SITE="${SITE:-/tmp/site}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-$([ "${GPU_CHECK_SMOKE:-0}" = 1 ] && echo 3600 || echo 480)}"
PARTS="${GPU_CHECK_PARTS:-}"
SMOKE="${GPU_CHECK_SMOKE:-0}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
RESULTS="$OUT/results.jsonl"
: > "$SUMMARY"
: > "$RESULTS"
rm -f "$OUT/benchmarks.md" "$OUT/benchmarks.jsonl"
start=$(date +%s)

note() { echo "$*" | tee -a "$SUMMARY"; }
json_str() {  # a JSON string literal of $1
    local s
    s=$(printf '%s' "$1" | tr -d '\000-\010\013\014\016-\037')
    s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/\\n}; s=${s//$'\t'/\\t}; s=${s//$'\r'/}
    printf '"%s"' "$s"
}
# result PART STATUS RC SECONDS BUDGET DETAIL LOG: one summary line and one JSON line, written now
result() {
    note "$(printf '%-10s %-8s %4ss  %s' "$1" "$2" "$4" "$6")"
    printf '{"part": %s, "status": %s, "rc": %s, "seconds": %s, "budget_s": %s, "detail": %s, "log": %s}\n' \
        "$(json_str "$1")" "$(json_str "$2")" "${3:-null}" "$4" "${5:-null}" "$(json_str "$6")" \
        "$(json_str "$7")" >> "$RESULTS"
}
last_line() { grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | cut -c1-400; }
why() {  # the last exception line of a log (a Python traceback's last line may be a hint), else its last line
    local line
    line=$(grep -E '^([A-Za-z_][A-Za-z0-9_]*\.)*[A-Za-z_][A-Za-z0-9_]*(Error|Exception|Interrupt)(: |$)' "$1" \
        2>/dev/null | tail -n 1 | cut -c1-400)
    [ -n "$line" ] && echo "$line" || last_line "$1"
}
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }

# run_part PART BUDGET LOG CMD...: CMD under `timeout` (the smaller of BUDGET and what is left of the run's
# budget; it signals CMD's whole process group, torchrun's workers included). Sets PART_RC, PART_S, PART_T.
run_part() {
    local part=$1 budget=$2 log=$3
    shift 3
    PART_T=$budget
    [ "$SMOKE" = 1 ] && PART_T=$(( budget * 4 ))  # a shared 2-core CPU, not a GPU
    local remaining
    remaining=$(( $(left) - 5 ))
    [ "$remaining" -lt "$PART_T" ] && PART_T=$remaining
    if [ "$PART_T" -lt 10 ]; then
        PART_RC=""; PART_S=0
        return 1
    fi
    local t0
    t0=$(date +%s)
    timeout -k 5 "$PART_T" "$@" > "$log" 2>&1
    PART_RC=$?
    PART_S=$(( $(date +%s) - t0 ))
    return 0
}
# finish PART LOG DETAIL: the result line of a part run by run_part
finish() {
    local part=$1 log=$2 detail=$3 status=ok
    if [ -z "${PART_RC}" ]; then
        result "$part" skipped "" 0 "" "skipped: the run's ${BUDGET_S} s budget is spent" ""
        return
    fi
    case "$PART_RC" in
        0) status=ok ;;
        124|137) status=timeout; detail="timed out after ${PART_T} s; last: $(last_line "$log")" ;;
        *) status=fail; detail="rc=${PART_RC}: $( [ "$part" = pytest ] && last_line "$log" || why "$log")" ;;
    esac
    result "$part" "$status" "$PART_RC" "$PART_S" "$PART_T" "$detail" "$log"
}
item_ok() {  # item_ok NAME: the preflight found NAME working
    "$PY" -c "import json, sys; d = json.load(open(sys.argv[1]))
sys.exit(0 if any(i['name'] == sys.argv[2] and i['ok'] for i in d['items']) else 1)" "$OUT/preflight.json" "$1" \
        2>/dev/null
}
bench_detail() {  # the benchmark's closing JSON line, in words
    "$PY" - "$1" <<'EOF' 2>/dev/null || last_line "$1"
import json, sys
rows = [line for line in open(sys.argv[1]) if line.startswith("{")]
r = json.loads(rows[-1])
mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
mem = ""
if r.get("resting_memory_gb") is not None and r.get("planner_peak_gib"):
    mem = (f" (resting {r['resting_memory_gb']:.1f}; planner {r['planner_peak_gib']:.1f}, state "
           f"{r['planner_state_gib']:.1f})")
timed = ""
if r.get("breakdown_step_time_s"):
    timed = f"; step {1000 * r['step_time_s']:.0f} ms, {1000 * r['breakdown_step_time_s']:.0f} ms with region timers"
print(f"batch {r['per_rank_batch']}: {r['images_per_s_per_rank']:.1f} img/s/rank, "
      f"{r['model_tflops_per_rank']:.1f} TFLOP/s, MFU {mfu}, peak {r['peak_memory_gb']:.1f} GiB{mem}{timed}")
EOF
}

wanted() {  # wanted PART: the part is in GPU_CHECK_PARTS (or that is empty)
    [ -z "$PARTS" ] && return 0
    case " $PARTS " in *" $1 "*) return 0 ;; esac
    return 1
}
batch_of() {  # batch_of CONFIG CHECKPOINTING: the per-rank batch of this run's last eager row of that setting
    "$PY" - "$OUT/benchmarks.jsonl" "$1" "$2" <<'EOF' 2>/dev/null
import json, sys
path, config, ckpt = sys.argv[1:]
rows = [json.loads(line) for line in open(path) if line.strip()]
rows = [r for r in rows if r.get("config") == config and str(r.get("checkpointing")).lower() == ckpt.lower()
        and not r.get("compile")]
print(rows[-1]["per_rank_batch"] if rows else "")
EOF
}
BENCH_ARGS=(--steps 5 --warmup 2 --breakdown-steps 1 --out "$OUT/benchmarks.md" engine.precision=bf16)
SMOKE_OVERRIDES=()  # appended after each part's own overrides, so they win
KERNEL_ARGS=()
if [ "$SMOKE" = 1 ]; then
    BENCH_ARGS=(--steps 1 --warmup 1 --breakdown-steps 1 --no-cpu-peak --mem-budget-gb 4 --out "$OUT/benchmarks.md"
                engine.precision=bf16)
    SMOKE_OVERRIDES=(model.name=vit_test_patch4 model.img_size=32 model.freeze_blocks=1 "heads.blocks=[1,2]"
                     heads.proj_hidden_dim=32 heads.pred_hidden_dim=32 heads.proj_out_dim=16 queue.size=64
                     augment.global_size=32 augment.local_size=16 augment.num_local=2)
    KERNEL_ARGS=(--config configs/demo.yaml --samples 1 --repeats 1 --rounds 1)
fi
# bench PART BUDGET LOG RANKS(0: no launcher) CONFIG BATCH OVERRIDES...: one benchmark row, its result line at
# once. BATCH: N, or auto:CAP (the largest power of two up to CAP that fits). In the smoke run: 2, or auto up to 4.
bench() {
    local part=$1 budget=$2 log=$3 ranks=$4 config=$5 batch=$6
    shift 6
    local sizes=(--batch "$batch")
    case "$batch" in auto:*) sizes=(--batch auto --max-batch "${batch#auto:}") ;; esac
    if [ "$SMOKE" = 1 ]; then
        case "$batch" in auto:*) sizes=(--batch auto --max-batch 4) ;; *) sizes=(--batch 2) ;; esac
    fi
    if ! wanted "$part"; then return; fi
    if [ -n "$SKIP" ]; then result "$part" skipped "" 0 "$budget" "$SKIP" ""; return; fi
    local launch=("$PY")
    [ "$ranks" -gt 0 ] && launch+=(-m torch.distributed.run --standalone --nproc_per_node "$ranks")
    if run_part "$part" "$budget" "$log" "${launch[@]}" launch/benchmark.py --config "$config" "${sizes[@]}" \
        "${BENCH_ARGS[@]}" "$@" "${SMOKE_OVERRIDES[@]}"; then
        finish "$part" "$log" "$(bench_detail "$log")"
    else
        finish "$part" "$log" ""
    fi
}
skip_part() {  # skip_part PART BUDGET WHY
    if wanted "$1"; then result "$1" skipped "" 0 "$2" "$3" ""; fi
}

note "gpu_check $(date -u +%FT%TZ) python=$PY out=$OUT budget=${BUDGET_S}s${PARTS:+ parts: $PARTS}"

# 0. preflight (and the offline install from wheelhouse/)
PRE=(launch/gpu_preflight.py --json "$OUT/preflight.json")
if [ -d wheelhouse ] && ls wheelhouse/*.whl > /dev/null 2>&1; then
    PRE+=(--wheelhouse wheelhouse --site "$SITE")
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"  # for the preflight's checks and every later part
fi
run_part preflight 60 "$OUT/preflight.log" "$PY" "${PRE[@]}"
cat "$OUT/preflight.log" >> "$SUMMARY"
case "$PART_RC" in
    0) finish preflight "$OUT/preflight.log" "$(last_line "$OUT/preflight.log")" ;;
    1) if [ "$SMOKE" = 1 ]; then  # the smoke run is on a CPU by design
           result preflight ok 1 "$PART_S" "$PART_T" "smoke run, no GPU expected: $(last_line "$OUT/preflight.log")" \
               "$OUT/preflight.log"
       else
           result preflight fail 1 "$PART_S" "$PART_T" "$(last_line "$OUT/preflight.log")" "$OUT/preflight.log"
       fi ;;
    *) finish preflight "$OUT/preflight.log" "" ;;
esac
SKIP=""
if [ ! -f "$OUT/preflight.json" ]; then
    SKIP="skipped: the preflight wrote no result"
elif [ "$SMOKE" = 1 ]; then
    SKIP=""  # the commands run on the CPU, small
elif ! item_ok cuda; then
    SKIP="skipped: no CUDA"
elif ! grep -q '"core_ok": true' "$OUT/preflight.json"; then
    SKIP="skipped: the core is missing ($(last_line "$OUT/preflight.log"))"
fi

# 1. GPU tests (they skip without CUDA; run anyway: collecting them is a check of its own)
if wanted pytest; then
    run_part pytest 180 "$OUT/pytest_gpu.log" "$PY" -m pytest $(ls tests/test_gpu.py tests/test_gpu_*.py) -m gpu -q \
        -p no:cacheprovider -rfEs --junitxml "$OUT/pytest_gpu.xml"
    if [ -n "$SKIP" ] && [ "${PART_RC:-x}" = 0 ]; then
        result pytest skipped 0 "$PART_S" "$PART_T" "$SKIP (pytest: $(last_line "$OUT/pytest_gpu.log"))" \
            "$OUT/pytest_gpu.log"
    elif [ "${PART_RC:-x}" = 0 ] && last_line "$OUT/pytest_gpu.log" | grep -q skipped; then
        # CUDA present, yet tests skipped: a missing optional package (deepspeed, torchao) or no FP8 on this card
        result pytest ok 0 "$PART_S" "$PART_T" "$(last_line "$OUT/pytest_gpu.log"); skip reasons: $(grep '^SKIPPED' \
            "$OUT/pytest_gpu.log" | cut -d: -f3- | sort -u | tr '\n' ';')" "$OUT/pytest_gpu.log"
    else
        finish pytest "$OUT/pytest_gpu.log" "$(last_line "$OUT/pytest_gpu.log")"
    fi
fi

# 2-3. ViT-2B/14 on ZeRO-3 and on FSDP2, one rank each, the same batch
L16=configs/mae_l16.yaml
B2=configs/mae_2b14.yaml
if [ -z "$SKIP" ] && ! item_ok deepspeed; then
    skip_part zero3_2b14 100 "skipped: deepspeed does not import (carry wheelhouse/: scripts/build_wheelhouse.sh)"
else
    bench zero3_2b14 100 "$OUT/bench_zero3_2b14.log" 1 "$B2" 128 engine.kind=deepspeed \
        engine.zero_config=ds_configs/zero3.json
fi
bench fsdp2_2b14 80 "$OUT/bench_fsdp2_2b14.log" 1 "$B2" 128 engine.kind=fsdp2

# 4. the card's own rate on the recipes' shapes
if wanted kernels; then
    if [ -n "$SKIP" ]; then
        result kernels skipped "" 0 40 "$SKIP" ""
    elif run_part kernels 40 "$OUT/kernels.log" "$PY" launch/bench_kernels.py --json "$OUT/kernels.jsonl" \
            "${KERNEL_ARGS[@]}"; then
        finish kernels "$OUT/kernels.log" "$(grep -E 'mlp.fc1|attention fwd\+bwd \(global\)' "$OUT/kernels.log" \
            | awk -F'|' '{printf "%s%s%s TFLOP/s (%s);", $2, $3, $7, $8}')"
    else
        finish kernels "$OUT/kernels.log" ""
    fi
fi

# 5-6. checkpointing of every trained block, selective, off, each at the largest batch that fits
bench l16_every 60 "$OUT/bench_l16_every.log" 0 "$L16" auto:512 engine.kind=single \
    model.checkpointing=true
bench l16_selective 60 "$OUT/bench_l16_selective.log" 0 "$L16" auto:512 engine.kind=single \
    model.checkpointing=selective
bench l16_off 60 "$OUT/bench_l16_off.log" 0 "$L16" auto:512 engine.kind=single \
    model.checkpointing=false
bench 2b14_selective 90 "$OUT/bench_2b14_selective.log" 1 "$B2" auto:256 engine.kind=fsdp2 \
    model.checkpointing=selective

# 7. per-block compile with selective checkpointing, at the eager row's batch (a search would compile each probe)
b=$(batch_of mae_l16 selective)
bench l16_compiled 120 "$OUT/bench_l16_compiled.log" 0 "$L16" "${b:-256}" engine.kind=single \
    model.checkpointing=selective model.compile=true
b=$(batch_of mae_2b14 selective)
bench 2b14_compiled 150 "$OUT/bench_2b14_compiled.log" 1 "$B2" "${b:-128}" engine.kind=fsdp2 \
    model.checkpointing=selective model.compile=true

# 8. FP8 matmuls (torchao float8 training, compiled), beside the compiled bf16 row
if [ -z "$SKIP" ] && ! item_ok fp8; then
    skip_part fp8_l16 120 "skipped: no FP8 here ($(grep -i 'fp8' "$OUT/preflight.log" | head -n 1))"
else
    b=$(batch_of mae_l16 selective)
    bench fp8_l16 120 "$OUT/bench_fp8_l16.log" 0 "$L16" "${b:-256}" engine.kind=single \
        model.checkpointing=selective model.compile=true model.float8=true
fi

# 9. DALI mixed decoding, only where DALI imports
DALI_NOTE="nvidia.dali does not import here: its CUDA-13 wheel (nvidia-dali-cuda130 2.4.0, ~190 MiB, plus its \
nvimgcodec / nvcomp wheels) is not in wheelhouse/. Elsewhere: pip install nvidia-dali-cuda130==2.4.0"
if ! wanted dali; then
    :
elif [ -n "$SKIP" ]; then
    result dali skipped "" 0 45 "$SKIP" ""
elif ! item_ok nvidia.dali; then
    result dali skipped "" 0 45 "skipped: $DALI_NOTE" ""
elif ! item_ok sklearn; then
    result dali skipped "" 0 45 "skipped: scikit-learn is missing (the part's shards are sklearn's digits)" ""
else
    run_part dali 45 "$OUT/dali_gpu.log" "$PY" - <<'EOF'
import sys, tempfile, time
import torch
from scale_refiner.data import shards as S
from scale_refiner.data.dali_pipeline import DaliMultiCropLoader
with tempfile.TemporaryDirectory() as out:
    S.make_shards("digits", out, samples_per_shard=300, seed=0)
    sp = S.load_manifest(out).split("train")
    loader = DaliMultiCropLoader(sp.tars, sp.indexes, sp.num_samples, 64, global_size=32, local_size=16,
                                 num_local=4, device="gpu")
    t, n = time.perf_counter(), 0
    for batch in loader:
        g, l = batch["global"], batch["local"]
        assert g.is_cuda and l.is_cuda, (g.device, l.device)
        assert tuple(g.shape[:2]) == (2, 64) and tuple(l.shape[:2]) == (4, 64), (g.shape, l.shape)
        assert torch.isfinite(g).all() and torch.isfinite(l).all()
        n += 1
print(f"DALI mixed decoding OK: {n} batches of 64 on {g.device}, {n * 64 / (time.perf_counter() - t):.0f} img/s "
      f"(tiny 8x8 digits upscaled; not a throughput figure)")
EOF
    finish dali "$OUT/dali_gpu.log" "$(last_line "$OUT/dali_gpu.log")"
fi

# 10. the planner against this run's rows (CPU work: the bf16 GPU rows of benchmarks.jsonl)
if wanted calibrate; then
    if [ -s "$OUT/benchmarks.jsonl" ]; then
        run_part calibrate 30 "$OUT/calibrate.log" "$PY" launch/plan.py --calibrate "$OUT/benchmarks.jsonl" \
            --write "$OUT/efficiency.json"
        if [ "$SMOKE" = 1 ] && [ "${PART_RC:-x}" = 2 ] && grep -q "no GPU benchmark row" "$OUT/calibrate.log"; then
            result calibrate ok 2 "$PART_S" "$PART_T" "smoke run: $(last_line "$OUT/calibrate.log")" \
                "$OUT/calibrate.log"  # CPU rows are refused by design: the command ran and read them
        else
            finish calibrate "$OUT/calibrate.log" "$(last_line "$OUT/calibrate.log")"
        fi
    else
        result calibrate skipped "" 0 30 "skipped: no benchmark row to calibrate on" ""
    fi
fi

total=$(( $(date +%s) - start ))
failed=$(grep -c '"status": "\(fail\|timeout\)"' "$RESULTS")
result total "$([ "$failed" = 0 ] && echo ok || echo fail)" "" "$total" "$BUDGET_S" \
    "$failed part(s) failed or timed out; results: $SUMMARY, $RESULTS" ""
[ "$failed" = 0 ]
