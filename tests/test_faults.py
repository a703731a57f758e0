"""Faults injected into real runs, through the launchers users run (2 CPU ranks, gloo), and what each leaves.

- SIGTERM to the ``deepspeed`` launcher mid-stage (what Slurm and Kubernetes send before a kill): every rank
  finishes its step, writes a checkpoint and leaves; ``run.resume=auto`` then ends bit-identical to a run that
  was never stopped. A single process leaves with status 75 (``EXIT_PREEMPTED``).
- ``run.save_every_minutes``: checkpoints taken by the clock, agreed by the ranks.
- A diverging run (``base_lr=1e9``) stops at the first non-finite step on every rank with a message naming the
  step and the values; no checkpoint, ``latest`` or export after it.
- A stalled rank (SIGSTOP) ends the job within ``run.timeout_minutes`` plus the launcher's grace, with the
  other rank's stack or the collective's timeout in the log.
- A checkpoint file carrying a pickle payload, hashes made consistent (a "foreign" checkpoint), is refused
  before anything is unpickled, and the payload never runs; DCP's ``.metadata`` the same.
- A changed global batch or engine on resume is refused naming the key; ``run.resume_allow_changes`` allows it.
- Known faults are one ``error:`` line with a fixed status, no traceback: an unwritable output (74, the file
  named), a YAML tag with no constructor (2), weights of another model size (2), a bare ``make_shards --source``
  path (2, told its ``folder:`` prefix); sizes in the unit that fits.

Elsewhere: SIGKILL mid-step / bit-identical resume (test_launchers), mid-save atomicity and changed files
(test_checkpoint_integrity), truncated tars (test_shards_faults), one run per directory and killed launchers
(test_run_lock).
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from scale_refiner.engine.checkpoint import CheckpointError, refuse_unsafe_pickle, refuse_unsafe_pickles
from scale_refiner.engine.distributed import free_port
from scale_refiner.engine.run_control import EXIT_PREEMPTED
from scale_refiner.atomic import sha256_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REFINE = str(ROOT / "launch/refine.py")
TINY = ["model.name=vit_test_patch4", "heads.blocks=[1,2]", "heads.proj_hidden_dim=64", "heads.proj_out_dim=16",
        "heads.pred_hidden_dim=64", "queue.size=256", "augment.num_local=2", "data.batch_size=16",
        "data.num_workers=0", "run.log_every=1", "heads.norm=syncbn", "model.freeze_blocks=1",
        "engine.zero_config=ds_configs/cpu_demo.json", "data.pipeline=memory", "stages.run=[refine]",
        "data.samples_per_epoch=48", "stages.refine.warmup_epochs=0.5", "stages.refine.ema=0.9"]
LONG = ["stages.refine.epochs=30"]  # 90 steps: long enough to be signalled in the middle
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def command(kind, out, extra):
    args = [REFINE, "--config", "configs/demo.yaml", "--eval-samples", "0", f"run.out_dir={out}"] + TINY + extra
    if kind == "single":
        return [sys.executable] + args + ["engine.kind=single"]
    if kind == "deepspeed":
        return [sys.executable, str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())] \
            + args + ["engine.kind=deepspeed"]
    return [sys.executable, str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())] \
        + args + ["engine.kind=fsdp2"]


def run(kind, out, extra, timeout=600):
    """The job to its end. On a timeout the whole session goes (launcher and ranks): subprocess.run would kill
    the launcher alone and leave its ranks running (seen on a loaded box: orphans computing for an hour)."""
    proc = subprocess.Popen(command(kind, out, extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def start(kind, out, extra, log):
    """In a session of its own, like a job under Slurm or a terminal: a signal to its process group reaches the
    launcher and every rank (the ``deepspeed`` runner alone passes on nothing on a single node)."""
    return subprocess.Popen(command(kind, out, extra), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=ENV,
                            start_new_session=True)


def command_line_value(proc, flag):
    args = proc.args
    return args[args.index(flag) + 1]


def job_processes(proc):
    return [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)


def end_of(processes, timeout):
    """Wait until every process of the job is gone; kill what is left after ``timeout`` (then fail)."""
    gone, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        process.send_signal(signal.SIGCONT)
        process.kill()
    assert not alive, f"{len(alive)} processes of the job were still there after {timeout} s"


def logged_steps(out):
    path = Path(out) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def wait_for_step(proc, out, step, timeout=300):
    deadline = time.monotonic() + timeout
    while logged_steps(out) < step:
        assert proc.poll() is None, "the run ended before it could be signalled"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)


def end_state(out):
    return torch.load(Path(out) / "checkpoints/refine-end/model_state.pt", weights_only=True)


def assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for key in a:
        x, y = (a[key]["generator"], b[key]["generator"]) if isinstance(a[key], dict) else (a[key], b[key])
        assert torch.equal(x, y), key


# ------------------------------------------------------------------------------------------- preemption
def test_sigterm_checkpoints_and_exits_75_in_one_process(tmp_path):
    with open(tmp_path / "log", "w") as log:
        proc = start("single", tmp_path, LONG, log)
        wait_for_step(proc, tmp_path, 3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == EXIT_PREEMPTED
    text = (tmp_path / "log").read_text()
    assert "SIGTERM received" in text
    tag = (tmp_path / "checkpoints/latest").read_text()
    state = json.loads((tmp_path / "checkpoints" / tag / "state.json").read_text())
    assert tag == f"refine-{state['step']:07d}" and state["step"] == logged_steps(tmp_path) >= 3
    assert not state["stage_done"] and not (tmp_path / "export").exists()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The long ZeRO-3 run on 2 ranks, never interrupted: what every interrupted-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("straight")
    proc = run("deepspeed", out, LONG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_sigterm_to_the_deepspeed_launcher_then_resume_is_bit_identical(straight, tmp_path):
    stopped = tmp_path / "stopped"
    with open(tmp_path / "log", "w") as log:
        proc = start("deepspeed", stopped, LONG, log)
        wait_for_step(proc, stopped, 3)
        processes = job_processes(proc)
        # on the way: a single-node job's rank sockets listen on loopback only, but for the rendezvous store
        port = int(command_line_value(proc, "--master_port"))
        listening = [c.laddr for p in processes for c in p.net_connections(kind="tcp") if c.status == "LISTEN"]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening if addr.port != port), listening
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher, and both ranks
        end_of(processes, timeout=120)
    text = (tmp_path / "log").read_text()
    assert "SIGTERM received" in text, text[-3000:]
    tag = (stopped / "checkpoints/latest").read_text()
    step = json.loads((stopped / "checkpoints" / tag / "state.json").read_text())["step"]
    assert 3 <= step < 90 and not (stopped / "checkpoints/refine-end").exists()
    proc = run("deepspeed", stopped, LONG + ["run.resume=auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_equal_states(end_state(straight), end_state(stopped))


@pytest.mark.parametrize("when", ["mid-step", "mid-save"])
def test_sigkill_of_a_rank_ends_the_job_and_resume_is_bit_identical(straight, tmp_path, when):
    """SIGKILL (no chance to save) of one rank: the launcher ends the job within seconds; ``latest`` names a
    complete checkpoint even when the kill lands inside a save; resuming from it ends bit-identical."""
    killed = tmp_path / "killed"
    with open(tmp_path / "log", "w") as log:
        proc = start("deepspeed", killed, LONG + ["run.save_every=4"], log)
        wait_for_step(proc, killed, 10 if when == "mid-step" else 6)
        processes = job_processes(proc)
        victim = next(p for p in processes if p.environ().get("RANK") == "0" and "refine.py" in " ".join(p.cmdline()))
        if when == "mid-save":  # the moment the next save's temporary directory appears
            pending = killed / "checkpoints/.tmp-refine-0000008"
            deadline = time.monotonic() + 120
            while not pending.exists():
                assert time.monotonic() < deadline and proc.poll() is None, "the save never started"
            victim.kill()
            assert not (killed / "checkpoints/refine-0000008/state.json").exists()  # killed before its end
        else:
            victim.kill()
        killed_at = time.monotonic()
        end_of(processes, timeout=90)
        assert time.monotonic() - killed_at < 60
    tag = (killed / "checkpoints/latest").read_text()
    if when == "mid-save":
        assert tag == "refine-0000004"
    else:  # killed at step 10 or a little later (a slow box): the newest periodic checkpoint before it
        assert tag.startswith("refine-") and int(tag[-7:]) >= 8 and int(tag[-7:]) % 4 == 0, tag
    proc = run("deepspeed", killed, LONG + ["run.save_every=4", "run.resume=auto"])  # hashes verified first
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_equal_states(end_state(straight), end_state(killed))


def test_deepspeed_engine_without_a_launcher_runs_as_one_rank(tmp_path):
    """``python launch/refine.py engine.kind=deepspeed``: a 1-rank group, not DeepSpeed's MPI discovery."""
    cmd = command("single", tmp_path, ["stages.refine.epochs=1"])[:-1] + ["engine.kind=deepspeed"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0 and "mpi4py" not in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints/refine-end/state.json").is_file()


def test_save_every_minutes_checkpoints_by_the_clock(tmp_path):
    # 0.00001 min (0.6 ms): due at every step. The ranks agree (rank 0's clock); periodic ones are pruned to 2.
    proc = run("deepspeed", tmp_path, ["stages.refine.epochs=2", "run.save_every_minutes=0.00001"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    tags = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["refine-0000004", "refine-0000005", "refine-end"]


# ------------------------------------------------------------------------------------------- divergence
def test_divergence_stops_every_rank_and_saves_nothing_after_it(tmp_path):
    proc = run("deepspeed", tmp_path, ["stages.refine.epochs=2", "stages.refine.base_lr=1e9",
                                       "run.save_every=1", "run.log_every=3"])
    assert proc.returncode != 0
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: stage refine, step")]
    assert error and "non-finite" in error[0], proc.stderr[-3000:]
    bad_step = int(error[0].split("step ")[1].split(":")[0])
    # every checkpoint written is from before the first non-finite step, and holds finite weights
    for state_file in (tmp_path / "checkpoints").glob("*/state.json"):
        assert json.loads(state_file.read_text())["step"] < bad_step
    for ema in (tmp_path / "checkpoints").glob("*/ema.pt"):
        assert all(torch.isfinite(t).all() for t in torch.load(ema, weights_only=True).values())
    assert not (tmp_path / "export").exists() and not (tmp_path / "checkpoints/refine-end").exists()


def test_export_refuses_non_finite_weights(tmp_path):
    from scale_refiner.config import load_config
    from scale_refiner.models.vit import build_vit
    from scale_refiner.models.weights import export_timm
    cfg = load_config(ROOT / "configs/demo.yaml", ["model.name=vit_test_patch4", "heads.blocks=[1,2]"])
    model = build_vit(cfg.model)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="blocks.1.mlp.fc1.weight"):
        export_timm(model, tmp_path, "online")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ stalled rank
def test_a_stalled_rank_ends_the_job_within_the_timeout(tmp_path):
    timeout_s = 15
    with open(tmp_path / "log", "w") as log:
        proc = start("deepspeed", tmp_path, LONG + [f"run.timeout_minutes={timeout_s / 60}"], log)
        wait_for_step(proc, tmp_path, 2)
        processes = job_processes(proc)
        victim = next(p for p in processes if p.environ().get("RANK") == "1" and "refine.py" in " ".join(p.cmdline()))
        victim.send_signal(signal.SIGSTOP)
        stalled = time.monotonic()
        end_of(processes, timeout=timeout_s + 90)  # the timeout, then the launcher's 30 s grace before its SIGKILL
        took = time.monotonic() - stalled
    print(f"stalled rank: the job ended {took:.0f} s after the SIGSTOP (timeout {timeout_s} s)")
    text = (tmp_path / "log").read_text()
    assert proc.returncode != 0
    assert took < timeout_s + 60, took
    # rank 0 reported where it was: the watchdog's dump of every thread, or the collective's own timeout
    assert "most recent call first" in text or "imed out" in text, text[-3000:]


# ------------------------------------------------------------------------------------------ pickle payloads
class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_deepspeed_checkpoint_with_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    proc = run("deepspeed", tmp_path, ["stages.refine.epochs=2", "run.stop_after=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    point = tmp_path / "checkpoints/refine-0000002"
    victim = point / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "PAYLOAD_RAN"
    state = torch.load(victim, weights_only=False)
    state["extra"] = Payload(marker)
    torch.save(state, victim)
    # a consistent forgery: the recorded hashes are made to match, so only the weights-only check can stop it
    record = json.loads((point / "state.json").read_text())
    record["files"][victim.name] = sha256_file(victim)
    (point / "state.json").write_text(json.dumps(record))
    proc = run("deepspeed", tmp_path, ["stages.refine.epochs=2", "run.resume=auto"])
    assert proc.returncode != 0
    assert victim.name in proc.stderr and "refused" in proc.stderr, proc.stderr[-3000:]
    assert "os.system" in proc.stderr or "posix.system" in proc.stderr
    assert not marker.exists()


def test_weights_only_check_allows_the_deepspeed_types_and_refuses_others(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from scale_refiner.engine.zero import _deepspeed_checkpoint_types
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "w": torch.ones(3)}, good)
    torch.save({"w": torch.ones(3), "x": Payload(tmp_path / "ran")}, bad)
    refuse_unsafe_pickles([good], _deepspeed_checkpoint_types())
    with pytest.raises(CheckpointError, match="bad.pt"):
        refuse_unsafe_pickles([good, bad], _deepspeed_checkpoint_types())
    with pytest.raises(CheckpointError, match="good.pt"):  # the DeepSpeed type is not allowed by default
        refuse_unsafe_pickles([good])
    assert not (tmp_path / "ran").exists()


def test_dcp_metadata_with_a_payload_is_refused(tmp_path):
    from scale_refiner.engine.fsdp import _dcp_metadata_class
    from torch.distributed.checkpoint.metadata import Metadata
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_bytes(pickle.dumps(Metadata(state_dict_metadata={})))
    bad.write_bytes(pickle.dumps([Metadata(state_dict_metadata={}), Payload(tmp_path / "ran")]))
    refuse_unsafe_pickle(good, _dcp_metadata_class)
    with pytest.raises(CheckpointError, match="system"):
        refuse_unsafe_pickle(bad, _dcp_metadata_class)
    # a dotted name: protocol 4 resolves "os.system" as an attribute path from an allowed DCP module
    dotted = tmp_path / "dotted"
    module, name, arg = b"torch.distributed.checkpoint.filesystem", b"os.system", f"touch {tmp_path / 'ran'}".encode()
    dotted.write_bytes(b"\x80\x04" + b"\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)]) + name
                       + b"\x93" + b"\x8c" + bytes([len(arg)]) + arg + b"\x85R.")
    with pytest.raises(CheckpointError, match="os.system"):
        refuse_unsafe_pickle(dotted, _dcp_metadata_class)
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------------------------------------ changed resume
def test_resume_refuses_a_changed_batch_or_engine_unless_allowed(tmp_path):
    proc = run("single", tmp_path, ["stages.refine.epochs=2", "run.stop_after=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run("single", tmp_path, ["stages.refine.epochs=2", "run.resume=auto", "data.batch_size=8"])
    assert proc.returncode == 2 and "data.batch_size = 16" in proc.stderr and "has 8" in proc.stderr, proc.stderr
    proc = run("fsdp2", tmp_path, ["stages.refine.epochs=2", "run.resume=auto"])
    assert proc.returncode != 0 and "engine.kind = single" in proc.stderr, proc.stderr[-3000:]
    proc = run("single", tmp_path, ["stages.refine.epochs=2", "run.resume=auto", "data.batch_size=8",
                                    "run.resume_allow_changes=[data.batch_size,schedule]"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "allowed by run.resume_allow_changes" in proc.stderr


# ------------------------------------------------------------------------------------------ skipped samples
def test_skipped_bad_samples_are_counted_in_the_log_metrics_and_results(tmp_path):
    import tarfile
    from scale_refiner.data import shards as S
    S.make_shards("digits", tmp_path / "shards", samples_per_shard=40, seed=0, limit=240)
    manifest = S.load_manifest(tmp_path / "shards")
    tar = manifest.split("train").tars[0]
    with tarfile.open(tar) as archive:  # two images of the first shard overwritten in place: same size, bad
        images = [m for m in archive.getmembers() if m.name.endswith(".png")][:2]
    with open(tar, "r+b") as handle:
        for member in images:
            handle.seek(member.offset_data)
            handle.write(b"\0" * member.size)
    extra = ["stages.refine.epochs=1", "data.pipeline=wds", f"data.train_shards={tmp_path / 'shards'}",
             "data.dataset=digits",
             "data.on_error=skip", "data.samples_per_epoch=0", "data.num_workers=1",  # the whole split
             "data.max_skipped_fraction=0.1"]
    proc = run("single", tmp_path / "run", extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = [json.loads(line)["data/skipped_samples"]
              for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert counts[-1] >= 2 and counts == sorted(counts)  # (a later epoch may meet them again)
    assert "samples lost so far to unreadable data" in proc.stderr
    assert f"shard {tar}: 1 sample(s) lost" in proc.stderr  # named once, by the rank that reads it
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["refine_last"]["data/skipped_samples"] == counts[-1]
    assert results["data_lost"] == {tar: counts[-1]}


def test_an_unreadable_shard_counts_all_its_samples_and_past_the_limit_stops_the_run(tmp_path):
    """One shard of six replaced by random bytes: under skip every one of its samples counts (not one error), the
    shard is named in the log and results.json, the short epoch says so; past data.max_skipped_fraction (default
    1 %) the run stops with one line naming the shard."""
    from scale_refiner.data import shards as S
    S.make_shards("digits", tmp_path / "shards", samples_per_shard=40, seed=0, limit=240)
    split = S.load_manifest(tmp_path / "shards").split("train")
    bad, count = split.tars[0], split.counts[0]
    Path(bad).write_bytes(os.urandom(Path(bad).stat().st_size))
    extra = ["stages.refine.epochs=1", "data.pipeline=wds", f"data.train_shards={tmp_path / 'shards'}",
             "data.dataset=digits", "data.on_error=skip", "data.samples_per_epoch=0", "data.num_workers=1",
             "data.verify_shards=none", "data.batch_size=32"]
    proc = run("single", tmp_path / "tolerated", extra + ["data.max_skipped_fraction=0.5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"shard {bad}: {count} sample(s) lost" in proc.stderr
    results = json.loads((tmp_path / "tolerated/results.json").read_text())
    assert results["data_lost"] == {bad: count} and results["refine_last"]["data/skipped_samples"] == count
    proc = run("single", tmp_path / "stopped", extra)
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"{bad} ({count})" in error[0] and "data.max_skipped_fraction=0.01" in error[0]


# ------------------------------------------------------------------------------------------------ full disk
def test_a_full_disk_is_reported_and_the_partial_checkpoint_removed(tmp_path):
    import errno
    from scale_refiner.engine.checkpoint import CheckpointDir
    from scale_refiner.engine.distributed import DistContext

    class Engine:
        def __init__(self, fail):
            self.fail = fail

        def save(self, directory):
            (directory / "shard.pt").write_bytes(b"x" * 1000)
            if self.fail:  # what DeepSpeed's write meets on a full disk
                raise OSError(errno.ENOSPC, "No space left on device")

    ctx = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    checkpoints = CheckpointDir(tmp_path, ctx)
    checkpoints.save("refine-0000001", Engine(False), {"step": 1}, {})
    with pytest.raises(CheckpointError, match=r"no space left on the device of .*checkpoints.*needs about "
                                              r"[0-9.]+ KB \(the size of refine-0000001\)"):
        checkpoints.save("refine-0000002", Engine(True), {"step": 2}, {})
    assert not (tmp_path / "checkpoints/.tmp-refine-0000002").exists()
    assert (tmp_path / "checkpoints/latest").read_text() == "refine-0000001"


# ------------------------------------------------------------------------------------------- the guard itself
def _guard_on_two_ranks(rank, world):
    from scale_refiner.engine.distributed import DistContext
    from scale_refiner.engine.divergence import DivergenceError, NonFiniteGuard
    guard = NonFiniteGuard(DistContext(rank, world, rank, torch.device("cpu")), "refine")
    for step in range(1, 6):  # rank 1 alone sees a NaN head loss at step 3, an inf norm at step 4
        nan = rank == 1 and step == 3
        guard.observe(step, {"block1/loss": torch.tensor(float("nan") if nan else 1.0), "loss": torch.tensor(1.0),
                             "grad_norm": float("inf") if rank == 1 and step == 4 else None})
        if step == 2:
            guard.check()  # nothing yet: passes on both ranks
    try:
        guard.check()
    except DivergenceError as err:
        return str(err)
    return None


def test_the_guard_agrees_on_the_first_bad_step_over_ranks(gloo):
    message = gloo(_guard_on_two_ranks, 2)  # rank 0's message: it saw nothing itself, and still stops
    assert message.startswith("stage refine, step 3: non-finite values on another rank"), message
    from scale_refiner.engine.distributed import DistContext
    from scale_refiner.engine.divergence import DivergenceError, NonFiniteGuard
    guard = NonFiniteGuard(DistContext(0, 1, 0, torch.device("cpu")), "heads")
    guard.observe(7, {"block1/loss": torch.tensor(float("nan")), "loss": torch.tensor(float("nan")),
                      "grad_norm": torch.tensor(1.0)})
    with pytest.raises(DivergenceError, match=r"stage heads, step 7: non-finite block1/loss, loss on rank 0"):
        guard.check()


def _guard_with_a_dtensor_norm(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from scale_refiner.engine.distributed import DistContext
    from scale_refiner.engine.divergence import DivergenceError, NonFiniteGuard
    mesh = init_device_mesh("cpu", (world,))
    guard = NonFiniteGuard(DistContext(rank, world, rank, torch.device("cpu")), "refine")
    for step, norm in ((1, 1.0), (2, float("inf"))):  # FSDP2's clip_grad_norm_ gives a replicated DTensor
        guard.observe(step, {"loss": torch.tensor(1.0),
                             "grad_norm": distribute_tensor(torch.tensor(norm), mesh, [Replicate()])})
    try:
        guard.check()
    except DivergenceError as err:
        return str(err)


def test_the_guard_reads_fsdp2_s_dtensor_norm(gloo):
    assert gloo(_guard_with_a_dtensor_norm, 2).startswith("stage refine, step 2: non-finite grad_norm on rank 0")


# ---------------------------------------------------------------------------------------- one-line errors
def test_known_faults_are_one_line_with_a_fixed_status(capsys, monkeypatch):
    import errno
    from scale_refiner.cli.args import DEBUG_ENV, EXIT_IO, EXIT_USAGE, run_reporting_faults
    from scale_refiner.models.weights import WeightsError

    def failing(err):
        def run(argv):
            raise err
        return run

    cases = [(PermissionError(errno.EACCES, "Permission denied", "/runs/a/metrics.jsonl"), EXIT_IO,
              "error: Permission denied: /runs/a/metrics.jsonl"),
             (OSError(errno.ENOSPC, "No space left on device"), EXIT_IO, "error: no space left on the device"),
             (WeightsError("cannot load w.pth (format 'mae') into VisionTransformer"), EXIT_USAGE,
              "error: cannot load w.pth")]
    for err, status, line in cases:
        assert run_reporting_faults(failing(err)) == status
        stderr = capsys.readouterr().err
        assert stderr.startswith(line) and len(stderr.splitlines()) == 1, stderr
    monkeypatch.setenv(DEBUG_ENV, "1")  # the traceback, for a bug report
    with pytest.raises(PermissionError):
        run_reporting_faults(failing(cases[0][0]))


def test_a_yaml_constructor_error_exits_2(tmp_path, capsys):
    from scale_refiner.cli.refine import main
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: !!python/object:os.system x\n")
    assert main(["--config", str(bad)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"error: config file {bad} is not valid YAML: could not determine a constructor")
    assert len(stderr.splitlines()) == 1


def test_make_shards_of_a_bare_path_names_the_prefix(tmp_path, capsys):
    from scale_refiner.cli.make_shards import main
    assert main(["--source", str(tmp_path)]) == 2
    stderr = capsys.readouterr().err
    assert f"--source folder:{tmp_path}" in stderr and len(stderr.splitlines()) == 1, stderr


def test_weights_of_another_model_size_are_one_message_and_status_2(tmp_path):
    proc = subprocess.run([sys.executable, REFINE, "--config", "configs/demo.yaml", "--eval-samples", "0",
                           f"run.out_dir={tmp_path}", "model.weights=weights/demo_mae/mae_pretrained.pth",
                           "engine.kind=single"] + TINY, cwd=ROOT, capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: cannot load weights/demo_mae/mae_pretrained.pth"), proc.stderr[:2000]


def test_a_stop_during_the_final_evaluation_keeps_the_exports_and_resume_evaluates(tmp_path, monkeypatch):
    """SIGTERM while the final k-NN runs (after training): the exports are already written, the evaluation stops at
    the next encoder, results.json says so with what was measured, status 75; the same command with
    run.resume=auto trains nothing and evaluates both encoders."""
    from scale_refiner.cli import refine
    from scale_refiner.engine.run_control import uninstall_stop_signals
    original, calls = refine.knn_of_state, []

    def signalled_knn(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the online encoder's final k-NN (the first call is the starting encoder's)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)
    argv = ["--config", str(ROOT / "configs/demo.yaml"), "--eval-samples", "64", f"run.out_dir={tmp_path}",
            "engine.kind=single", "stages.refine.epochs=2"] + TINY
    monkeypatch.setattr(refine, "knn_of_state", signalled_knn)
    try:
        assert refine.main(argv) == EXIT_PREEMPTED
    finally:
        uninstall_stop_signals()
    results = json.loads((tmp_path / "results.json").read_text())
    assert "online" in results and "ema" not in results and "SIGTERM" in results["stopped"]
    assert (tmp_path / "export").is_dir() and len(list((tmp_path / "export").iterdir())) >= 2  # online and EMA
    exported = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "export").iterdir()}
    monkeypatch.setattr(refine, "knn_of_state", original)
    try:
        assert refine.main(argv + ["run.resume=auto"]) == 0
    finally:
        uninstall_stop_signals()
    again = json.loads((tmp_path / "results.json").read_text())
    assert "online" in again and "ema" in again and "stopped" not in again
    assert again["online"] == results["online"]  # the same weights, evaluated again
    assert set(exported) <= {p.name for p in (tmp_path / "export").iterdir()}
