"""Shard writing, DALI index files, manifest validation, the sources (digits, folder, tar re-index)."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from scale_refiner.data import shards as S


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    S.make_shards("digits", out, samples_per_shard=200, seed=0)
    return out


def _digits_reference():
    data, names = S.source_digits()
    return {split: {s.index: (s.label, np.asarray(Image.open(io.BytesIO(s.image)))) for s in samples}
            for split, samples in data.items()}


def test_manifest_counts_and_files(digits):
    m = json.loads((digits / S.MANIFEST).read_text())
    assert m["format"] == S.FORMAT_NAME and m["num_classes"] == 10 and m["image_ext"] == "png"
    assert m["splits"]["train"]["num_samples"] == 1437 and m["splits"]["test"]["num_samples"] == 360
    for split, s in m["splits"].items():
        assert sum(s["class_counts"]) == s["num_samples"]
        assert sum(r["num_samples"] for r in s["shards"]) == s["num_samples"]
        assert [r["tar"] for r in s["shards"]] == [f"{split}-{i:05d}.tar" for i in range(len(s["shards"]))]
        for r in s["shards"]:
            assert S.sha256_file(digits / r["tar"]) == r["sha256"]
    # stratified 80/20: every class in both splits in about that proportion
    tr, te = np.array(m["splits"]["train"]["class_counts"]), np.array(m["splits"]["test"]["class_counts"])
    assert np.all(np.abs(te / (tr + te) - 0.2) < 0.02)
    assert not list(digits.glob("*.tmp")) and not list(digits.glob(".*.tmp"))


def test_index_files_match_dali_format(digits, tmp_path):
    for idx in sorted(digits.glob("*.idx")):
        tar = idx.with_suffix(".tar")
        ours = tmp_path / "ours.idx"
        S.write_index_file(S.index_entries(tar), ours)
        assert ours.read_text() == idx.read_text(), idx  # wds2idx (DALI's tool) and ours agree byte for byte
        entries = S.read_index_file(idx)
        assert [e[0] for e in entries[0]] == ["png", "cls", "idx"]


def test_webdataset_reads_back_same_samples_shuffled(digits):
    ref = _digits_reference()
    shard_set = S.load_manifest(digits)
    for split in ("train", "test"):
        sp = shard_set.split(split)
        seen = []
        for sample in wds.WebDataset(sp.tars, shardshuffle=False):
            idx = int(sample["idx"].decode())
            label, img = ref[split][idx]
            assert int(sample["cls"].decode()) == label
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), img)
            assert sample["__key__"] == f"{split}{idx:08d}"
            seen.append(idx)
        assert sorted(seen) == sorted(ref[split])
        assert seen != sorted(seen)  # written shuffled
        first = seen[:sp.counts[0]]
        assert len(set(np.array([ref[split][i][0] for i in first]))) == 10  # classes mixed within a tar


def test_same_seed_same_bytes_other_seed_other_order(tmp_path, digits):
    S.make_shards("digits", tmp_path / "a", samples_per_shard=200, seed=0, limit=300)
    S.make_shards("digits", tmp_path / "b", samples_per_shard=200, seed=0, limit=300)
    S.make_shards("digits", tmp_path / "c", samples_per_shard=200, seed=1, limit=300)
    a, b, c = (S.sha256_file(tmp_path / x / "train-00000.tar") for x in "abc")
    assert a == b != c


def test_load_manifest_errors_name_the_file(tmp_path):
    out = tmp_path / "d"
    S.make_shards("digits", out, samples_per_shard=100, limit=150)
    S.load_manifest(out)  # fine
    with pytest.raises(S.ShardError, match=r"nowhere.*manifest not found"):
        S.load_manifest(tmp_path / "nowhere")
    manifest = out / S.MANIFEST
    good = manifest.read_text()

    tar = out / "train-00001.tar"
    raw = bytearray(tar.read_bytes())
    raw[600] ^= 0xFF
    tar.write_bytes(bytes(raw))
    with pytest.raises(S.ShardError, match=r"train-00001\.tar: sha256 .* does not match"):
        S.load_manifest(out)
    S.load_manifest(out, verify="size")  # same size: only the checksum notices

    tar.write_bytes(bytes(raw[:4096]))
    with pytest.raises(S.ShardError, match=r"train-00001\.tar: 4096 bytes.*truncated"):
        S.load_manifest(out, verify="size")
    tar.unlink()
    with pytest.raises(S.ShardError, match=r"train-00001\.tar: tar file listed in .* is absent"):
        S.load_manifest(out, verify="none")

    m = json.loads(good)
    del m["splits"]["train"]  # (its tar was deleted above)
    m["splits"]["test"]["shards"] = []
    manifest.write_text(json.dumps(m))
    with pytest.raises(S.ShardError, match=r"manifest.json: split 'test' has an empty shard list"):
        S.load_manifest(out, verify="none")
    manifest.write_text("{not json")
    with pytest.raises(S.ShardError, match=r"manifest.json: unreadable manifest"):
        S.load_manifest(out)


def _raw_tar(path, samples):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


def test_validate_shards_reports_shard_and_key(tmp_path):
    png = S.encode_array(np.zeros((8, 8), np.uint8))
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8)).save(buf, "JPEG")
    tar = tmp_path / "x-00000.tar"
    _raw_tar(tar, [("a", {"png": png, "cls": b"1", "idx": b"0"}),
                   ("b", {"png": png[:40], "cls": b"1", "idx": b"1"}),
                   ("c", {"png": png, "idx": b"2"}),
                   ("d", {"jpg": buf.getvalue(), "cls": b"12", "idx": b"3"})])
    report = S.validate_shards([tar], num_classes=10)
    assert report.samples == 4
    bad = {(key, reason.split(" ")[0]) for _, key, reason in report.bad}
    assert ("b", "cannot") in bad and ("c", "no") in bad and ("d", "mode") in bad and ("d", "label") in bad
    assert all(shard == str(tar) for shard, _, _ in report.bad)
    assert "key" not in str(report) or "x-00000.tar" in str(report)
    with pytest.raises(S.ShardError, match="empty shard list"):
        S.validate_shards([])


def test_folder_source_normalises_modes_and_tar_reindex(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
                if i == 0:
                    Image.fromarray(arr).convert("CMYK").save(d / f"{i}.jpg")
                elif i == 1:
                    Image.fromarray((arr[..., 0].astype(np.uint16) * 257)).save(d / f"{i}.png")  # 16-bit grey
                else:
                    Image.fromarray(arr).save(d / f"{i}.png")
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(S.ShardError, match=r"broken\.png: cannot decode"):
        S.make_shards(f"folder:{root}", tmp_path / "f", samples_per_shard=5)
    S.make_shards(f"folder:{root}", tmp_path / "f", samples_per_shard=5, skip_bad=True)
    shard_set = S.load_manifest(tmp_path / "f")
    assert shard_set.class_names == ["cat", "dog"]
    assert shard_set.split("train").num_samples == 12 and shard_set.split("test").num_samples == 4
    assert len(shard_set.manifest["skipped"]) == 1
    for split in ("train", "test"):
        assert S.validate_shards(shard_set.split(split).tars).ok  # CMYK and 16-bit rewritten as RGB / L 8-bit

    S.make_shards(f"tar:{tmp_path / 'f'}/*.tar", tmp_path / "r", samples_per_shard=4, seed=5)
    again = S.load_manifest(tmp_path / "r")
    assert again.class_names == ["cat", "dog"]
    for split in ("train", "test"):
        assert again.split(split).num_samples == shard_set.split(split).num_samples
        assert again.manifest["splits"][split]["class_counts"] == shard_set.manifest["splits"][split]["class_counts"]


def test_ensure_fashion_mnist_shards_idempotent(tmp_path, monkeypatch):
    calls = []
    real = S.make_shards

    def small(source, out, **kw):
        calls.append(source)
        return real(source, out, limit=64, **kw)

    from scale_refiner.data import shard_writer
    monkeypatch.setattr(shard_writer, "make_shards", small)  # where ensure_fashion_mnist_shards looks it up
    m1 = S.ensure_fashion_mnist_shards(tmp_path / "fm", samples_per_shard=32)
    stamp = m1.stat().st_mtime_ns
    m2 = S.ensure_fashion_mnist_shards(tmp_path / "fm", samples_per_shard=32)
    assert m1 == m2 and calls == ["fashion-mnist"] and m2.stat().st_mtime_ns == stamp
    assert S.load_manifest(m1).class_names[0] == "T-shirt/top"
    (tmp_path / "fm" / "train-00001.tar").unlink()  # damaged set: rewritten
    S.ensure_fashion_mnist_shards(tmp_path / "fm", samples_per_shard=32)
    assert calls == ["fashion-mnist"] * 2 and S.load_manifest(m1).split("train").num_samples == 64


def test_shard_root_from_config_then_environment_then_checkout_then_user_cache(tmp_path, monkeypatch):
    from scale_refiner.data import shard_writer
    repo = Path(shard_writer.__file__).resolve().parents[2]
    monkeypatch.delenv(S.SHARD_ROOT_ENV, raising=False)
    assert S.shard_root() == repo / "shards"  # this checkout (setup.py and shards/README.md above the package)
    monkeypatch.setenv(S.SHARD_ROOT_ENV, str(tmp_path / "env"))
    assert S.shard_root() == tmp_path / "env"
    assert S.shard_root(str(tmp_path / "cfg")) == tmp_path / "cfg"  # the config key / --shard-root wins
    monkeypatch.delenv(S.SHARD_ROOT_ENV)
    monkeypatch.setattr(shard_writer, "_checkout", lambda: None)  # an installed package: not beside its code
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert S.shard_root() == tmp_path / "cache" / "scale-refiner" / "shards"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert S.shard_root() == tmp_path / "home" / ".cache" / "scale-refiner" / "shards"


def test_the_run_writes_the_embedded_shards_under_data_shard_root(tmp_path, monkeypatch):
    from scale_refiner.config import load_config
    from scale_refiner.data import loaders, shard_writer
    real = S.make_shards
    monkeypatch.setattr(shard_writer, "make_shards", lambda source, out, **kw: real(source, out, limit=64, **kw))
    cfg = load_config(None, [f"data.shard_root={tmp_path / 'root'}"])
    split = loaders._shard_split(cfg, "train", "train_shards")
    assert split.num_samples == 64
    assert all(Path(t).parent == tmp_path / "root" / "fashion-mnist" for t in split.tars)


def test_make_shards_cli_writes_under_the_shard_root(tmp_path, capsys):
    from scale_refiner.cli.make_shards import main
    assert main(["--source", "digits", "--limit", "40", "--shard-root", str(tmp_path)]) == 0
    assert S.load_manifest(tmp_path / "digits").split("train").num_samples == 40
    with pytest.raises(SystemExit):
        main(["--source", f"folder:{tmp_path}"])  # a folder has no name to default to: --out is required
    assert "--out is required" in capsys.readouterr().err
