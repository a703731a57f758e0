"""A run's data: data.dataset, the training shards and the evaluation data cannot disagree. A refinement on a
small class-folder set trains on its shards, and its k-NN (before, periodic, after) and results name and count
that set, not the embedded Fashion-MNIST."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scale_refiner.config import ConfigError, load_config
from scale_refiner.data import shards as S
from scale_refiner.data.loaders import eval_arrays, run_data

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=vit_test_patch4", "heads.blocks=[1,2]", "heads.proj_hidden_dim=64", "heads.proj_out_dim=16",
        "heads.pred_hidden_dim=64", "queue.size=256", "augment.num_local=2", "data.batch_size=16",
        "data.num_workers=0", "data.pipeline=wds", "data.samples_per_epoch=32", "stages.heads.epochs=1",
        "stages.refine.epochs=1", "stages.refine.warmup_epochs=0.5", "run.log_every=1", "engine.kind=single"]
CLASSES = ("circle", "square", "stripes")


def class_folders(root: Path, per_class: int, seed: int = 0) -> Path:
    """A tiny data set of 3 visually distinct classes of 16 px colour PNGs, in class folders."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:16, :16]
    masks = {"circle": (yy - 8) ** 2 + (xx - 8) ** 2 < 30, "square": (abs(yy - 8) < 5) & (abs(xx - 8) < 5),
             "stripes": (xx // 2) % 2 == 0}
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
            img[masks[c]] = rng.integers(150, 255, 3, dtype=np.uint8)
            Image.fromarray(img).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """24 train + 6 test images per class (test held out by --test-fraction 0.2), named 'shapes'."""
    tmp = tmp_path_factory.mktemp("shapes")
    S.make_shards(f"folder:{class_folders(tmp / 'src', 30)}", tmp / "shards", samples_per_shard=32,
                  test_fraction=0.2, name="shapes")
    return tmp / "shards"


def cfg_of(*overrides):
    return load_config(ROOT / "configs/demo.yaml", list(overrides))


def test_the_shards_name_the_data_set_and_data_dataset_must_agree(shapes):
    with pytest.raises(ConfigError, match=r"config key 'data.dataset' is 'fashion-mnist', but data.train_shards "
                                          r".* holds 'shapes' .*set data.dataset=shapes"):
        run_data(cfg_of(f"data.train_shards={shapes}"))  # the demo recipe's data.dataset left as it is
    data = run_data(cfg_of(f"data.train_shards={shapes}", "data.dataset=shapes", "data.batch_size=16"),
                    evaluate=True)
    assert data.dataset == "shapes" and data.test.root == data.train.root == shapes  # test_shards: the same set


def test_other_disagreements_are_errors_naming_the_key(shapes, tmp_path):
    S.make_shards("digits", tmp_path / "digits", limit=30)
    with pytest.raises(ConfigError, match=r"'data.test_shards'.*holds 'digits'.*must be one data set"):
        run_data(cfg_of(f"data.train_shards={shapes}", f"data.test_shards={tmp_path / 'digits'}",
                        "data.dataset=shapes", "data.batch_size=16"))
    with pytest.raises(ConfigError, match=r"'data.test_shards' is set .* without data.train_shards"):
        run_data(cfg_of(f"data.test_shards={shapes}"))
    with pytest.raises(ConfigError, match=r"'data.train_shards' is not set and data.dataset='shapes'"):
        run_data(cfg_of("data.dataset=shapes"))
    with pytest.raises(ConfigError, match=r"'data.pipeline': memory reads the embedded"):
        run_data(cfg_of(f"data.train_shards={shapes}", "data.dataset=shapes", "data.pipeline=memory"))
    with pytest.raises(ConfigError, match=r"'data.batch_size': 128 is more than the 72 training images"):
        run_data(cfg_of(f"data.train_shards={shapes}", "data.dataset=shapes"))  # the demo recipe's batch
    with pytest.raises(ConfigError, match=r"'data.train_shards': .*nowhere.*manifest not found"):
        run_data(cfg_of(f"data.train_shards={tmp_path / 'nowhere'}", "data.dataset=shapes"))
    S.make_shards(f"folder:{class_folders(tmp_path / 'src', 2)}", tmp_path / "no-test")  # warns: no test split
    train_only = cfg_of(f"data.train_shards={tmp_path / 'no-test'}", "data.dataset=src", "data.batch_size=6")
    run_data(train_only)  # training alone needs no test split
    with pytest.raises(ConfigError, match=r"'data.train_shards': .*no-test has no 'test' split.*--test-fraction"):
        run_data(train_only, evaluate=True)


def test_evaluation_arrays_come_from_the_shards(shapes):
    cfg = cfg_of(f"data.train_shards={shapes}", "data.dataset=shapes", *TINY)
    (train_x, train_y), (test_x, test_y) = eval_arrays(cfg, "train"), eval_arrays(cfg, "test")
    assert len(train_y) == 72 and len(test_y) == 18 and train_x.shape[1:] == (3, 32, 32)
    assert np.bincount(test_y.numpy()).tolist() == [6, 6, 6]
    big_batch = cfg_of(f"data.train_shards={shapes}", "data.dataset=shapes")  # 128: only training needs a batch
    assert len(eval_arrays(big_batch, "test")[1]) == 18


def test_refine_on_folder_shards_evaluates_on_them(shapes, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "launch/refine.py", "--config", "configs/demo.yaml", f"run.out_dir={out}",
                           f"data.train_shards={shapes}", "data.dataset=shapes", "run.knn_every=1", *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    # the default --eval-samples 10000 would take 10,000 Fashion-MNIST test images; the shards hold 18
    assert results["dataset"] == {"name": "shapes", "train": str(shapes), "test": str(shapes),
                                  "n_train": 72, "n_test": 18}
    assert {"before", "online", "ema"} <= set(results)
    assert "k-NN evaluation on shapes: 72 train images (the bank), 18 test images" in proc.stderr
    periodic = [line for line in proc.stderr.splitlines() if "global step" in line and "k-NN" in line]
    assert len(periodic) == 4  # run.knn_every=1: 2 heads + 2 refine steps, each on the same 18 images
    assert json.loads((out / "config.json").read_text())["data"]["dataset"] == "shapes"

    bad = subprocess.run([sys.executable, "launch/refine.py", "--config", "configs/demo.yaml",
                          f"run.out_dir={tmp_path / 'bad'}", f"data.train_shards={shapes}", *TINY],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert bad.returncode == 2 and "config key 'data.dataset'" in bad.stderr
    assert not (tmp_path / "bad").exists()  # refused before anything was written
