"""DALI multi-crop pipeline on CPU: equivalence with webdataset, sharding, shapes, statistics, seeds,
checkpoint/restore, bad input."""
import io
import json
import math
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from scale_refiner.data import shards as S

dali = pytest.importorskip("nvidia.dali")
from scale_refiner.data.dali_pipeline import (DaliDataError, DaliEvalLoader, DaliMultiCropLoader,  # noqa: E402
                                              FLAG_NAMES)

SMALL = dict(global_size=16, local_size=8, num_local=2, device="cpu")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_dali")
    S.make_shards("digits", out, samples_per_shard=150, seed=0)
    return S.load_manifest(out)


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    """Random colour images (greyscale/solarize leave visible traces in RGB)."""
    root = tmp_path_factory.mktemp("colour_src")
    rng = np.random.default_rng(1)
    for c in range(2):
        (root / f"c{c}").mkdir()
        for i in range(64):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    out = tmp_path_factory.mktemp("colour")
    S.make_shards(f"folder:{root}", out, samples_per_shard=64)
    return S.load_manifest(out)


def _loader(shard_set, batch, split="train", **kw):
    sp = shard_set.split(split)
    args = dict(SMALL)
    args.update(kw)
    return DaliMultiCropLoader(sp.tars, sp.indexes, sp.num_samples, batch, **args)


