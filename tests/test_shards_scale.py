"""make_shards at scale: folder and tar sources read lazily by the shard workers give the very tars and manifest
of the earlier writer, which held every image in memory (stored hashes); any number of workers gives the same
set; an interrupted conversion, killed for real, resumes without rewriting its finished shards."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scale_refiner.data import shards as S
from shard_sources_fixture import cases, png_bytes

ROOT = Path(__file__).resolve().parents[1]

# Written by the in-memory writer (the commit before the shard workers) for tests/shard_sources_fixture.py's
# cases, whose source bytes are the same on every machine.
EARLIER_WRITER = {  # case: the tars' SHA-256 and that of the manifest (sorted keys, temporary path left out)
    'folder-fraction': dict(manifest='6febd4d4deb06acf1a0fd7db603f90db6b2f44f80750531f45daaab2cc7f9ed2', tars={
        'test-00000.tar': 'cc8228660732950da2c2ef1857e4d26f1ce327b2bc3c3eb509825c5a3e8452af',
        'test-00001.tar': '67128fa72e8918b1d1724709fb8e4ca3290184359e0849102175c027c5d86046',
        'test-00002.tar': 'ee796b63af9b94a9e109bd02d25cf9f79e10a6cd27632de26e9e793bb38841a3',
        'train-00000.tar': 'f70c8340b3e8d80a786deb73ad46b80501cc9f50c6e3f295223d4cc19f5f2ed9',
        'train-00001.tar': 'dea1ece70600f4666ba33228e132036d6d918ae63cdb29dfea862a917e273e6d',
        'train-00002.tar': 'aaead7d65574d6c2e606734b517787911d85053a0eca9aa75a8a32150f8a7929',
        'train-00003.tar': '75cc8ef2c95b685d9d9a547790fdf41a598cd587f65fec79fb663a9ebbf62cb9',
        'train-00004.tar': 'fdcbf6403d08376af75ae685bb9264d359926cb9b4d8d991ef0fb7950d636f35',
        'train-00005.tar': 'b9150c1dd9beecd0c63b40947928d6673d1a3e625d2ca30e9fe2f98adfa3325d',
    }),
    'folder-png': dict(manifest='645a5bc7d42fdd2b92ebeaf26692603aaf9c5f0803a2e1a2d0a1a29fa522159e', tars={
        'train-00000.tar': '6721b723070d7404c5c40fad79fb71873219c275ab51fb3f5d7a9d5516d41da6',
        'train-00001.tar': '9654a05e1f010349252afe6ae71221bee19b19ce5dce0723247d3befbe1c3439',
        'train-00002.tar': '5223222b62746b91acffb821cfbaba2d925b35a997b6899bfe45d74289d56043',
        'train-00003.tar': 'd62d2ebad5b421914958aba0eda4fff1ab32827a6ba6a8e2e08cba7b2962c348',
    }),
    'split': dict(manifest='a2ba0a57a01d26692d502f1b68a7f4a550c5ae95fb5b0cd114d2b3dd22756329', tars={
        'test-00000.tar': 'b1fc9f1da232ec7255e5a15062bb3864735eee9450566310b03bda1f34de9bed',
        'test-00001.tar': '38a43e5e7106214caf3aafb2fb7ee7e9376db56870bbcdbf67e7d1dc4146f1c8',
        'train-00000.tar': '7e389537b59413bdb04993fb613a03f01845d75ec6463bf3a5295f09b7913876',
        'train-00001.tar': '8fd1a0a605ddc7994b93bef74e7880a3fc0f2e464f4af6fc2947e8c4bf70771a',
        'train-00002.tar': 'd51f42e4d45321d30299ca1e29cb41d9895ec8bb5f95fd78c99b2d9cfbbd12df',
        'train-00003.tar': '9901095745d9d9c80011b4ad9b641708e155be05c4f39398401d91343c9d5c1e',
        'train-00004.tar': '242aa625d713df1cde068e8586434852f4838eb71edd7efac84bf6ab5592e381',
        'train-00005.tar': 'd8bd11e66e38fc31ebdc701b23270beb31a936225c8c1bc7fb0f994e3dca4694',
    }),
    'split-limit': dict(manifest='04ad87dea4db4c31ba18f0a3762f40b84aa209c0a7e7c86651525a9e9bf4d09d', tars={
        'test-00000.tar': 'f28e173049082f09e598d777b05c8f5ab600bd7fcf29758cdec9e5ec3033fcdc',
        'test-00001.tar': '876e8f0e98b7c11c30d325d194c72a8d1ed95e9baf1b5b86f0ac26ce8689c911',
        'train-00000.tar': '15fc15bfe4e0f1303373200368eef38c57e15d6aac17592571cf528304ccaf0b',
        'train-00001.tar': '3f5c559b0c14efbadae9bf99017d8dc8ae77146656d60070bbee6fde3b962b43',
    }),
    'tars': dict(manifest='0c1cbb1034922ede244845a8bde85f1b4b3a22764b8670e9aff31063ece67d58', tars={
        'test-00000.tar': '2d844a4f77d0f8812b932f7c1d5c2cd326f8f8dc6052a9923b1f4b853c165640',
        'test-00001.tar': '21e4ab0dce5ffd3c3c86bbf3426e5d183a3fd5025c56a5868959f9e41a6ff3ed',
        'train-00000.tar': '3e7267bff2b840c3040bdda5ba8419fb65f487a052b586fa21c4ce827e0f584e',
        'train-00001.tar': 'ca826b51d38e10031683d4265801d3f38af909801ffd2ff566b9169cdcc0a87e',
        'train-00002.tar': 'b28349652ba745c27c3b4764fbf73336cdc2ef323b6955835e385f5ff3aec978',
        'train-00003.tar': '7822db49b033773760d49fea55fee6a1044de82697fd43326c1cdf280d6d508e',
    }),
    'tars-limit': dict(manifest='ef3d0e8c897412448e8d19a8868b1b6290848df4144d52420ea97d610020ea9e', tars={
        'test-00000.tar': '288ffba77c890a30fef5de9e61e1fcf0aeb3aa850c910ade33d7c2416a7cd596',
        'test-00001.tar': 'e830a7a69dc275db1fe748ad44cbe6325c6ca0857813ff045060dc76c6d2abf0',
        'train-00000.tar': '65038e506a2efacd5897e45e0f697e5445147c1ff7ddc8c694718cd1d49735a6',
        'train-00001.tar': 'dc9f7dacca06511191fa3900d5827bf66d6012890c0e177c2f7c1394ba1c7dcf',
    }),
}


def _digest(out: Path, tmp: Path) -> dict:
    m = json.loads((out / S.MANIFEST).read_text())
    tars = {r["tar"]: r["sha256"] for s in m["splits"].values() for r in s["shards"]}
    for name, sha in tars.items():
        assert S.sha256_file(out / name) == sha, name
    text = json.dumps(m, sort_keys=True).replace(str(tmp), "<tmp>")
    return dict(tars=tars, manifest=hashlib.sha256(text.encode()).hexdigest())


@pytest.mark.parametrize("workers", [1, 2])
def test_lazy_sources_write_the_earlier_writers_tars_and_manifest(tmp_path, workers):
    # folders and tars with unreadable images (--skip-bad), a truncated tar, a sample without label, --limit
    # and --test-fraction: what is skipped, the numbering and the seeded order are as before, byte for byte
    for name, kwargs in cases(tmp_path):
        out = tmp_path / "out" / name
        S.make_shards(out=out, workers=workers, **kwargs)
        assert _digest(out, tmp_path) == EARLIER_WRITER[name], name


def test_a_changed_seed_or_a_damaged_shard_is_written_again(tmp_path):
    (case, kwargs), = [c for c in cases(tmp_path) if c[0] == "split"]
    out = tmp_path / "out"
    S.make_shards(out=out, **dict(kwargs, seed=9))
    S.make_shards(out=out, **kwargs)  # the other seed's shards hold other samples: none is kept
    assert _digest(out, tmp_path) == EARLIER_WRITER[case]
    damaged = out / "train-00001.tar"
    damaged.write_bytes(damaged.read_bytes()[:-1024])  # a tar cut short after its .done was written
    notes = []
    S.make_shards(out=out, log=notes.append, **kwargs)
    assert any(n.startswith("resuming: 7 of 8 shards") for n in notes), notes
    assert _digest(out, tmp_path) == EARLIER_WRITER[case]


def _class_folder(root: Path, classes: int, per_class: int) -> Path:
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"c{c:02d}" / f"{i:04d}.png").write_bytes(png_bytes(1000 * c + i, size=16))
    return root


def _files(out: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()
            if p.suffix in (".tar", ".idx", ".done")}


def test_a_killed_conversion_resumes_without_rewriting_finished_shards(tmp_path):
    src = _class_folder(tmp_path / "src", classes=10, per_class=400)
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "launch" / "make_shards.py"), "--source", f"folder:{src}", "--out",
               str(out), "--samples-per-shard", "40", "--test-fraction", "0.1", "--seed", "7", "--workers", "2",
               "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)  # its own process group: the kill takes its workers too
    deadline = time.monotonic() + 60
    while job.poll() is None and len(list(out.glob("*.done"))) < 6 and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(job.pid, signal.SIGKILL)
    log = job.communicate()[0].decode()
    assert job.returncode == -signal.SIGKILL, f"the conversion ended before it was killed:\n{log}"
    assert not (out / S.MANIFEST).exists()
    finished = {name: v for name, v in _files(out).items() if (out / name).with_suffix(".done").exists()}
    assert len(finished) >= 18 and len(list(out.glob("*.tar"))) < 100, sorted(finished)
    (out / ".train-00099.tar.abc123.tmp").write_bytes(b"partial")  # as a kill inside a write leaves one

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming: {len(finished) // 3} of 100 shards" in again.stdout, again.stdout
    assert "files/s" in again.stdout
    now = _files(out)
    assert {name: now[name] for name in finished} == finished  # the same files: not rewritten, not touched
    assert not list(out.glob(".*.tmp"))  # the killed run's partial files are gone
    shard_set = S.load_manifest(out, verify="sha256")
    assert shard_set.split("train").num_samples == 3600 and shard_set.split("test").num_samples == 400

    clean = tmp_path / "clean"
    S.make_shards(f"folder:{src}", clean, samples_per_shard=40, test_fraction=0.1, seed=7)
    listed = sorted(p.name for p in clean.iterdir() if p.suffix in (".tar", ".idx"))
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".tar", ".idx")) == listed
    for name in listed:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert (out / S.MANIFEST).read_text() == (clean / S.MANIFEST).read_text()
