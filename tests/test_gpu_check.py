"""launch/gpu_check.sh, the GPU matrix, run here the way a lent GPU runs it: its smoke mode (GPU_CHECK_SMOKE=1)
launches every selected part's command as on the GPU, on a tiny ViT for a step or two, so a wrong flag, key or
launcher line fails here and not in the few minutes a GPU is lent. Checked: each part's result line is written,
in the documented order, every selected part passes, and the benchmark rows carry what the planner's calibration
and docs/gpu.md read (engine, checkpointing, compile, the untimed and the region-timed step times)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["preflight", "pytest", "zero3_2b14", "fsdp2_2b14", "kernels", "l16_every", "l16_selective", "l16_off",
         "2b14_selective", "l16_compiled", "2b14_compiled", "fp8_l16", "dali", "calibrate", "total"]
SMOKED = ["pytest", "zero3_2b14", "kernels", "l16_selective", "2b14_selective", "fp8_l16", "calibrate"]


def test_gpu_check_smoke_runs_every_selected_part(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, GPU_CHECK_SMOKE="1",
               GPU_CHECK_PARTS=" ".join(SMOKED), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "launch/gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)
    results = [json.loads(line) for line in (tmp_path / "out/results.jsonl").read_text().splitlines()]
    parts = [r["part"] for r in results]
    assert parts == [p for p in ORDER if p in ["preflight", *SMOKED, "total"]], parts
    status = {r["part"]: (r["status"], r["detail"]) for r in results}
    assert proc.returncode == 0, (status, proc.stdout[-3000:], proc.stderr[-3000:])
    for part in ("zero3_2b14", "l16_selective", "2b14_selective"):
        assert status[part][0] == "ok" and status[part][1].startswith("batch "), status[part]
    # the CPU has no FP8: the part is skipped with the reason, never run
    assert status["fp8_l16"][0] == "skipped" and "FP8" in status["fp8_l16"][1], status["fp8_l16"]
    rows = [json.loads(line) for line in (tmp_path / "out/benchmarks.jsonl").read_text().splitlines()]
    assert [(r["config"], r["engine"], str(r["checkpointing"])) for r in rows] == [
        ("mae_2b14", "deepspeed-zero3", "True"), ("mae_l16", "single", "selective"),
        ("mae_2b14", "fsdp2", "selective")]
    for r in rows:
        assert r["dtype"] == "bfloat16" and r["breakdown_steps"] == 1 and r["compile"] is False
        assert r["step_time_s"] > 0 and r["breakdown_step_time_s"] > 0 and r["optimizer_impl"] == "auto"
    kernels = [json.loads(line) for line in (tmp_path / "out/kernels.jsonl").read_text().splitlines()]
    assert len(kernels) == 8
