"""The torch reference pipeline over webdataset shards: output dict, sharding, seeds, bad input."""
import io
import tarfile

import numpy as np
import pytest
import torch

from scale_refiner.data import shards as S
from scale_refiner.data.wds_pipeline import WdsEvalLoader, WdsMultiCropLoader

SMALL = dict(global_size=16, local_size=8, num_local=2)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_wds")
    S.make_shards("digits", out, samples_per_shard=40, seed=0, limit=240)
    return S.load_manifest(out)


def _loader(shard_set, batch, **kw):
    sp = shard_set.split("train")
    args = dict(SMALL, num_workers=0)
    args.update(kw)
    return WdsMultiCropLoader(sp.tars, sp.counts, batch, **args)


def test_output_dict_matches_dali_layout(digits):
    b = next(iter(_loader(digits, 20, normalize=False)))
    assert b["global"].shape == (2, 20, 3, 16, 16) and b["local"].shape == (2, 20, 3, 8, 8)
    assert b["global"].dtype == torch.float32 and b["label"].dtype == b["index"].dtype == torch.int64
    assert -1e-6 <= b["global"].min() and b["global"].max() <= 1.0 + 1e-6  # float rounding of the torch ops


def test_two_ranks_cover_every_sample_once(digits):
    n = digits.split("train").num_samples
    for epoch in range(2):
        seen = []
        for r in range(2):
            ld = _loader(digits, 32, rank=r, world=2, drop_last=False, num_workers=2)
            ld.epoch = epoch
            seen += torch.cat([b["index"] for b in ld]).tolist()
        assert sorted(seen) == list(range(n)), epoch
    lds = [_loader(digits, 32, rank=r, world=2, num_workers=2) for r in range(2)]
    per = [torch.cat([b["index"] for b in ld]) for ld in lds]
    assert len(per[0]) == len(per[1]) == len(lds[0]) * 32 and len(torch.cat(per).unique()) == 2 * len(per[0])


def test_views_do_not_depend_on_workers_and_seed_fixes_them(digits):
    def views(workers, seed, batches):
        ld = _loader(digits, 32, num_workers=workers, seed=seed, drop_last=False, num_local=0)
        out = {}
        for k, b in zip(range(batches), ld):
            for j, i in enumerate(b["index"].tolist()):
                out[i] = b["global"][:, j]
        return out
    a, b, c = views(2, 1, 100), views(0, 1, 2), views(2, 2, 100)
    assert len(a) == 240 and len(b) == 64
    assert all(torch.equal(a[i], b[i]) for i in b)
    assert not any(torch.equal(a[i], c[i]) for i in a)


def test_resume_skips_produced_batches(digits):
    ld = _loader(digits, 32, num_workers=2)
    it = iter(ld)
    first = [next(it) for _ in range(3)]
    state = ld.state_dict()
    rest = list(it)
    other = _loader(digits, 32, num_workers=2)
    other.load_state_dict(state)
    again = list(other)
    assert len(again) == len(rest) and len(first) + len(rest) == len(ld)
    assert all(torch.equal(x["index"], y["index"]) and torch.equal(x["local"], y["local"])
               for x, y in zip(rest, again))


def _tar(path, bad):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for i in range(6):
            parts = {"png": S.encode_array(np.full((10, 10), i, np.uint8)), "cls": b"2", "idx": str(i).encode()}
            if i == 3:
                parts = bad
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize("case", ["corrupt", "nolabel", "truncated"])
def test_bad_input_raises_naming_shard_and_key_or_skips(tmp_path, case):
    png = S.encode_array(np.zeros((10, 10), np.uint8))
    bad = {"corrupt": {"png": png[:30], "cls": b"2", "idx": b"3"},
           "nolabel": {"png": png, "idx": b"3"},
           "truncated": {"png": png, "cls": b"2", "idx": b"3"}}[case]
    path = _tar(tmp_path / "b-00000.tar", bad)
    if case == "truncated":
        with open(path, "r+b") as f:
            f.truncate(3 * 3072 + 700)  # in the middle of sample s3 (3 members of 2 blocks each per sample)
    ld = WdsMultiCropLoader([path], [6], 2, drop_last=False, num_workers=0, shuffle=False, **SMALL)
    key = "s3" if case != "truncated" else ""
    with pytest.raises(S.ShardError, match=rf"b-00000\.tar.*{key}"):
        list(ld)
    ld = WdsMultiCropLoader([path], [6], 2, drop_last=False, num_workers=2, shuffle=False, on_error="skip",
                            **SMALL)
    got = torch.cat([b["index"] for b in ld]).tolist()
    assert ld.skipped.value >= 1 and 3 not in got and {0, 1} <= set(got)


def test_empty_shard_list_and_eval_loader(digits):
    with pytest.raises(S.ShardError, match="empty shard list"):
        WdsMultiCropLoader([], [], 4)
    sp = digits.split("test")
    xs, ys, idx = zip(*WdsEvalLoader(sp.tars, 64, resize=16, crop=12, num_workers=0))
    assert torch.cat(xs).shape == (sp.num_samples, 3, 12, 12)
    assert sorted(torch.cat(idx).tolist()) == list(range(sp.num_samples))
