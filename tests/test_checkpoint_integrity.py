"""Resume verifies a checkpoint's files against the SHA-256 its save recorded, before anything is loaded.

Through the real launcher (MAE pre-training on 2 ZeRO-3 ranks, whose DeepSpeed files are pickles DeepSpeed
loads with weights_only=False): a pickle payload swapped into the checkpoint is refused and never runs; a
changed byte, a missing file and a foreign file are refused, naming the file; an untouched checkpoint resumes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale_refiner.engine.checkpoint import CheckpointDir, CheckpointError
from scale_refiner.engine.distributed import DistContext, free_port
from test_mae import TINY

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class Payload:
    """Unpickling this runs ``touch MARKER``: what a tampered checkpoint file could do under weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def mae_run(out, *extra):
    cmd = [sys.executable, str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "launch/pretrain_mae.py"), "--config", "configs/demo_mae.yaml", f"run.out_dir={out}", *TINY,
           "engine.kind=deepspeed", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A 2-rank ZeRO-3 MAE run stopped after step 2 (its checkpoint is what the tests tamper with)."""
    out = tmp_path_factory.mktemp("stopped")
    proc = mae_run(out, "run.stop_after=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def checkpoint_copy(stopped, tmp_path):
    import shutil
    shutil.copytree(stopped, tmp_path / "run")
    point = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    return tmp_path / "run", point


def test_save_records_every_file(stopped):
    point = stopped / "checkpoints" / (stopped / "checkpoints" / "latest").read_text().strip()
    files = json.loads((point / "state.json").read_text())["files"]
    on_disk = sorted(p.relative_to(point).as_posix() for p in point.rglob("*") if p.is_file())
    assert sorted([*files, "state.json"]) == on_disk
    assert any(name.endswith("model_states.pt") for name in files)  # DeepSpeed's own pickles are covered
    assert all(len(h) == 64 for h in files.values())


def test_pickle_payload_is_refused_and_never_runs(stopped, tmp_path):
    run, point = checkpoint_copy(stopped, tmp_path)
    marker = tmp_path / "payload-ran"
    target = next(point.rglob("*model_states.pt"))  # DeepSpeed loads this with weights_only=False
    torch.save({"module": Payload(marker)}, target)
    proc = mae_run(run, "run.resume=auto")
    assert proc.returncode != 0
    assert "does not match what was saved" in proc.stderr and target.name in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()  # refused before any unpickling


@pytest.mark.parametrize("tamper", ["changed byte", "missing file", "foreign file"])
def test_changed_missing_or_foreign_files_are_refused(stopped, tmp_path, tamper):
    """In-process on one rank, the same check the launcher runs: each tampering is named."""
    _, point = checkpoint_copy(stopped, tmp_path)
    checkpoints = CheckpointDir(point.parent.parent, DistContext(0, 1, 0, torch.device("cpu")))
    checkpoints.check_files(point)  # untouched: accepted
    victim = sorted(p for p in point.rglob("*") if p.is_file() and p.name != "state.json")[0]
    if tamper == "changed byte":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 1
        victim.write_bytes(bytes(data))
        expect = "changed since the save"
    elif tamper == "missing file":
        victim.unlink()
        expect = "missing"
    else:
        victim = point / "extra.pt"
        victim.write_bytes(b"not from the save")
        expect = "foreign file"
    with pytest.raises(CheckpointError, match=expect) as err:
        checkpoints.check_files(point)
    assert victim.name in str(err.value)


def test_untouched_checkpoint_resumes(stopped, tmp_path):
    run, _ = checkpoint_copy(stopped, tmp_path)
    proc = mae_run(run, "run.resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "mae_pretrained.pth").is_file()
