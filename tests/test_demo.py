"""The embedded main job (launch/demo.py), shortened to a few steps: shards -> MAE -> refine -> evaluate, through
the default DALI shard pipeline, and its artefacts: metrics JSON, summary table, plots, TensorBoard logs, an
export that loads in timm, and a re-run that reuses every finished step."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = ["model.name=vit_test_patch4", "data.batch_size=32", "data.samples_per_epoch=64"]
MAE = SMALL_MODEL + ["mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2", "stages.mae.epochs=2"]
REFINE = SMALL_MODEL + ["heads.blocks=[1,2]", "heads.proj_hidden_dim=64", "heads.proj_out_dim=16",
                        "heads.pred_hidden_dim=64", "queue.size=256", "augment.num_local=2",
                        "stages.heads.epochs=1", "stages.refine.epochs=1", "stages.refine.warmup_epochs=0.5",
                        "run.log_every=1"]


def demo(out, extra=()):
    cmd = [sys.executable, "launch/demo.py", "--out", str(out), "--eval-limit", "300", "--kmeans-runs", "1",
           *(f"--mae={o}" for o in MAE), *(f"--refine={o}" for o in REFINE), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo(out)


def test_every_step_runs_and_the_table_is_printed(demo_run):
    out, proc = demo_run
    for step in ("== MAE pre-training", "== MIM-Refiner refined", "== evaluate MAE", "== evaluate refined (online)",
                 "== evaluate refined (EMA)"):
        assert step in proc.stdout
    assert "| encoder | k-NN@10 | k-NN@20 | k-means ACC | k-means NMI | per-block k-NN@20 peak |" in proc.stdout
    assert "TensorBoard: tensorboard --logdir" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["encoders"]) == {"MAE", "refined (online)", "refined (EMA)"}
    for metrics in summary["encoders"].values():
        assert 0.1 <= metrics["knn"]["20"] <= 1  # 10 classes: chance is 0.1; the bank is 300 images
        assert 0 <= metrics["kmeans"]["nmi"] <= 1
        assert len(metrics["blocks"]["knn20"]) == 4 + 1  # 4 blocks and the final norm


def test_artefacts_metrics_plots_logs(demo_run):
    out, _ = demo_run
    for name in ("mae", "refined_online", "refined_ema"):
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert metrics["n_test"] == 300 and {"knn", "blocks", "kmeans"} <= set(metrics)
        png = (out / "eval" / name / "knn_per_block.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((out / "mae" / "tensorboard").iterdir()) and any((out / "refined" / "tensorboard").iterdir())
    steps = [json.loads(line)["stage"] for line in (out / "refined" / "metrics.jsonl").read_text().splitlines()]
    assert steps == ["heads"] * 2 + ["refine"] * 2  # 64 samples / 32 a batch, 1 epoch each, logged every step


def test_refinement_starts_from_the_pretrained_mae(demo_run):
    out, _ = demo_run
    mae = torch.load(out / "mae" / "mae_pretrained.pth", weights_only=True)["model"]
    heads_end = torch.load(out / "refined" / "checkpoints" / "heads-end" / "model_state.pt", weights_only=True)
    # the heads stage trains the heads only: the encoder leaves it exactly as the MAE left it
    for key, value in heads_end.items():
        if key.startswith("encoder."):
            assert torch.equal(value, mae[key[len("encoder."):]]), key


def test_export_loads_in_timm(demo_run):
    import timm
    out, _ = demo_run
    export = out / "refined" / "export" / "ema.safetensors"
    kwargs = json.loads(export.with_suffix(".json").read_text())["timm_kwargs"]
    model = timm.create_model("vit_base_patch16_224", pretrained=True, pretrained_cfg_overlay={"file": str(export)},
                              **kwargs).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 64, 32)


def test_another_refinement_recipe_in_the_same_directory_is_refused(demo_run):
    out, _ = demo_run
    cmd = [sys.executable, "launch/demo.py", "--out", str(out), "--eval-limit", "300",
           *(f"--mae={o}" for o in MAE), *(f"--refine={o}" for o in REFINE + ["heads.objective=nnclr"])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0 and "holds a refinement of another recipe" in proc.stderr


def test_rerun_reuses_finished_steps(demo_run):
    out, _ = demo_run
    weights = out / "mae" / "mae_pretrained.pth"
    before = weights.stat().st_mtime_ns, (out / "refined" / "export" / "ema.safetensors").read_bytes()
    proc = demo(out)
    assert "already exist" in proc.stdout and "reused" in proc.stdout
    assert "resuming from" in proc.stderr and "stage refine on" not in proc.stderr  # nothing trained again
    assert weights.stat().st_mtime_ns == before[0]
    assert (out / "refined" / "export" / "ema.safetensors").read_bytes() == before[1]


def class_folders(root: Path, per_class: int) -> Path:
    """3 classes of 16 px colour PNGs that differ in shape, in class folders (no split of their own)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    masks = [(yy - 8) ** 2 + (xx - 8) ** 2 < 30, (abs(yy - 8) < 5) & (abs(xx - 8) < 5), (xx // 2) % 2 == 0]
    for c, mask in enumerate(masks):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
            img[mask] = rng.integers(150, 255, 3, dtype=np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    return root


def test_the_chain_runs_on_class_folders_and_evaluates_on_them(tmp_path):
    """--source folder:PATH: shards written into the run directory (a fifth of each class held out), then MAE,
    refinement and evaluation all on them; --shards on the written set gives every step the same data."""
    src = class_folders(tmp_path / "shapes", 30)
    out = tmp_path / "run"
    cmd = [sys.executable, "launch/demo.py", "--source", f"folder:{src}", "--out", str(out), "--eval-limit", "0",
           "--protocols", "knn", "--kmeans-runs", "1", *(f"--mae={o}" for o in MAE),
           *(f"--refine={o}" for o in REFINE)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "== data: 'shapes' (3 classes; train 72, test 18 images)" in proc.stdout
    for step in ("== MAE pre-training", "== MIM-Refiner refined", "== evaluate MAE", "== evaluate refined (EMA)"):
        assert step in proc.stdout
    for name in ("mae", "refined_online", "refined_ema"):
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert metrics["dataset"] == "shapes" and metrics["data"]["test"] == str(out / "shards")
        assert metrics["n_train"] == 72 and metrics["n_test"] == 18 and metrics["num_classes"] == 3
    for step in ("mae", "refined"):
        data = json.loads((out / step / "config.json").read_text())["data"]
        assert data["dataset"] == "shapes" and data["train_shards"] == str(out / "shards")
    assert json.loads((out / "summary.json").read_text())["dataset"] == "shapes"

    # --shards DIR: the same overrides and evaluation options as the run above, which wrote DIR (so a re-run with
    # them would reuse every step: the recipes match), checked in process rather than by a second chain
    spec = importlib.util.spec_from_file_location("demo_cli", ROOT / "launch/demo.py")
    demo_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_cli)
    data = demo_cli.prepare_data(demo_cli.parse_args(["--shards", str(out / "shards"), "--out", str(out)]))
    assert data["overrides"] == ["data.dataset=shapes", f"data.train_shards={out / 'shards'}"]
    assert data["evaluate"] == ["--train-shards", str(out / "shards")]
    assert json.loads((out / "refined" / "demo_recipe.json").read_text())["overrides"][:2] == data["overrides"]
    with pytest.raises(SystemExit, match=r"--shards .*nowhere.*manifest not found"):
        demo_cli.prepare_data(demo_cli.parse_args(["--shards", str(tmp_path / "nowhere"), "--out", str(out)]))
