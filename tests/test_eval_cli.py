"""launch/evaluate.py end to end on a tiny model, loading from a run directory, and its bad-input errors."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale_refiner.config import RefineConfig, to_dict
from scale_refiner.eval.loading import EvalInputError, load_from_run, load_from_weights
from scale_refiner.models.vit import build_vit
from scale_refiner.models.weights import WeightsError

ROOT = Path(__file__).resolve().parents[1]
EVALUATE = ROOT / "launch/evaluate.py"
HAS_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file()


def evaluate_main():
    spec = importlib.util.spec_from_file_location("evaluate_cli", EVALUATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def tiny_weights(tmp_path, name="vit_test_patch4", img_size=32, seed=0):
    cfg = RefineConfig()
    cfg.model.name, cfg.model.img_size = name, img_size
    torch.manual_seed(seed)
    model = build_vit(cfg.model)
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.mark.skipif(not HAS_FMNIST, reason="needs dataset-fashion-mnist")
def test_cli_end_to_end_tiny_model(tmp_path):
    weights, _ = tiny_weights(tmp_path)
    out = tmp_path / "eval"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, str(EVALUATE), "--model", "vit_test_patch4", "--weights", str(weights),
                           "--dataset", "fashion-mnist", "--limit", "300", "--out", str(out), "--linear-epochs", "3",
                           "--kmeans-runs", "2", "--protocols", "knn,blocks,linear,lowshot,kmeans"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] == 300 and metrics["n_test"] == 300 and metrics["img_size"] == 32
    assert metrics["source"]["kind"] == "weights" and metrics["model"]["depth"] == 4
    assert set(metrics["knn"]) == {"10", "20"} and all(0.1 < v <= 1 for v in metrics["knn"].values())
    assert metrics["blocks"]["labels"] == ["block0", "block1", "block2", "block3", "final"]
    assert metrics["blocks"]["knn10"][-1] == metrics["knn"]["10"]  # the "final" entry is the k-NN feature
    lin = metrics["linear"]
    assert len(lin["sweep"]) == 13 * 4 and lin["selected_on"] == "val"
    assert set(lin["per_set"]) == {"last_cls", "last_cls+mean", "last4_cls", "last4_cls+mean"}
    assert lin["best"]["val"] == max(p["val"] for p in lin["sweep"])
    assert set(metrics["lowshot"]) == {"1", "2", "5"} and len(metrics["lowshot"]["5"]["per_seed"]) == 3
    assert 0 <= metrics["kmeans"]["acc"] <= 1 and metrics["kmeans"]["n_clusters"] == 10
    table = (out / "metrics.md").read_text()
    assert "| k-NN | k=10" in table and "linear probe (best)" in table and "k-means ACC" in table
    png = (out / "knn_per_block.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert "| k-NN | k=10" in proc.stdout


def fake_run(tmp_path, with_ema=True):
    cfg = RefineConfig()
    cfg.model.name, cfg.model.img_size = "vit_test_patch4", 32
    cfg.augment.global_size = 32
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "refine-end"
    ckpt.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    torch.manual_seed(0)
    online = build_vit(cfg.model)
    state = {f"encoder.{k}": v for k, v in online.state_dict().items()}
    state["heads.0.proj.weight"] = torch.zeros(2, 2)  # the refiner's other parts are ignored
    torch.save(state, ckpt / "model_state.pt")
    ema = {n: p.detach() + 1.0 for n, p in online.named_parameters() if n.startswith("blocks.")}
    if with_ema:
        torch.save(ema, ckpt / "ema.pt")
    (ckpt / "state.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("refine-end")
    return run, online, ema


def test_load_from_run_ema_over_online(tmp_path):
    run, online, ema = fake_run(tmp_path)
    model, cfg, source = load_from_run(run, "ema")
    assert source["kind"] == "checkpoint" and source["encoder"] == "ema" and cfg.augment.global_size == 32
    state = model.state_dict()
    for k, v in online.state_dict().items():
        torch.testing.assert_close(state[k], ema[k] if k in ema else v, rtol=0, atol=0)
    model, _, _ = load_from_run(run / "checkpoints" / "refine-end", "online")  # a checkpoint directory
    for k, v in online.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_bad_checkpoints(tmp_path):
    run, _, _ = fake_run(tmp_path, with_ema=False)
    with pytest.raises(EvalInputError, match="no ema.pt.*--encoder online"):
        load_from_run(run, "ema")
    with pytest.raises(EvalInputError, match="neither a run directory"):
        load_from_run(tmp_path, "ema")
    # a run whose config names another model than its checkpoint holds
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["name"] = "vit_mini_patch4"
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"(?s)shape mismatch.*blocks\.0\.attn\.qkv\.weight: checkpoint \(96, 32\)"):
        load_from_run(run, "online")
    weights, _ = tiny_weights(tmp_path, "vit_mini_patch4")
    with pytest.raises(WeightsError, match=r"missing|unexpected"):
        load_from_weights("vit_test_patch4", weights)


def test_cli_bad_inputs(tmp_path, capsys):
    main = evaluate_main()
    weights, _ = tiny_weights(tmp_path, "vit_mini_patch4")
    out = str(tmp_path / "o")
    assert main(["--model", "vit_test_patch4", "--weights", str(weights), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "error: cannot load" in err and "shape mismatch" in err and "blocks.5.norm1.weight" in err
    assert main(["--model", "vit_mini_patch4", "--weights", str(weights), "--out", out,
                 "--test-shards", str(tmp_path)]) == 2
    assert "--test-shards needs --train-shards" in capsys.readouterr().err
    missing = str(tmp_path / "no-shards")
    assert main(["--model", "vit_mini_patch4", "--weights", str(weights), "--out", out,
                 "--train-shards", missing, "--test-shards", missing]) == 2
    assert "no-shards" in capsys.readouterr().err  # the error names the missing manifest
    assert main(["--model", "vit_mini_patch4", "--weights", str(weights), "--out", out, "--protocols", "knn,svm"]) == 2
    assert "unknown protocol" in capsys.readouterr().err
    assert main(["--model", "vit_nope", "--weights", str(weights), "--out", out]) == 2
    assert "not a registered ViT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", out])  # neither --checkpoint nor --weights
    assert not Path(out).exists()  # nothing written on bad input


def test_cli_on_shards(tmp_path):
    """k-NN from a shard set's train and test splits (scikit-learn digits, written by make_shards)."""
    from scale_refiner.data.shards import make_shards
    shards = make_shards("digits", tmp_path / "digits", samples_per_shard=400)
    weights, _ = tiny_weights(tmp_path, "vit_test_patch4")
    out = tmp_path / "eval"
    assert evaluate_main()(["--model", "vit_test_patch4", "--weights", str(weights), "--out", str(out),
                            "--train-shards", str(shards), "--protocols", "knn"]) == 0  # test: the same set's
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] == 1437 and metrics["n_test"] == 360  # digits: 80/20 stratified
    assert metrics["dataset"] == "digits" and 0.1 < metrics["knn"]["10"] <= 1  # the manifest's name
    assert metrics["data"] == {"name": "digits", "train": str(shards.parent), "test": str(shards.parent)}
    assert evaluate_main()(["--model", "vit_test_patch4", "--weights", str(weights), "--out", str(out),
                            "--train-shards", str(shards), "--dataset", "fashion-mnist"]) == 2


