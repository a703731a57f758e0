"""launch/bench_kernels.py: the block's products and attention at a recipe's shapes, FLOPs counted as the step's
MFU counts them (bench/flops.py), and the command end to end on the CPU."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from scale_refiner.bench.flops import vit_forward_flops
from scale_refiner.bench.kernels import block_shapes, crop_tokens, measure_recipe
from scale_refiner.config import load_config
from scale_refiner.models.vit import resolve_model_dims

ROOT = Path(__file__).resolve().parents[1]


def test_block_products_and_attention_add_up_to_the_step_flops_of_a_block():
    for config in ("configs/mae_l16.yaml", "configs/mae_2b14.yaml"):
        cfg = load_config(ROOT / config, [])
        dims = resolve_model_dims(cfg.model)
        n = crop_tokens(cfg.augment.global_size, dims["patch_size"])
        products = sum(2 * m * k * o for _, m, k, o in block_shapes(dims, n, samples=1))
        attention = 4 * n * n * dims["embed_dim"]  # measure_recipe's 4.B.h.S^2.d_head with B = 1
        assert products + attention == vit_forward_flops(cfg.augment.global_size, dims)["block"], config


def test_measured_kernels_cover_the_block_and_both_crops():
    cfg = load_config(ROOT / "configs/demo.yaml", [])
    dims = resolve_model_dims(cfg.model)
    results = measure_recipe("demo", dims, cfg.augment.global_size, cfg.augment.local_size, 2,
                             torch.device("cpu"), torch.float32, peak_tflops=None, repeats=1, rounds=1)
    kernels = [r.kernel for r in results]
    assert kernels == ["matmul qkv", "matmul attn.proj", "matmul mlp.fc1", "matmul mlp.fc2",
                       "attention fwd (global)", "attention fwd+bwd (global)", "attention fwd (local)",
                       "attention fwd+bwd (local)"]
    for r in results:
        assert r.seconds > 0 and r.tflops == r.flops / r.seconds / 1e12 and r.peak_fraction is None
    fwd, both = results[4], results[5]
    assert both.flops == 3 * fwd.flops  # forward + backward in model FLOPs


def test_bench_kernels_cli(tmp_path):
    out = tmp_path / "k.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "launch/bench_kernels.py"), "--config",
                           str(ROOT / "configs/demo.yaml"), "--samples", "1", "--repeats", "1", "--rounds", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| demo | matmul qkv |" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and {r["device_name"] for r in rows} == {"cpu"} and rows[0]["dtype"] == "float32"
    assert all(r["peak_fraction"] > 0 for r in rows)  # against the measured CPU matmul rate
