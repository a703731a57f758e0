#!/usr/bin/env bash
# One-GPU check, under 9 minutes on one H100 / H200. Each part has its own timeout (budget in brackets), and
# every part is also cut to what is left of the whole run's budget (GPU_CHECK_BUDGET_S, default 520 s):
#   0. preflight   install what is missing from wheelhouse/ (when present) into $SITE (default /tmp/site),
#                  then launch/gpu_preflight.py: versions, CUDA device, bf16; what a missing package disables [60 s]
#   1. pytest      python3 -m pytest tests/test_gpu.py -m gpu: bf16 refiner step finite, SDPA path used,
#                  steady-state training step without a host sync (sync debug mode "error")              [100 s]
#   2. dali        DALI mixed (GPU) decoding of multi-crop views, only where nvidia.dali imports.             [45 s]
#                  Skipped on the lent GPU machine: DALI's CUDA-13 wheel (~190 MiB plus its nvimgcodec and
#                  nvcomp wheels) cannot travel there (64 MiB carried in all, no network).
#   3. vit_l16     bf16 benchmark of MAE ViT-L/16 (configs/mae_l16.yaml), engine single, --batch auto      [130 s]
#   4. vit_2b14    bf16 benchmark of MAE ViT-2B/14 (configs/mae_2b14.yaml: 6 frozen blocks, checkpointing),
#                  engine fsdp2 via torchrun --nproc_per_node 1, --batch auto                               [180 s]
# Results go to $OUT (./gpu_results when unset). Every part appends its line to summary.txt and its JSON object
# to results.jsonl the moment it ends (part, status ok / fail / timeout / skipped, rc, seconds, budget, detail,
# log), so a crash or a time-out keeps everything finished before it. Also there: preflight.json, one log per
# part, pytest_gpu.xml, benchmarks.md / benchmarks.jsonl (the benchmark rows). Without CUDA every part says
# "skipped: no CUDA" at once (pytest still runs: its GPU tests skip, which proves they collect).
# No deepspeed needed (engines single / fsdp2), no weights (random init: throughput does not depend on them),
# no data (synthetic crops; the DALI part makes its own tiny shards).
#
#   bash launch/gpu_check.sh       # PYTHON=... (default python3), OUT=..., SITE=..., GPU_CHECK_BUDGET_S=...
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this checkout (not pip-installed there)
OUT="${OUT:-./gpu_results}"
PY="${PYTHON:-python3}"
SITE="${SITE:-/tmp/site}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-520}"
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
batch = [line.split("per-rank batch ")[1].split()[0] for line in open(sys.argv[1]) if "per-rank batch" in line]
mem = ""
if r.get("resting_memory_gb") is not None and r.get("planner_peak_gib"):
    mem = (f" (resting {r['resting_memory_gb']:.1f}; planner {r['planner_peak_gib']:.1f}, state "
           f"{r['planner_state_gib']:.1f})")
print(f"batch {batch[-1] if batch else '?'}: {r['images_per_s_per_rank']:.1f} img/s/rank, "
      f"{r['model_tflops_per_rank']:.1f} TFLOP/s, MFU {mfu}, peak {r['peak_memory_gb']:.1f} GiB{mem}")
EOF
}

note "gpu_check $(date -u +%FT%TZ) python=$PY out=$OUT budget=${BUDGET_S}s"

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
    1) PART_RC=1; result preflight fail 1 "$PART_S" "$PART_T" "$(last_line "$OUT/preflight.log")" \
           "$OUT/preflight.log" ;;
    *) finish preflight "$OUT/preflight.log" "" ;;
esac
SKIP=""
if [ ! -f "$OUT/preflight.json" ]; then
    SKIP="skipped: the preflight wrote no result"
elif ! item_ok cuda; then
    SKIP="skipped: no CUDA"
elif ! grep -q '"core_ok": true' "$OUT/preflight.json"; then
    SKIP="skipped: the core is missing ($(last_line "$OUT/preflight.log"))"
fi

# 1. GPU tests (they skip without CUDA; run anyway: collecting them is a check of its own)
run_part pytest 100 "$OUT/pytest_gpu.log" "$PY" -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider \
    -rfEs --junitxml "$OUT/pytest_gpu.xml"
if [ -n "$SKIP" ] && [ "${PART_RC:-x}" = 0 ]; then
    result pytest skipped 0 "$PART_S" "$PART_T" "$SKIP (pytest: $(last_line "$OUT/pytest_gpu.log"))" \
        "$OUT/pytest_gpu.log"
elif [ "${PART_RC:-x}" = 0 ] && last_line "$OUT/pytest_gpu.log" | grep -q skipped; then  # CUDA, yet skipped
    result pytest fail 0 "$PART_S" "$PART_T" "GPU tests skipped with CUDA present: $(last_line \
        "$OUT/pytest_gpu.log")" "$OUT/pytest_gpu.log"
else
    finish pytest "$OUT/pytest_gpu.log" "$(last_line "$OUT/pytest_gpu.log")"
fi

# 2. DALI mixed decoding, only where DALI imports
DALI_NOTE="nvidia.dali does not import here. On the lent GPU machine this part is always skipped: DALI's \
CUDA-13 wheel (nvidia-dali-cuda130 2.4.0, ~190 MiB, plus its nvimgcodec / nvcomp wheels) cannot travel \
there (64 MiB carried in all, no network). Elsewhere: pip install nvidia-dali-cuda130==2.4.0"
if [ -n "$SKIP" ]; then
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

# 3. ViT-L/16, bf16, engine single, auto batch
if [ -n "$SKIP" ]; then
    result vit_l16 skipped "" 0 130 "$SKIP" ""
else
    run_part vit_l16 130 "$OUT/bench_mae_l16.log" "$PY" launch/benchmark.py --config configs/mae_l16.yaml \
        --batch auto --max-batch 512 --steps 8 --warmup 3 --out "$OUT/benchmarks.md" \
        engine.kind=single engine.precision=bf16
    finish vit_l16 "$OUT/bench_mae_l16.log" "$(bench_detail "$OUT/bench_mae_l16.log")"
fi

# 4. ViT-2B/14, bf16, FSDP2 on one rank (deepspeed may be absent), auto batch
if [ -n "$SKIP" ]; then
    result vit_2b14 skipped "" 0 180 "$SKIP" ""
else
    run_part vit_2b14 180 "$OUT/bench_mae_2b14.log" "$PY" -m torch.distributed.run --standalone \
        --nproc_per_node 1 launch/benchmark.py --config configs/mae_2b14.yaml --batch auto --max-batch 128 \
        --steps 5 --warmup 2 --out "$OUT/benchmarks.md" engine.kind=fsdp2 engine.precision=bf16
    finish vit_2b14 "$OUT/bench_mae_2b14.log" "$(bench_detail "$OUT/bench_mae_2b14.log")"
fi

total=$(( $(date +%s) - start ))
failed=$(grep -c '"status": "\(fail\|timeout\)"' "$RESULTS")
result total "$([ "$failed" = 0 ] && echo ok || echo fail)" "" "$total" "$BUDGET_S" \
    "$failed part(s) failed or timed out; results: $SUMMARY, $RESULTS" ""
[ "$failed" = 0 ]