@pytest.mark.skipif(not HAS_FMNIST, reason="needs dataset-fashion-mnist")
def test_cli_bf16_features_track_fp32(tmp_path):
    """--precision bf16 (a GPU's default, CPU autocast here): the features are extracted under bf16 autocast and
    the k-NN lands within 2 points of fp32's; the report records the precision."""
    weights, _ = tiny_weights(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    results = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        proc = subprocess.run([sys.executable, str(EVALUATE), "--model", "vit_test_patch4", "--weights",
                               str(weights), "--limit", "300", "--out", str(out), "--protocols", "knn,kmeans",
                               "--kmeans-runs", "1", "--precision", precision],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[precision] = json.loads((out / "metrics.json").read_text())
    assert results["bf16"]["precision"] == "bfloat16" and results["fp32"]["precision"] == "float32"
    for k in ("10", "20"):
        assert abs(results["bf16"]["knn"][k] - results["fp32"]["knn"][k]) <= 0.02, (k, results)


def test_exports_load_in_the_hub_layout_and_the_legacy_one(tmp_path):
    """A run whose checkpoints are gone loads from export/<which>/ (timm's hub layout) or, for a run exported
    before it, from export/<which>.safetensors; --weights takes an export directory, a file in it, or a legacy
    pair's file, with or without --model."""
    from safetensors.torch import save_file
    from scale_refiner.models.weights import export_timm
    run, online, ema = fake_run(tmp_path)
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(EvalInputError, match="no export"):
        load_from_run(run, "ema")
    ema_state = {**online.state_dict(), **ema}
    cfg = RefineConfig()
    cfg.model.name, cfg.model.img_size = "vit_test_patch4", 32
    twin = build_vit(cfg.model)
    twin.load_state_dict(ema_state)
    export_timm(twin, run / "export", "ema")
    model, _, source = load_from_run(run, "ema")
    assert source == {"kind": "export", "path": str(run / "export/ema/model.safetensors"), "encoder": "ema",
                      "config": str(run / "config.json")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema_state.items())
    # legacy: the old pair (weights + a json beside them) in place of the directory
    save_file({k: v.contiguous() for k, v in online.state_dict().items()}, str(run / "export/online.safetensors"))
    model, _, source = load_from_run(run, "online")
    assert source["path"] == str(run / "export/online.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in online.state_dict().items())

    x = torch.randn(2, 3, 32, 32)
    for path in (run / "export/ema", run / "export/ema/model.safetensors", run / "export/ema/config.json"):
        model, cfg, source = load_from_weights(None, path)
        assert source["kind"] == "timm_export" and source["layout"] == "hub" and cfg.augment.global_size == 32
        with torch.no_grad():
            assert torch.equal(model.forward_tokens(x), twin.eval().forward_tokens(x))
        model, _, source = load_from_weights("vit_test_patch4", path)  # --model with an export: its weights
        assert source["path"] == str(run / "export/ema/model.safetensors") and source["format"] == "native"
    with pytest.raises(EvalInputError, match="must be an export"):
        load_from_weights(None, run / "export/online.safetensors")  # no .json beside it
    with pytest.raises(EvalInputError, match="directory but not an export"):
        load_from_weights("vit_test_patch4", run)
