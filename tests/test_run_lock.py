"""One run per output directory (engine/run_lock.py), and no rank outliving its launcher (engine/watchdog.py).

- The lock itself: a second holder is refused with the first one's host, pid and command; a holder killed with
  SIGKILL leaves a lock the next run takes (and knows the previous run did not end cleanly); a clean release
  leaves nothing to report; the temporaries of a killed save are removed by the next holder.
- Through the launchers: a second job into the directory of a running one -- 2 ranks under torchrun, and one
  process -- exits 73 with one line naming the holder, and writes nothing there.
- SIGKILL of each launcher the docs name (the `deepspeed` runner, ``python -m deepspeed.launcher.launch``,
  ``torchrun``) mid-run: every rank is gone within seconds, after a checkpoint ``latest`` names; a rank that
  does not act on the SIGTERM (stuck where no step comes) is killed after the grace by its watcher process.
"""
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from scale_refiner.engine.distributed import free_port
from scale_refiner.engine.run_lock import EXIT_LOCKED, LOCK_NAME, RunLock, RunLockedError, remove_leftovers
from scale_refiner.engine.watchdog import is_launcher, launcher_chain
from test_faults import ENV, LONG, REFINE, ROOT, TINY, command, run, start, wait_for_step

HOLD = textwrap.dedent("""
    import sys, time
    from scale_refiner.engine.run_lock import hold
    hold(sys.argv[1])
    print("held", flush=True)
    time.sleep(600)
""")


def holder(out_dir):
    """A process holding the lock of ``out_dir`` (it said so), until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out_dir)], stdout=subprocess.PIPE, text=True,
                            env=dict(ENV, PYTHONPATH=str(ROOT)))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    proc = holder(tmp_path)
    try:
        with pytest.raises(RunLockedError) as refused:
            RunLock(tmp_path).acquire()
        message = str(refused.value)
        assert str(tmp_path) in message and f"pid {proc.pid}" in message and socket.gethostname() in message
        assert "scale_refiner.engine.run_lock" in message  # the holder's command line
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_a_lock_the_next_run_takes(tmp_path):
    proc = holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = RunLock(tmp_path)
    previous = lock.acquire()  # the kernel released it: nothing to break by hand
    assert previous is not None and previous["pid"] == proc.pid  # ... and the unclean end is known
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # a clean end leaves nothing behind to report
    again = RunLock(tmp_path)
    assert again.acquire() is None
    again.release()


def test_leftovers_of_a_killed_save_are_removed(tmp_path):
    (tmp_path / "checkpoints/.tmp-refine-0000008").mkdir(parents=True)
    (tmp_path / "checkpoints/.tmp-refine-0000008/client_rank0.pt").write_bytes(b"x")
    (tmp_path / "checkpoints/.latest.tmp").write_text("refine-0000008")
    (tmp_path / "checkpoints/refine-0000004").mkdir()
    (tmp_path / "export").mkdir()
    (tmp_path / "export/.online.safetensors.abc123.tmp").write_bytes(b"x")
    removed = remove_leftovers(tmp_path)
    assert len(removed) == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["refine-0000004"]
    assert not list((tmp_path / "export").iterdir())


def test_launchers_are_recognised_by_their_command_line():
    assert is_launcher(["/venv/bin/python3.11", "/venv/bin/deepspeed", "--num_gpus", "2", "launch/refine.py"])
    assert is_launcher(["/venv/bin/python3.11", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30="])
    assert is_launcher(["/venv/bin/python", "/venv/bin/torchrun", "--nproc_per_node", "2", "launch/refine.py"])
    assert is_launcher(["python", "-m", "torch.distributed.run", "launch/refine.py"])
    assert not is_launcher(["bash", "job.sh"]) and not is_launcher(["python", "launch/refine.py"])
    assert launcher_chain(os.getppid())[0][0] == os.getppid()  # the parent always, launcher or not


STUCK_RANK = textwrap.dedent("""
    import signal, sys, time
    from scale_refiner.engine.watchdog import _proc_stat, start_watcher
    launcher = int(sys.argv[1])
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a rank where no step comes: the stop request is never acted on
    start_watcher(0, [(launcher, _proc_stat(launcher)[1], "a launcher")], grace_s=1.0, poll_s=0.1)
    print("watched", flush=True)
    time.sleep(600)
""")


def test_a_rank_that_does_not_stop_is_killed_after_the_grace():
    launcher = subprocess.Popen(["sleep", "600"])
    rank = subprocess.Popen([sys.executable, "-c", STUCK_RANK, str(launcher.pid)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(ENV, PYTHONPATH=str(ROOT)))
    try:
        assert rank.stdout.readline().strip() == "watched"
        watcher = [p for p in psutil.Process(rank.pid).children() if "engine.watchdog" in " ".join(p.cmdline())]
        assert len(watcher) == 1 and "RANK" not in watcher[0].environ()
        launcher.kill()
        launcher.wait()
        assert rank.wait(timeout=20) == -signal.SIGKILL  # SIGTERM ignored, then SIGKILL 1 s later
        stderr = rank.stderr.read()
        assert "is gone: stopping at the next step" in stderr and "did not stop within 1 s: SIGKILL" in stderr
        psutil.wait_procs(watcher, timeout=10)  # the watcher ends with it
        assert not watcher[0].is_running()
    finally:
        for proc in (launcher, rank):
            if proc.poll() is None:
                proc.kill()


# ------------------------------------------------------------------------------------------ through launchers
def rank_processes(proc, out):
    """The job's rank processes: every process whose command line names this run's directory, but the launcher
    ``proc`` itself (and the deepspeed runner's per-node launcher)."""
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if f"run.out_dir={out}" in " ".join(p.cmdline()) and "launcher.launch" not in " ".join(p.cmdline())]
    assert len(ranks) == 2, ranks
    return ranks


