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
    with pytest.raises(S.ShardError, match=rf"{tmp_path / 'src' / 'animals'}: 2 sub-folders with images"):
        S.make_shards(f"folder:{tmp_path / 'src'}", tmp_path / "out")


def _jpeg(path: Path, mode: str, seed: int) -> bytes:
    import io
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    shape = (10, 12, 3) if mode == "RGB" else (10, 12)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).convert(mode).save(buf, "JPEG", quality=80)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_jpeg_sources_keep_their_bytes_and_png_stays_png(tmp_path):
    import numpy as np
    from scale_refiner.data.wds_pipeline import WdsEvalLoader
    src = tmp_path / "src"
    originals = {}
    for c in ("a", "b"):
        originals[f"{c}/rgb.jpg"] = _jpeg(src / c / "rgb.jpg", "RGB", 1)
        originals[f"{c}/grey.JPEG"] = _jpeg(src / c / "grey.JPEG", "L", 2)
        _png(src / c / "flat.png", 7)
        originals[f"{c}/flat.png"] = (src / c / "flat.png").read_bytes()
    _jpeg(src / "a" / "cmyk.jpg", "CMYK", 3)  # not what the decoders are tested on: stored as PNG
    manifest = json.loads(S.make_shards(f"folder:{src}", tmp_path / "out").read_text())
    assert manifest["image_format"] == "keep" and manifest["image_ext"] == "jpg;png"
    stored = []  # (image bytes, member extension) of every sample
    for tar in sorted((tmp_path / "out").glob("train-*.tar")):
        for key, parts in S.iter_tar_samples(tar):
            stored += [(d, e) for e, d in parts.items() if e in ("png", "jpg")]
    assert len(stored) == 7
    for name, data in originals.items():
        assert (data, "png" if name.endswith(".png") else "jpg") in stored, name  # byte for byte
    assert sum(ext == "png" for _, ext in stored) == 3  # the two PNGs and the CMYK JPEG, rewritten
    shard_set = S.load_manifest(tmp_path / "out")
    assert S.validate_shards(shard_set.split("train").tars).ok
    xs, ys, _ = zip(*WdsEvalLoader(shard_set.split("train").tars, 4, resize=8, crop=8, num_workers=0))
    assert sum(len(y) for y in ys) == 7 and np.isfinite(torch_cat(xs)).all()  # a mixed set reads back whole
    from scale_refiner.data.dali_pipeline import DaliEvalLoader, dali_available
    if dali_available():  # DALI's reader takes either extension too
        sp = shard_set.split("train")
        labels = [y for _, y, _ in DaliEvalLoader(sp.tars, sp.indexes, 4, resize=8, crop=8, normalize=False,
                                                  device="cpu")]
        assert sum(len(y) for y in labels) == 7

    S.make_shards(f"folder:{src}", tmp_path / "png", fmt="png")  # asked for: every image re-encoded as PNG
    forced = S.load_manifest(tmp_path / "png")
    assert forced.manifest["image_ext"] == "png"
    assert all(k.endswith(".png") or not k.endswith(".jpg") for t in forced.split("train").tars
               for k in _member_names(t))


def torch_cat(xs):
    import torch
    return torch.cat(xs).numpy()


def _member_names(tar):
    import tarfile
    with tarfile.open(tar) as t:
        return t.getnames()


def test_test_fraction_is_a_seeded_per_class_hold_out_recorded_in_the_manifest(tmp_path):
    for c, n in (("0", 10), ("1", 20), ("2", 30)):
        for i in range(n):
            _png(tmp_path / "src" / c / f"{i:02d}.png", (int(c) * 50 + i) % 256)

    def held_out(out, seed):
        m = S.make_shards(f"folder:{tmp_path / 'src'}", tmp_path / out, test_fraction=0.2, seed=seed)
        manifest = json.loads(m.read_text())
        values = set()
        for tar in S.load_manifest(tmp_path / out).split("test").tars:
            for _, parts in S.iter_tar_samples(tar):
                values.add(parts["png"])
        return manifest, values

    manifest, test_a = held_out("a", 0)
    assert manifest["test_fraction"] == 0.2 and manifest["seed"] == 0
    assert manifest["splits"]["test"]["class_counts"] == [2, 4, 6]  # a fifth of each class
    assert manifest["splits"]["train"]["class_counts"] == [8, 16, 24]
    assert held_out("b", 0)[1] == test_a  # the same seed holds out the same images
    assert held_out("c", 1)[1] != test_a
    with pytest.raises(S.ShardError, match="only a folder: source"):
        S.make_shards("digits", tmp_path / "d", test_fraction=0.2)
    with pytest.raises(S.ShardError, match=r"must be in \[0, 1\)"):
        S.make_shards(f"folder:{tmp_path / 'src'}", tmp_path / "e", test_fraction=1.0)