def test_dali_reads_same_samples_as_webdataset(digits):
    sp = digits.split("test")
    ref = {}
    for s in wds.WebDataset(sp.tars, shardshuffle=False):
        ref[int(s["idx"])] = (int(s["cls"]), np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")))
    got = {}
    for x, y, i in DaliEvalLoader(sp.tars, sp.indexes, 64, resize=8, crop=8, normalize=False, device="cpu"):
        assert x.shape[1:] == (3, 8, 8) and x.dtype == torch.float32
        for img, label, idx in zip(x, y.tolist(), i.tolist()):
            assert idx not in got
            got[idx] = (label, np.round(img.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    assert sorted(got) == sorted(ref)
    for idx, (label, img) in got.items():
        assert label == ref[idx][0]
        assert np.array_equal(img, ref[idx][1])  # 8 px stays 8 px: decode only


def test_two_ranks_cover_every_sample_once_per_epoch(digits):
    n = digits.split("train").num_samples
    # exact mode: each sample exactly once across ranks, for two epochs (DALI moves ranks to the next range)
    loaders = [_loader(digits, 100, rank=r, world=2, drop_last=False, num_local=0) for r in range(2)]
    for epoch in range(2):
        seen = torch.cat([b["index"] for ld in loaders for b in ld])
        assert len(seen) == n and len(seen.unique()) == n, epoch
    # training mode: the same number of full batches on each rank, no sample twice
    loaders = [_loader(digits, 100, rank=r, world=2, drop_last=True, num_local=0) for r in range(2)]
    steps = (n // 2) // 100
    for epoch in range(2):
        per_rank = [[b["index"] for b in ld] for ld in loaders]
        assert [len(p) for p in per_rank] == [steps, steps] == [len(ld) for ld in loaders]
        seen = torch.cat([torch.cat(p) for p in per_rank])
        assert len(seen.unique()) == len(seen) == 2 * steps * 100


def test_shapes_dtypes_ranges(digits):
    b = next(iter(_loader(digits, 32, num_local=3, normalize=False)))
    assert b["global"].shape == (2, 32, 3, 16, 16) and b["local"].shape == (3, 32, 3, 8, 8)
    assert b["global"].dtype == b["local"].dtype == torch.float32
    assert b["label"].dtype == b["index"].dtype == torch.int64 and b["label"].shape == (32,)
    for v in (b["global"], b["local"]):
        assert v.min() >= 0.0 and v.max() <= 1.0 and v.std() > 0.05
    assert b["label"].min() >= 0 and b["label"].max() <= 9
    norm = next(iter(_loader(digits, 32, num_local=0)))
    lo = min((0 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    hi = max((1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert norm["global"].min() >= lo - 1e-4 and norm["global"].max() <= hi + 1e-4
    assert norm["local"].shape == (0, 32, 3, 8, 8)


def _within(count, n, p, z=4.5):
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


def test_augmentation_statistics_and_effects(colour):
    ld = _loader(colour, 64, num_local=2, normalize=False, with_flags=True, seed=11, drop_last=False)
    flags, views = [], []
    for _ in range(3):
        for b in ld:
            flags.append(b["flags"])
            views.append(b["global"])
    f = torch.cat(flags, 1)  # [V, N, 5]
    x = torch.cat(views, 1)  # [2, N, 3, H, W]: the global views
    n = f.shape[1]
    col = {name: i for i, name in enumerate(FLAG_NAMES)}
    for v in range(f.shape[0]):
        assert _within(int(f[v, :, col["flip"]].sum()), n, 0.5)
        assert _within(int(f[v, :, col["jitter"]].sum()), n, 0.8)
        assert _within(int(f[v, :, col["grayscale"]].sum()), n, 0.2)
    assert int(f[0, :, col["blur"]].sum()) == n
    assert _within(int(f[1, :, col["blur"]].sum()), n, 0.1)
    assert all(_within(int(f[v, :, col["blur"]].sum()), n, 0.5) for v in range(2, f.shape[0]))
    assert _within(int(f[1, :, col["solarize"]].sum()), n, 0.2)
    assert int(f[0, :, col["solarize"]].sum()) == 0 and int(f[2:, :, col["solarize"]].sum()) == 0
    # greyscale flag <=> equal channels (the source images are random colour)
    for v in range(2):
        g = f[v, :, col["grayscale"]].bool()
        spread = (x[v].amax(1) - x[v].amin(1)).flatten(1).amax(1)
        assert spread[g].max() <= 1.5 / 255 and spread[~g].min() > 0.05
    # g2 solarized views: every value was mapped to < 128/255 +- a rounding step (x >= .5 became 1 - x)
    sol = f[1, :, col["solarize"]].bool()
    assert x[1][sol].max() <= 128 / 255 + 1e-6 and x[1][~sol].max() > 0.6
    # crop-and-flip only
    b = next(iter(_loader(colour, 64, num_local=2, normalize=False, with_flags=True, color=False)))
    assert b["flags"][..., 1:].sum() == 0 and b["flags"][..., 0].sum() > 0


def test_fixed_seed_same_output(digits):
    a = next(iter(_loader(digits, 16, seed=5)))
    b = next(iter(_loader(digits, 16, seed=5)))
    c = next(iter(_loader(digits, 16, seed=6)))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["global"], c["global"])


def test_checkpoint_restore_continues_at_same_position(digits):
    kw = dict(seed=3, initial_fill=64)
    ld = _loader(digits, 100, **kw)
    it = iter(ld)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(ld.state_dict()))
    rest = list(it)
    next_epoch = list(ld)
    restored = _loader(digits, 100, state=state, **kw)
    assert (restored.epoch, restored.step) == (0, 5)
    again = list(restored)
    assert len(again) == len(rest) == len(ld) - 5
    for a, b in zip(rest, again):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["global"], b["global"])
    for a, b in zip(next_epoch, list(restored)):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["local"], b["local"])


def _bad_shard(tmp_path, name, bad_parts):
    path = tmp_path / f"{name}.tar"
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for i in range(8):
            parts = {"png": S.encode_array(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)), "cls": b"1",
                     "idx": str(i).encode()} if i != 5 else bad_parts
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"k{i:03d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    S.write_dali_index(path, tmp_path / f"{name}.idx")
    return str(path), str(tmp_path / f"{name}.idx")


def _run(tar, idx):
    return list(DaliMultiCropLoader([tar], [idx], 8, 4, shuffle=False, drop_last=False, normalize=False,
                                    **SMALL))


def _jpeg(mode, value):
    buf = io.BytesIO()
    Image.new(mode, (20, 20), value).save(buf, "JPEG")
    return buf.getvalue()


def test_bad_input_errors_name_shard_and_key(tmp_path):
    good_jpg = _jpeg("RGB", (1, 2, 3))
    tar, idx = _bad_shard(tmp_path, "corrupt", {"jpg": good_jpg[:80] + b"\0" * 100, "cls": b"1", "idx": b"5"})
    with pytest.raises(DaliDataError, match=r"corrupt\.tar, key 'k005'"):
        _run(tar, idx)
    tar, idx = _bad_shard(tmp_path, "nolabel", {"png": S.encode_array(np.zeros((4, 4), np.uint8)), "idx": b"5"})
    with pytest.raises(DaliDataError, match=r"nolabel\.tar, key 'k005'"):
        _run(tar, idx)
    tar, idx = _bad_shard(tmp_path, "trunc", {"png": S.encode_array(np.zeros((4, 4), np.uint8)), "cls": b"1",
                                              "idx": b"5"})
    with open(tar, "r+b") as f:
        f.truncate(os.path.getsize(tar) // 2)  # index still describes the whole tar
    with pytest.raises(DaliDataError, match=r"trunc\.tar, key 'k0\d\d'.*outside of the archive"):
        _run(tar, idx)
    with pytest.raises(ValueError, match="empty shard list"):
        DaliMultiCropLoader([], [], 10, 4, **SMALL)


def test_greyscale_cmyk_16bit_decode_as_rgb(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(buf, "PNG")
    for name, parts, expect in [("grey", {"jpg": _jpeg("L", 100)}, (100, 100, 100)),
                                ("cmyk", {"jpg": _jpeg("CMYK", (0, 0, 0, 0))}, (255, 255, 255)),
                                ("png16", {"png": buf.getvalue()}, (156, 156, 156))]:
        parts.update(cls=b"1", idx=b"5")
        tar, idx = _bad_shard(tmp_path, name, parts)
        out = list(DaliEvalLoader([tar], [idx], 8, resize=20, crop=20, normalize=False, device="cpu"))
        x, _, i = out[0]
        px = (x[i.tolist().index(5)] * 255).round().flatten(1).mean(1)
        assert torch.allclose(px, torch.tensor(expect, dtype=torch.float32), atol=3), (name, px)


def test_stale_index_is_refused(digits, tmp_path):
    sp = digits.split("test")
    shutil.copy(sp.tars[0], tmp_path / "a.tar")
    with pytest.raises(ValueError, match="stale"):
        DaliMultiCropLoader([str(tmp_path / "a.tar")], [sp.indexes[0]], sp.num_samples, 8, **SMALL)


def test_capped_epochs_continue_the_stream(digits):
    ld = _loader(digits, 100, num_local=0, max_steps_per_epoch=3)
    epochs = [torch.cat([b["index"] for b in ld]) for _ in range(6)]  # 1800 > 1437: crosses DALI's epoch end
    assert [len(e) for e in epochs] == [300] * 6 and len(ld) == 3
    first = torch.cat(epochs[:4])
    assert len(first.unique()) == len(first)  # 1200 samples of one pass, none twice
