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
    assert "== evaluate random init" in proc.stdout and "== raw pixels" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["encoders"]) == {"raw pixels", "random init", "MAE", "refined (online)", "refined (EMA)"}
    raw = summary["encoders"].pop("raw pixels")
    assert 0.1 <= raw["knn"]["20"] <= 1 and raw["blocks"] is None
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
    export = out / "refined" / "export" / "ema"
    model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()  # timm's hub layout
    from timm.data import resolve_data_config
    assert resolve_data_config({}, model=model)["input_size"] == (3, 32, 32)
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 64, 32)
    card = (export / "README.md").read_text()  # the demo refines with --eval-samples 0: no k-NN in the card
    assert "the EMA encoder of the run" in card and "| data set | fashion-mnist |" in card


def test_another_refinement_recipe_in_the_same_directory_is_refused(demo_run):
    out, _ = demo_run
    cmd = [sys.executable, "launch/demo.py", "--out", str(out), "--eval-limit", "300",
           *(f"--mae={o}" for o in MAE), *(f"--refine={o}" for o in REFINE + ["heads.objective=nnclr"])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0 and "holds a refinement of another recipe" in proc.stderr


def test_rerun_reuses_finished_steps(demo_run):
    out, _ = demo_run
    weights = out / "mae" / "mae_pretrained.pth"
    before = weights.stat().st_mtime_ns, (out / "refined" / "export" / "ema" / "model.safetensors").read_bytes()
    proc = demo(out)
    assert "already exist" in proc.stdout and "reused" in proc.stdout
    assert "resuming from" in proc.stderr and "stage refine on" not in proc.stderr  # nothing trained again
    assert weights.stat().st_mtime_ns == before[0]
    assert (out / "refined" / "export" / "ema" / "model.safetensors").read_bytes() == before[1]
    # every evaluation reused: the re-exported weights are the same bytes (keyed by content, not file time)
    evaluations = [line for line in proc.stdout.splitlines() if line.startswith("== evaluate ")]
    assert evaluations and all(": reused " in line for line in evaluations), evaluations


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


def load_demo():
    spec = importlib.util.spec_from_file_location("demo_cli", ROOT / "launch/demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_starts_from_the_shipped_mae_only_for_its_recipe(tmp_path):
    """The shipped MAE is adopted when the run would pre-train exactly its recipe; then launch/pretrain_mae.py
    reuses it (same recipe) instead of pre-training. Overrides, other data or --pretrain-mae pre-train."""
    demo_cli = load_demo()
    shipped = demo_cli.SHIPPED_MAE
    recipe = json.loads((shipped / "mae_pretrained.json").read_text())
    from scale_refiner.cli.pretrain_mae import existing_weights, recipe_of
    from scale_refiner.config import PretrainConfig, load_config
    cfg = load_config(ROOT / "configs/demo_mae.yaml", [], schema_class=PretrainConfig)
    assert recipe_of(cfg) == recipe  # configs/demo_mae.yaml is the recipe that made the file
    args = demo_cli.parse_args(["--out", str(tmp_path / "a")])
    assert demo_cli.adopt_shipped_mae(args, args.mae_dir)
    assert (args.mae_dir / "mae_pretrained.pth").read_bytes() == (shipped / "mae_pretrained.pth").read_bytes()
    assert existing_weights(args.mae_dir, cfg) is not None  # what makes pretrain_mae.py reuse it
    assert not demo_cli.adopt_shipped_mae(args, args.mae_dir)  # weights already there: kept as they are
    changed = demo_cli.parse_args(["--out", str(tmp_path / "b"), "--mae=stages.mae.epochs=1"])
    assert not demo_cli.adopt_shipped_mae(changed, changed.mae_dir) and not changed.mae_dir.exists()
    assert demo_cli.parse_args(["--validate"]).pretrain_mae  # validation re-creates it from the recipe
    # the file holds the demo encoder (and the recorded quality names it)
    weights = torch.load(shipped / "mae_pretrained.pth", weights_only=True)["model"]
    from scale_refiner.models.vit import build_vit
    encoder = build_vit(cfg.model)
    missing, _ = encoder.load_state_dict({k: v for k, v in weights.items() if not k.startswith(("decoder", "mask"))},
                                         strict=False)
    assert not missing and all(torch.isfinite(v).all() for v in weights.values())
    quality = json.loads((shipped / "eval_metrics.json").read_text())
    assert quality["model"]["name"] == cfg.model.name and quality["limit"] == 10000


def test_shipped_mae_evaluation_is_reused_only_for_its_weights_and_protocols(tmp_path):
    """The demo's MAE evaluation reuses weights/demo_mae/eval_metrics.json only for the shipped file byte for
    byte, on the embedded data, at the protocols, image count and restarts that made it; then evaluate_once
    takes it without running evaluate.py."""
    import shutil
    demo_cli = load_demo()
    shipped = demo_cli.SHIPPED_MAE
    weights = tmp_path / "mae" / "mae_pretrained.pth"
    weights.parent.mkdir()
    shutil.copyfile(shipped / "mae_pretrained.pth", weights)
    args = demo_cli.parse_args(["--out", str(tmp_path / "run")])
    source = ["--model", "vit_mini_patch4", "--weights", str(weights)]

    def command(where, protocols="knn,blocks,kmeans", limit=10000, extra=()):
        return ["launch/evaluate.py", *source, "--out", str(where), "--protocols", protocols, "--limit", str(limit),
                "--kmeans-runs", "3", *extra]
    where = tmp_path / "eval" / "mae"
    assert demo_cli.seed_shipped_mae_evaluation(args, where, command(where), source, "knn,blocks,kmeans")
    assert json.loads((where / "metrics.json").read_text()) == json.loads((shipped / "eval_metrics.json").read_text())
    assert demo_cli.reusable_evaluation(where, command(where), source)
    assert demo_cli.evaluate_once("MAE", where, command(where), source)["knn"]["20"] > 0.7  # no subprocess
    # anything else evaluates for real
    other = tmp_path / "other"
    assert not demo_cli.seed_shipped_mae_evaluation(args, other, command(other), source, "knn,blocks")
    few = demo_cli.parse_args(["--out", str(tmp_path / "run"), "--eval-limit", "500"])
    assert not demo_cli.seed_shipped_mae_evaluation(few, other, command(other, limit=500), source,
                                                    "knn,blocks,kmeans")
    assert not demo_cli.seed_shipped_mae_evaluation(args, other, command(other, extra=("--train-shards", "x")),
                                                    source, "knn,blocks,kmeans")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert not demo_cli.seed_shipped_mae_evaluation(args, other, command(other), source, "knn,blocks,kmeans")
    assert not other.exists()


def blocks_of(values):
    return {"labels": [f"block{i}" for i in range(len(values) - 1)] + ["final"], "knn20": values}


def test_validation_checks_measure_what_the_recipe_claims():
    """The checks on made-up results: an early per-block peak beyond one standard error, refinement above the
    peak, NNA against NNCLR, async against syncbn; and the same checks failing on results that do not show it."""
    demo_cli = load_demo()
    args = demo_cli.parse_args(["--validate", "--seeds", "0,1"])
    args.pretrain_mae = False  # no comparison with the shipped file here

    def ema(knn):
        return {"knn": {"20": knn}, "kmeans": {"nmi": 0.5}, "blocks": blocks_of([0.7, knn])}
    results = {"random init": {"knn": {"20": 0.60}}, "MAE": {"knn": {"20": 0.70},
                                                            "blocks": blocks_of([0.72, 0.75, 0.70, 0.70])}}
    for variant, knn in (("nna_bn", 0.78), ("nnclr_bn", 0.76), ("nna_syncbn", 0.77), ("nna_async", 0.775)):
        for seed in (0, 1):
            results[f"{variant} s{seed} (EMA)"] = ema(knn + 0.002 * seed)
    checks = {c["name"]: c for c in demo_cli.validation_checks(args, results)}
    assert all(c["passed"] for c in checks.values()), checks
    peak = checks["MAE per-block k-NN@20 peaks before the last block (by > 1 s.e.)"]
    assert abs(peak["value"] - 0.05) < 1e-9 and "at block1" in peak["detail"]
    assert abs(checks["MAE k-NN@20 above random init"]["value"] - 0.10) < 1e-9
    table = demo_cli.seed_table(args, results)
    assert "| nna_bn | EMA | 2 | 78.1 ± 0.1 | 50.0 ± 0.0 |" in table
    # a monotone MAE, refinement below its peak, NNCLR ahead, async 2 points behind: each check fails
    results["MAE"]["blocks"] = blocks_of([0.70, 0.72, 0.74, 0.80])
    results["random init"]["knn"]["20"] = 0.68
    for seed in (0, 1):
        results[f"nnclr_bn s{seed} (EMA)"] = ema(0.79)
        results[f"nna_async s{seed} (EMA)"] = ema(0.75)
    assert not any(c["passed"] for c in demo_cli.validation_checks(args, results))
    curves = demo_cli.per_block_curves(args, {k: v for k, v in results.items() if "blocks" in v})
    assert curves["nna_bn (EMA), 2 seeds"][1][-1] == pytest.approx(0.781) and "MAE" in curves


def test_digits_part_of_the_validation_checks_figure_3b_on_its_own_run(tmp_path):
    """--validate's digits part: the Figure 3b checks read the digits run's summary and take the standard error
    from the number of test images its MAE was evaluated on (360 here, not the Fashion-MNIST default)."""
    demo_cli = load_demo()
    mae_dir = tmp_path / "eval" / "mae"
    mae_dir.mkdir(parents=True)
    (mae_dir / "metrics.json").write_text(json.dumps({"n_test": 360}))
    summary = {"encoders": {"MAE": {"knn": {"20": 0.594}, "dir": str(mae_dir),
                                    "blocks": blocks_of([0.747, 0.70, 0.647, 0.594])},
                            "refined (EMA)": {"knn": {"20": 0.856}, "blocks": blocks_of([0.8, 0.85, 0.86, 0.856])}}}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    checks = demo_cli.digits_checks(path)
    assert [c["passed"] for c in checks] == [True, True] and all(c["name"].endswith("(digits)") for c in checks)
    se = (0.647 * 0.353 / 360) ** 0.5  # the last block's accuracy on 360 images
    assert checks[0]["target"] == f"> +{100 * se:.2f} points (1 s.e.)" and "at block0" in checks[0]["detail"]
    assert checks[1]["value"] == pytest.approx(0.856 - 0.747)
    # a drop smaller than one standard error on 360 images (2.5 points) is not the shape
    summary["encoders"]["MAE"]["blocks"] = blocks_of([0.66, 0.65, 0.647, 0.64])
    path.write_text(json.dumps(summary))
    assert [c["passed"] for c in demo_cli.digits_checks(path)] == [False, True]


def test_several_seeds_are_separate_runs_and_one_table(tmp_path):
    """--seeds 0,1: two refinements (their own directories, seeds and results), one MAE, the mean-and-spread table
    and one plot whose refined curves are the seeds' mean."""
    out = tmp_path / "seeds"
    proc = demo(out, ["--seeds", "0,1", "--no-references", "--protocols", "knn,blocks,kmeans"])
    for seed in (0, 1):
        assert f"== MIM-Refiner refined s{seed} (heads, then refine)" in proc.stdout
        config = json.loads((out / "refined" / f"s{seed}" / "config.json").read_text())
        assert config["run"]["seed"] == seed
    assert proc.stdout.count("== MAE pre-training\n") == 1
    a, b = (torch.load(out / "refined" / f"s{s}" / "checkpoints" / "refine-end" / "model_state.pt",
                       weights_only=True) for s in (0, 1))
    assert not torch.equal(a["encoder.blocks.3.mlp.fc1.weight"], b["encoder.blocks.3.mlp.fc1.weight"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and "refined s1 (EMA)" in summary["encoders"]
    assert "| variant | encoder | seeds | k-NN@20 | k-means NMI |" in proc.stdout
    assert "| refined | EMA | 2 |" in proc.stdout
    assert (out / "per_block_knn.svg").read_text().count("refined (EMA), 2 seeds") == 1


# ------------------------------------------------------------------------------------------------ the sweep
def load_sweep():
    spec = importlib.util.spec_from_file_location("sweep_cli", ROOT / "launch/sweep_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_cells_vary_one_factor_and_route_mae_keys():
    sweep = load_sweep()
    args = sweep.parse_args(["--base", "stages.refine.base_lr=2e-3", "--axis", "stages.refine.base_lr=1e-3,2e-3",
                             "--axis", "mae:mae.decoder_depth=2", "--cell", "queue.size=64 mae:mae.mask_ratio=0.5"])
    cells = sweep.build_cells(args)
    # the axis value equal to the base is the base cell, not a second run of it
    assert [c["name"] for c in cells] == ["base", "stages.refine.base_lr=1e-3", "mae:mae.decoder_depth=2",
                                          "queue.size=64 mae:mae.mask_ratio=0.5"]
    assert cells[1] == {"name": "stages.refine.base_lr=1e-3", "mae": [], "refine": ["stages.refine.base_lr=1e-3"]}
    assert cells[2]["mae"] == ["mae.decoder_depth=2"] and cells[2]["refine"] == ["stages.refine.base_lr=2e-3"]
    assert cells[3]["mae"] == ["mae.mask_ratio=0.5"]
    # cells that pre-train the same MAE share its directory; another MAE recipe gets its own
    mae_dirs = [sweep.demo_command(args, c, 0)[2] for c in cells]
    assert mae_dirs[0] == mae_dirs[1] != mae_dirs[2] != mae_dirs[3]


def test_sweep_table_means_and_spreads_over_seeds():
    sweep = load_sweep()

    def seed(mae, best, ema, mae_nmi, ema_nmi):
        return {"mae_knn20": mae, "mae_best_block_knn20": best, "mae_nmi": mae_nmi, "online_knn20": ema,
                "online_nmi": ema_nmi, "ema_knn20": ema, "ema_nmi": ema_nmi, "refine_minutes": 2.0}
    row = {"name": "base", "steps": {"mae": 110, "heads": 16, "refine": 96},
           "seeds": {0: seed(0.70, 0.72, 0.76, 0.60, 0.64), 1: seed(0.70, 0.74, 0.78, 0.60, 0.66)}}
    refs = {"raw_pixels": {0: {"knn20": 0.8, "nmi": 0.5}},
            "random_init": {0: {"knn20": 0.6, "nmi": 0.4, "best_block_knn20": 0.62}}}
    rows = sweep.table_rows([row], refs)
    assert rows[0][0] == "raw pixels (no encoder)" and rows[0][3] == "80.0"
    assert rows[1][0] == "random-init encoder" and rows[1][3] == "60.0 (62.0)"
    base = dict(zip(sweep.COLUMNS, rows[2]))
    assert base["steps (MAE / heads + refine)"] == "110 / 16 + 96"
    assert base["MAE k-NN@20 (best block)"] == "70.0 ± 0.0 (73.0 ± 1.4)"
    assert base["EMA k-NN@20"] == "77.0 ± 1.4"
    assert base["EMA - MAE best block"] == "4.0 ± 0.0"  # per seed: 76 - 72 and 78 - 74
    assert base["EMA - MAE NMI"] == "5.0 ± 1.4" and base["seeds"] == "0,1"


def test_mean_std_and_curves_shared_by_demo_and_sweep():
    """One statistics helper for the demo and the sweep: sample std, missing and NaN values skipped; one curve
    builder: a group of several seeds is their mean with its band, a shared model keeps its bare name."""
    import math
    from scale_refiner.cli.demo import mean_curves, mean_std
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert mean_std([1.0, None, float("nan"), 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([None]))
    blocks = lambda *k: {"labels": ["block0", "final"], "knn20": list(k)}  # noqa: E731
    curves = mean_curves({"MAE": [blocks(0.5, 0.7), blocks(0.5, 0.7)], "refined": [blocks(0.4, 0.8), blocks(0.6, 0.6)],
                          "alone": [blocks(0.1, 0.2)]}, shared={"MAE"})
    assert set(curves) == {"MAE", "refined, 2 seeds", "alone"}
    labels, means, stds = curves["refined, 2 seeds"]
    assert labels == ["block0", "final"] and means == pytest.approx([0.5, 0.7])
    assert stds == pytest.approx([0.1 * 2 ** 0.5] * 2)
    assert curves["alone"][2] == [0.0, 0.0]


def test_sweep_runs_the_chain_and_writes_its_table(tmp_path):
    """Two cells on the tiniest settings: one MAE pre-training serves both, every row has numbers."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "launch/sweep_demo.py", "--out", str(out), "--seeds", "0", "--eval-limit", "300",
           "--kmeans-runs", "1", *(f"--base=mae:{o}" for o in MAE), *(f"--base={o}" for o in REFINE),
           "--axis", "stages.refine.base_lr=1e-3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, f"sweep failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.count("== MAE pre-training\n") == 2 and "already exist" in proc.stdout  # trained once
    assert proc.stdout.count("== evaluate MAE\n") == 1 and "== evaluate MAE: reused" in proc.stdout  # once too
    result = json.loads((out / "sweep.json").read_text())
    assert [c["name"] for c in result["cells"]] == ["base", "stages.refine.base_lr=1e-3"]
    for cell in result["cells"]:
        assert cell["steps"] == {"mae": 4, "heads": 2, "refine": 2}  # 64 samples / 32, 2 MAE epochs
        numbers = cell["seeds"]["0"]
        for key in ("mae_knn20", "mae_best_block_knn20", "online_knn20", "ema_knn20"):
            assert 0.1 <= numbers[key] <= 1  # 10 classes
    assert set(result["references"]["raw_pixels"]["0"]) == {"knn20", "nmi"}
    assert (out / "raw_pixels" / "metrics.json").is_file()  # the demo's cached row: --table-only reuses it
    lines = (out / "sweep.md").read_text().splitlines()
    assert lines[0].startswith("| recipe | steps") and len(lines) == 2 + 2 + 2  # header, refs, cells
    assert lines[2].startswith("| raw pixels") and lines[3].startswith("| random-init encoder")
    plots = sorted((out / "cells").glob("*/s0/per_block_knn.svg"))  # a cell's directory: its overrides, hashed
    assert len(plots) == 2 and all(p.read_text().startswith("<?xml") for p in plots)


def test_sweep_plots_a_cell_over_its_seeds(tmp_path):
    """Several seeds of a cell: one plot, each encoder's curve the seeds' mean, the shared MAE once, the
    references left to the random-init reference of the sweep itself."""
    sweep = load_sweep()
    args = sweep.parse_args(["--out", str(tmp_path), "--seeds", "0,1", "--mae-seed", "0"])
    run_dirs = {}
    for seed in (0, 1):
        run_dirs[seed] = tmp_path / f"s{seed}"
        run_dirs[seed].mkdir()
        encoders = {"random init": {"blocks": blocks_of([0.6, 0.6])}, "MAE": {"blocks": blocks_of([0.7, 0.72])},
                    "refined (EMA)": {"blocks": blocks_of([0.7, 0.74 + 0.02 * seed])}}
        (run_dirs[seed] / "summary.json").write_text(json.dumps({"encoders": encoders}))
    svg, png = sweep.plot_seeds(args, {"name": "base", "mae": [], "refine": []}, run_dirs)
    text = svg.read_text()
    assert "refined (EMA), 2 seeds" in text and text.count("random init") == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert ">MAE<" in text.replace("</text>", "<")  # the shared MAE: one curve, not "2 seeds"


def test_sweep_table_skips_runs_of_an_edited_recipe(tmp_path):
    """A cell's directory is named by its overrides: a run made before configs/demo.yaml changed must not be
    reported under the new recipe."""
    sweep = load_sweep()
    from scale_refiner.config import load_config, to_dict
    args = sweep.parse_args(["--out", str(tmp_path)])
    cell = {"name": "base", "mae": [], "refine": []}
    run_dir = tmp_path / "s0"
    (run_dir / "refined").mkdir(parents=True)
    recorded = to_dict(load_config(ROOT / "configs/demo.yaml", ["run.seed=0", "model.weights=/some/mae.pth"]))
    (run_dir / "refined" / "config.json").write_text(json.dumps(recorded))
    assert sweep.recipe_matches(args, cell, 0, run_dir)  # the MAE's path is not the recipe
    assert not sweep.recipe_matches(args, cell, 1, run_dir)  # another seed
    recorded["stages"]["refine"]["epochs"] = 1.5  # the recipe before an edit of configs/demo.yaml
    (run_dir / "refined" / "config.json").write_text(json.dumps(recorded))
    assert not sweep.recipe_matches(args, cell, 0, run_dir)
