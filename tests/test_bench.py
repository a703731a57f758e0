"""The benchmark: analytic FLOPs against DeepSpeed's flops profiler, frozen blocks at 1x, the CLI end to end on
a tiny model (CPU, engine single, 2 steps). The GPU checks are in tests/test_gpu.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale_refiner.bench.flops import head_forward_flops, step_flops, vit_forward_flops
from scale_refiner.config import load_config
from scale_refiner.models.vit import VisionTransformer, resolve_model_dims

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(patch_size=4, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0)


def _profile(model, args):
    profiler = pytest.importorskip("deepspeed.profiling.flops_profiler")
    flops, macs, _ = profiler.get_model_profile(model, args=args, print_profile=False, detailed=False,
                                                warm_up=0, as_string=False)
    return flops, macs


@pytest.mark.parametrize("size", [32, 16])
def test_vit_forward_flops_match_deepspeed_profiler(size):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, **TINY).eval()
    batch = 3
    x = torch.randn(batch, 3, size, size)
    flops, macs = _profile(model, [[x]])
    analytic = batch * vit_forward_flops(size, TINY)["total"]
    # the profiler counts a multiply-add as 1 MAC and 2 FLOPs: compare FLOPs = 2 x MACs (matmuls only) ...
    assert abs(2 * macs - analytic) / analytic < 0.05, (2 * macs, analytic)
    # ... and its total FLOPs, which add norms, softmax, GELU and additions (a few % on a model this thin)
    assert abs(flops - analytic) / analytic < 0.05, (flops, analytic)


def test_head_flops_match_deepspeed_profiler():
    from scale_refiner.heads.id_head import IDHead
    head = IDHead(64, 128, 32, 256, norm="bn").eval()
    rows = 10
    _, macs = _profile(head, [torch.randn(rows, 64)])
    assert 2 * macs == rows * head_forward_flops(64, 128, 32, 256)


def test_paper_figures_from_design():
    cfg = load_config(ROOT / "configs/mae_2b14.yaml")
    dims = resolve_model_dims(cfg.model)
    assert abs(vit_forward_flops(224, dims)["total"] / 1e12 - 0.99) < 0.01
    assert abs(vit_forward_flops(98, dims)["total"] / 1e12 - 0.19) < 0.005
    assert abs(step_flops(cfg).encoder_forward / 1e12 - 3.87) < 0.01


def test_frozen_blocks_counted_once():
    # 2 global crops of 32 px and 4 local crops of 16 px (pinned: the demo recipe itself trains on global crops)
    base = load_config(ROOT / "configs/demo.yaml", ["model.freeze_blocks=0", "model.checkpointing=false",
                                                    "augment.num_local=4"])
    frozen = load_config(ROOT / "configs/demo.yaml", ["model.freeze_blocks=2", "model.checkpointing=true",
                                                      "augment.num_local=4"])
    dims = resolve_model_dims(base.model)
    a, b = step_flops(base), step_flops(frozen)
    expected = 0
    for size, count in ((32, 2), (16, 4)):
        f = vit_forward_flops(size, dims)
        expected += count * (2 * 2 * f["block"] + 2 * f["embed"])  # 3x -> 1x for 2 blocks and the embedding
    assert a.model - b.model == expected
    assert a.encoder_forward == b.encoder_forward and a.heads_forward == b.heads_forward
    # recomputation is reported apart, for the trainable blocks only
    assert b.recompute == sum(c * 4 * vit_forward_flops(s, dims)["block"] for s, c in ((32, 2), (16, 4)))
    assert a.recompute == 0
    # heads stage: the whole encoder frozen (1x), heads 3x
    h = step_flops(base, "heads")
    assert h.model == h.encoder_forward + 3 * h.heads_forward


def test_benchmark_cli_end_to_end(tmp_path):
    out = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "launch/benchmark.py"), "--config", str(ROOT / "configs/demo.yaml"),
           "--steps", "2", "--warmup", "1", "--batch", "8", "--out", str(out),
           "model.name=vit_test_patch4", "heads.blocks=[1,2]", "heads.proj_hidden_dim=64",
           "heads.pred_hidden_dim=64", "heads.proj_out_dim=32", "queue.size=64", "engine.kind=single",
           "augment.num_local=4", "stages.refine.epochs=3"]  # 6 crops an image, 3 refine epochs: pinned below
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = out.read_text().strip().splitlines()
    assert rows[0].startswith("| config |") and len(rows) == 3 and rows[2].startswith("| demo | single |")
    result = json.loads(out.with_suffix(".jsonl").read_text().splitlines()[-1])
    from scale_refiner.bench.runner import RESULT_KEYS
    assert set(RESULT_KEYS) <= set(result)
    assert result["steps"] == 2 and result["per_rank_batch"] == 8 and result["engine"] == "single"
    assert result["images_per_s_per_rank"] > 0 and result["model_tflops_per_rank"] > 0
    assert result["crops_per_s_per_rank"] == pytest.approx(6 * result["images_per_s_per_rank"])
    for key in ("h2d", "forward", "lookup", "backward", "step", "ema", "total"):
        assert key in result["breakdown_ms"]
    assert result["breakdown_ms"]["lookup"] > 0
    gh = result["gpu_hours"]
    assert set(gh) == {"heads", "refine", "total"} and gh["refine"]["source"] == "measured"
    assert gh["refine"]["gpu_hours"] == pytest.approx(3 * 1_281_167 / result["images_per_s_per_rank"] / 3600)
    # the planner's prediction for the row as it ran (8 samples in one micro-batch, fp32, no GPU allowances);
    # no resting counter on the CPU
    from scale_refiner.config import load_config
    from scale_refiner.plan.counts import model_counts
    from scale_refiner.plan.memory import predict_memory
    from scale_refiner.plan.settings import setting_of_config
    cfg = load_config(ROOT / "configs/demo.yaml", cmd[cmd.index("model.name=vit_test_patch4"):] + ["data.batch_size=8"])
    expected = predict_memory(cfg, model_counts(cfg, "refine"), setting_of_config(cfg, ROOT), 1, 8, 4, on_gpu=False)
    assert result["resting_memory_gb"] is None
    assert result["planner"]["peak_gib"] == pytest.approx(expected.peak_allocated / 2 ** 30)
    assert result["planner"]["state_gib"] == pytest.approx(sum(expected.state.values()) / 2 ** 30)
    assert "memory (single): the planner predicts" in proc.stdout


def test_benchmark_compare_in_one_process(tmp_path):
    """--compare builds each variant in turn in one (1-rank) process group and prints ratios."""
    out = tmp_path / "cmp.md"
    cmd = [sys.executable, str(ROOT / "launch/benchmark.py"), "--config", str(ROOT / "configs/demo.yaml"),
           "--steps", "1", "--warmup", "1", "--batch", "auto", "--max-batch", "2", "--out", str(out),
           "--compare", "norm,checkpointing", "--no-cpu-peak", "model.name=vit_test_patch4", "heads.blocks=[1]",
           "heads.proj_hidden_dim=32", "heads.pred_hidden_dim=32", "heads.proj_out_dim=16", "queue.size=64",
           "engine.kind=single", "augment.num_local=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--batch auto: per-rank batch 2" in proc.stdout
    # the search starts from the planner's prediction (capped at --max-batch) and reports both
    assert "the planner predicted 2 (search started at 2; found / predicted = 1.00)" in proc.stdout
    # the demo recipe's 128 on one rank, 2 at a time: 64 micro-batches of 2
    assert "runs as 64 micro-batch(es) of 2 per rank: data.micro_batch_size=2" in proc.stdout
    results = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["variant"] for r in results] == ["heads.norm=syncbn", "heads.norm=async", "heads.norm=bn",
                                               "checkpointing=every block", "checkpointing=first 2",
                                               "checkpointing=selective", "checkpointing=off"]
    assert [r["checkpointing"] for r in results[3:]] == [True, 2, "selective", False]  # 4 trained blocks
    assert all(r["mfu"] is None and r["per_rank_batch"] == 2 for r in results)
    assert "| norm | heads.norm=async |" in proc.stdout and "| 1.00 |" in proc.stdout
    # each row's prediction is its own variant's: checkpointing every block adds least, none the most
    adds = [r["planner"]["step_adds_gib"] for r in results[3:]]
    assert adds[0] < adds[1] < adds[3] and adds[2] < adds[3]


def test_memory_line_compares_a_gpu_row_with_the_planner():
    """The GPU row's words (only a GPU has the resting counter): measured peak and resting state against the
    planner's peak and state, as ratios; a row without a prediction says so."""
    from scale_refiner.cli.benchmark import memory_line
    row = {"variant": "", "engine": "fsdp2", "memory_kind": "cuda max_memory_allocated", "peak_memory_gb": 50.0,
           "resting_memory_gb": 20.0, "planner": {"peak_gib": 60.0, "state_gib": 25.0, "step_adds_gib": 35.0,
                                                  "peak_phase": "backward"}}
    line = memory_line(row)
    assert "peak 50.00 GiB measured (20.00 resting between steps, 30.00 added by a step)" in line
    assert "predicted / measured 1.20 for the peak, 1.25 for the state" in line
    assert memory_line({**row, "planner": None}).endswith("no planner prediction")