def left_of(out):
    """Whatever still runs that names ``out`` on its command line (ranks, launchers)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if f"run.out_dir={out}" in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            pass
    return found


def assert_all_gone_soon(processes, out, timeout=60):
    """Every process of the job ends within ``timeout`` s; kills what is left (then fails)."""
    killed_at = time.monotonic()
    gone, alive = psutil.wait_procs(processes, timeout=timeout)
    took = time.monotonic() - killed_at
    for p in alive + left_of(out):
        p.kill()
    assert not alive, f"{len(alive)} ranks still running {timeout} s after their launcher was killed"
    assert not left_of(out)
    return took


def launch_module_command(out, extra):
    """``python -m deepspeed.launcher.launch``: what the runner starts on every node, run directly."""
    world = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}", "--node_rank=0",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", REFINE, "--config", "configs/demo.yaml",
            "--eval-samples", "0", f"run.out_dir={out}"] + TINY + extra + ["engine.kind=deepspeed"]


def assert_stopped_with_a_checkpoint(out, log):
    text = Path(log).read_text()
    assert "is gone: stopping at the next step" in text or "SIGTERM received" in text, text[-3000:]
    assert "stopped after step" in text and "checkpoint written" in text, text[-3000:]
    tag = (out / "checkpoints/latest").read_text()
    assert (out / "checkpoints" / tag / "state.json").is_file()
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_a_second_job_is_refused_and_a_killed_runner_ends_its_ranks(tmp_path):
    """The first job under the `deepspeed` runner; while it trains, a second into its directory (2 ranks under
    torchrun, then one process) is refused; then SIGKILL of the runner alone (its per-node launcher lives on):
    the ranks stop with a checkpoint and are gone within seconds."""
    out = tmp_path / "run"
    with open(tmp_path / "log", "w") as log:
        first = start("deepspeed", out, LONG, log)
        try:
            wait_for_step(first, out, 2)
            config = (out / "config.json").read_text()
            holder = json.loads((out / LOCK_NAME).read_text())
            ranks = rank_processes(first, out)
            for rank in ranks:  # paused meanwhile (the lock stays held): the second jobs get the CPU to themselves
                rank.suspend()
            for kind in ("fsdp2", "single"):
                second = run(kind, out, LONG + ["run.seed=1"], timeout=300)
                assert second.returncode == (1 if kind == "fsdp2" else EXIT_LOCKED), second.stderr[-3000:]
                errors = [line for line in second.stderr.splitlines() if line.startswith("error: run.out_dir")]
                assert len(errors) == 1 and f"pid {holder['pid']}" in errors[0] and "in use by another run" in \
                    errors[0], second.stderr[-3000:]
                # no rank's traceback (torchrun prints one of its own for any failed rank)
                assert "scale_refiner/" not in second.stderr and 'refine.py", line' not in second.stderr
                assert kind == "fsdp2" or "Traceback" not in second.stderr
                if kind == "fsdp2":  # every rank left with the lock's status, not a failure of its own
                    assert second.stderr.count(f"exitcode  : {EXIT_LOCKED}") >= 1, second.stderr[-3000:]
            assert (out / "config.json").read_text() == config  # the second job wrote nothing
            for rank in ranks:
                rank.resume()
            processes = psutil.Process(first.pid).children(recursive=True)  # its launcher and the ranks
        except BaseException:
            os.killpg(first.pid, signal.SIGKILL)
            raise
        first.kill()  # the runner alone
        first.wait()
        took = assert_all_gone_soon(processes, out)
    print(f"deepspeed runner SIGKILLed: its ranks were gone {took:.1f} s later")
    assert took < 45
    assert_stopped_with_a_checkpoint(out, tmp_path / "log")


@pytest.mark.parametrize("launcher", ["deepspeed.launcher.launch", "torchrun"])
def test_a_killed_launcher_ends_its_ranks(tmp_path, launcher):
    out = tmp_path / "run"
    cmd = launch_module_command(out, LONG) if launcher != "torchrun" else command("fsdp2", out, LONG)
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)
        try:
            wait_for_step(proc, out, 2)
            ranks = rank_processes(proc, out)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        proc.kill()
        proc.wait()
        took = assert_all_gone_soon(ranks, out)
    print(f"{launcher} SIGKILLed: its ranks were gone {took:.1f} s later")
    assert took < 45
    assert_stopped_with_a_checkpoint(out, tmp_path / "log")
