"""The shard writer loses nothing silently: a truncated tar source, a tar cut inside a member, a source with no
images. Each is an error naming the file (or folder), or with ``skip_bad`` a skip recorded in the manifest."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scale_refiner.data import shards as S

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    S.make_shards("digits", out, samples_per_shard=400, seed=0)
    return out


def _cut(src: Path, dst: Path, size: int) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes()[:size])
    return dst


def test_whole_tar_reads_every_sample(digits):
    tar = digits / "train-00000.tar"
    assert sum(1 for _ in S.iter_tar_samples(tar)) == 400
    # the record padding after the end-of-archive marker may go: still whole
    _cut(tar, digits / "padless" / "train.tar", tar.stat().st_size - 1024)
    assert sum(1 for _ in S.iter_tar_samples(digits / "padless" / "train.tar")) == 400


@pytest.mark.parametrize("where", ["between members", "inside a member"])
def test_truncated_tar_is_an_error_naming_the_file(digits, tmp_path, where):
    src = digits / "train-00000.tar"
    size = src.stat().st_size // 2
    if where == "between members":  # a cut on a header boundary: tarfile alone would just stop here
        offsets = [m.offset for m in __import__("tarfile").open(src)]
        size = max(o for o in offsets if o <= size)
    else:
        size += 100
    bad = _cut(src, tmp_path / "in" / "train-00000.tar", size)
    with pytest.raises(S.ShardError, match=str(bad)):
        S.make_shards(f"tar:{tmp_path / 'in'}/*.tar", tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    # through the command line: exit 2, the file named, nothing written
    proc = subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "--source",
                           f"tar:{tmp_path / 'in'}/*.tar", "--out", str(tmp_path / "cli")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(bad) in proc.stderr and "truncated" in proc.stderr, proc.stderr
    assert not (tmp_path / "cli" / "manifest.json").exists()


def test_truncated_tar_with_skip_bad_keeps_what_was_whole_and_records_the_loss(digits, tmp_path):
    src = digits / "train-00000.tar"
    bad = _cut(src, tmp_path / "in" / "train-00000.tar", src.stat().st_size // 2)
    shutil.copy(digits / "train-00001.tar", tmp_path / "in" / "train-00001.tar")
    manifest = json.loads(S.make_shards(f"tar:{tmp_path / 'in'}/*.tar", tmp_path / "out", skip_bad=True)
                          .read_text())
    kept = manifest["splits"]["train"]["num_samples"]
    assert 400 < kept < 800  # the whole second file and the first file's samples before the cut
    assert any(str(bad) in item and "truncated" in item for item in manifest["skipped"]), manifest["skipped"]


def test_folder_source_without_images_is_an_error(tmp_path):
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "dog").mkdir()
    (tmp_path / "src" / "dog" / "notes.txt").write_text("no image here")
    with pytest.raises(S.ShardError, match="no images"):
        S.make_shards(f"folder:{tmp_path / 'src'}", tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def _png(path: Path, value: int) -> None:
    import numpy as np
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(S.encode_array(np.full((8, 8), value, dtype=np.uint8), "png"))


def test_folder_classes_sort_numerically_and_a_missing_test_split_is_reported(tmp_path):
    for name in ("10", "2", "1"):
        for i in range(3):
            _png(tmp_path / "src" / name / f"{i}.png", int(name) * 10 + i)
    notes = []
    manifest = json.loads(S.make_shards(f"folder:{tmp_path / 'src'}", tmp_path / "out", log=notes.append)
                          .read_text())
    assert manifest["class_names"] == ["1", "2", "10"]  # not the text order 1, 10, 2
    assert "test" not in manifest["splits"]
    assert any(n.startswith("warning:") and "--test-fraction" in n for n in notes), notes
    notes.clear()
    S.make_shards(f"folder:{tmp_path / 'src'}", tmp_path / "out2", test_fraction=0.34, log=notes.append)
    assert not any("warning" in n for n in notes)


def test_nested_class_folders_are_refused(tmp_path):
    _png(tmp_path / "src" / "animals" / "cat" / "0.png", 1)
    _png(tmp_path / "src" / "animals" / "dog" / "0.png", 2)
    _png(tmp_path / "src" / "plants" / "0.png", 3)
    with pytest.raises(S.ShardError, match="sub-folders"):
        S.make_shards(f"folder:{tmp_path / 'src'}", tmp_path / "out")