@pytest.mark.parametrize("breakdown_steps", [0, 2])
def test_throughput_window_runs_without_region_timers(monkeypatch, breakdown_steps):
    """With breakdown steps (the GPU default) the timed window's steps run with the timers off, so no region
    synchronises the device inside it, and the breakdown comes from steps timed after it; without (the CPU
    default, where timers cost nothing) one window gives both."""
    from scale_refiner.bench import runner
    from scale_refiner.config import load_config
    from scale_refiner.engine.distributed import DistContext
    windows = []
    original = runner.run_steps

    def recorded(engine, cfg, ctx, batch, steps, stage, timer, **kwargs):
        windows.append((steps, timer.enabled))
        return original(engine, cfg, ctx, batch, steps, stage, timer, **kwargs)
    monkeypatch.setattr(runner, "run_steps", recorded)
    cfg = load_config(ROOT / "configs/demo.yaml", ["model.name=vit_test_patch4", "heads.blocks=[1]",
                                                   "heads.proj_hidden_dim=32", "heads.pred_hidden_dim=32",
                                                   "heads.proj_out_dim=16", "queue.size=64", "engine.kind=single",
                                                   "augment.num_local=2"])
    opts = runner.BenchOptions(steps=3, warmup=1, breakdown_steps=breakdown_steps, measure_cpu_peak=False)
    result = runner.benchmark(cfg, DistContext(0, 1, 0, torch.device("cpu")), 4, opts)
    if breakdown_steps:
        assert windows == [(1, False), (3, False), (2, True)]
    else:
        assert windows == [(1, False), (3, True)]
    assert result["breakdown_steps"] == breakdown_steps
    b = result["breakdown_ms"]
    assert b["lookup"] > 0 and b["forward"] > b["lookup"]  # the breakdown's regions were timed either way
    assert b["total"] == pytest.approx(1000 * result["breakdown_step_time_s"])
    assert result["images_per_s_per_rank"] == pytest.approx(4 / result["step_time_s"])
    assert result["compile"] is False and result["optimizer_impl"] == "auto"