def test_class_ids_numeric_names_by_value_first_then_text(tmp_path):
    for name in ("b", "10", "A", "2", "1"):
        _png(tmp_path / "src" / name / "0.png", 1)
    manifest = json.loads(S.make_shards(f"folder:{tmp_path / 'src'}", tmp_path / "out").read_text())
    assert manifest["class_names"] == ["1", "2", "10", "A", "b"]


def test_folder_layouts_that_would_lose_or_mislabel_images_are_refused_naming_the_folder(tmp_path):
    src = tmp_path / "loose"
    _png(src / "cat" / "0.png", 1)
    _png(src / "stray.png", 2)  # no class folder: no label
    with pytest.raises(S.ShardError, match=rf"{src}: 1 images outside any class folder \({src / 'stray.png'}"):
        S.make_shards(f"folder:{src}", tmp_path / "o1")
    src = tmp_path / "both"
    for split in ("train", "val", "test"):
        _png(src / split / "cat" / "0.png", 1)
    with pytest.raises(S.ShardError, match=rf"{src} holds both val/ and test/"):
        S.make_shards(f"folder:{src}", tmp_path / "o2")
    src = tmp_path / "no-train"
    _png(src / "val" / "cat" / "0.png", 1)
    _png(src / "cat" / "0.png", 1)
    with pytest.raises(S.ShardError, match=rf"{src} holds val/ but no train/"):
        S.make_shards(f"folder:{src}", tmp_path / "o3")
    src = tmp_path / "split"
    _png(src / "train" / "cat" / "0.png", 1)
    _png(src / "test" / "cat" / "0.png", 1)
    with pytest.raises(S.ShardError, match="has its own test split"):
        S.make_shards(f"folder:{src}", tmp_path / "o4", test_fraction=0.5)
    (src / "train" / "cat" / "notes.txt").write_text("not an image")
    _png(src / "extra" / "cat" / "0.png", 1)
    notes = []
    S.make_shards(f"folder:{src}", tmp_path / "o5", log=notes.append)
    assert any("notes.txt" in n and "not images" in n for n in notes), notes  # skipped, but said so
    assert any(str(src / "extra") in n and "not read" in n for n in notes), notes


def test_the_manifest_names_the_data_set(tmp_path):
    _png(tmp_path / "flowers" / "rose" / "0.png", 1)
    _png(tmp_path / "flowers" / "tulip" / "0.png", 2)
    S.make_shards(f"folder:{tmp_path / 'flowers'}", tmp_path / "out")
    assert S.load_manifest(tmp_path / "out").dataset == "flowers"  # the folder's name
    S.make_shards(f"folder:{tmp_path / 'flowers'}", tmp_path / "named", name="flowers-v2")
    assert S.load_manifest(tmp_path / "named").dataset == "flowers-v2"
    S.make_shards(f"tar:{tmp_path / 'named'}/*.tar", tmp_path / "reindexed")
    assert S.load_manifest(tmp_path / "reindexed").dataset == "flowers-v2"  # from the tars' own manifest
    S.make_shards("digits", tmp_path / "digits", limit=20)
    assert S.load_manifest(tmp_path / "digits").dataset == "digits"
    old = json.loads((tmp_path / "digits" / S.MANIFEST).read_text())
    del old["dataset"]  # written before the name was recorded: the built-in source's name
    (tmp_path / "digits" / S.MANIFEST).write_text(json.dumps(old))
    assert S.load_manifest(tmp_path / "digits").dataset == "digits"
