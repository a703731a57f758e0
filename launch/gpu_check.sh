#!/usr/bin/env bash
# One-GPU check, under 8 minutes on one H100 (each part has its own timeout; budget in brackets):
#   1. pytest -m gpu                                   (bf16 refiner step finite, SDPA path used)       [90 s]
#   2. DALI mixed (GPU) decoding of multi-crop views, only where nvidia.dali imports                     [60 s]
#   3. bf16 benchmark of MAE ViT-L/16 (configs/mae_l16.yaml), engine single, --batch auto               [150 s]
#   4. bf16 benchmark of MAE ViT-2B/14 (configs/mae_2b14.yaml: 6 frozen blocks, checkpointing),
#      engine fsdp2 via torchrun --nproc_per_node 1, --batch auto                                       [170 s]
# Writes everything under $OUT (./gpu_results when unset): gpu_results.md (markdown rows), gpu_results.jsonl,
# one log per part and summary.txt. No deepspeed needed (engines single / fsdp2); no weights (random init:
# throughput does not depend on them); no data (synthetic crops; the DALI part makes its own tiny shards).
#
#   bash launch/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY=.venv/bin/python
fi
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
start=$(date +%s)

note "gpu_check $(date -u +%FT%TZ) python=$PY"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("timm", "omegaconf", "deepspeed", "nvidia.dali", "webdataset"):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "absent:", type(e).__name__)
EOF

# 1. GPU-marked tests
timeout 90 "$PY" -m pytest -m gpu tests -q -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
note "pytest -m gpu: rc=$? ($(tail -n 1 "$OUT/pytest_gpu.log"))"

# 2. DALI mixed decoding, only if DALI imports
if "$PY" -c "import nvidia.dali" 2>/dev/null; then
    timeout 60 "$PY" - > "$OUT/dali_gpu.log" 2>&1 <<'EOF'
import sys, tempfile, time
sys.path.insert(0, ".")
import torch
from scale_refiner.data import shards as S
from scale_refiner.data.dali_pipeline import DaliMultiCropLoader
out = tempfile.mkdtemp()
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
    note "DALI mixed decoding: rc=$? ($(tail -n 1 "$OUT/dali_gpu.log"))"
else
    note "DALI mixed decoding: skipped (nvidia.dali does not import here)"
fi

# 3. ViT-L/16, bf16, engine single, auto batch
timeout 150 "$PY" launch/benchmark.py --config configs/mae_l16.yaml --batch auto --max-batch 512 \
    --steps 8 --warmup 3 --out "$OUT/gpu_results.md" engine.kind=single engine.precision=bf16 \
    > "$OUT/bench_mae_l16.log" 2>&1
note "benchmark mae_l16 (single, bf16, auto batch): rc=$?"
grep -E "^\| mae_l16|GPU-hours|auto" "$OUT/bench_mae_l16.log" | tee -a "$SUMMARY"

# 4. ViT-2B/14, bf16, FSDP2 on one rank (deepspeed may be absent), auto batch
timeout 170 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 launch/benchmark.py \
    --config configs/mae_2b14.yaml --batch auto --max-batch 128 --steps 5 --warmup 2 \
    --out "$OUT/gpu_results.md" engine.kind=fsdp2 engine.precision=bf16 > "$OUT/bench_mae_2b14.log" 2>&1
note "benchmark mae_2b14 (fsdp2 x1, bf16, auto batch): rc=$?"
grep -E "^\| mae_2b14|GPU-hours|auto" "$OUT/bench_mae_2b14.log" | tee -a "$SUMMARY"

note "total $(( $(date +%s) - start )) s; results: $OUT/gpu_results.md, $OUT/gpu_results.jsonl"
