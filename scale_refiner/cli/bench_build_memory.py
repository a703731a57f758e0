"""Host peak RSS per rank of building the model, through the public launchers only.

Runs ``deepspeed --num_gpus N launch/refine.py`` (ZeRO-3) and/or ``torchrun --nproc_per_node N launch/refine.py
... engine.kind=fsdp2`` one at a time, with overrides that make the training step trivially small but keep the
model whole (ViT-2B/14 at img_size 224, 28 px global / 14 px local crops, batch 4, one step, tiny heads), and
watches the launcher's process tree every 0.1 s:

- rank processes are the top-most processes of the tree with ``LOCAL_RANK`` in their environment (DataLoader
  workers and compiler children of a rank are not ranks);
- per rank it reads ``VmHWM``, ``VmRSS``, ``RssAnon``, ``RssFile``, ``RssShmem`` from ``/proc/PID/status``; the
  last ``VmHWM`` read before the process goes is its peak RSS. ``RssFile`` holds the pages of a memory-mapped
  checkpoint, which the ranks of a node share through the page cache, so the peak of ``RssAnon`` (private
  memory) is reported on its own;
- system-wide ``MemAvailable`` is sampled too; its minimum is reported, and if it drops under
  ``--min-available-gib`` (1.5 GiB) every process of the job is killed (SIGKILL, by pid) and the run is reported
  as "aborted: host memory exhausted" with the numbers seen up to then, instead of leaving the choice of a
  victim to the kernel's OOM killer (the job's processes also get ``oom_score_adj`` 1000 as a second guard).

The launchers run from ``--repo`` (default: this repository), with ``PYTHONPATH`` set to it, so a
``git worktree`` of an older commit is measured the same way:

    git worktree add /tmp/sr-before HEAD
    .venv/bin/python launch/bench_build_memory.py --make-weights /tmp/vit2b_mae.pth
    .venv/bin/python launch/bench_build_memory.py --repo /tmp/sr-before --weights /tmp/vit2b_mae.pth \\
        --engines deepspeed fsdp2 --out runs/build_memory.jsonl

``--make-weights PATH`` writes a random-init checkpoint of ``--model`` in the official MAE layout
(``{"model": state_dict}`` with the encoder's key names) once, building on the meta device and materialising
tensor by tensor (one copy in memory); an existing file is kept. Prints a markdown table; ``--out FILE`` gets
one JSON line per run (per-rank peaks and the sampled RSS curves). GB here are 10^9 bytes.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]  # the repository (configs/, shards/)
GB = 1e9
GIB = 1024 ** 3
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer_"

RECIPE_OVERRIDES = [
    "model.img_size=224", "augment.global_size=28", "augment.local_size=14", "augment.num_local=2",
    "data.pipeline=memory", "data.dataset=fashion-mnist", "data.batch_size=4", "data.samples_per_epoch=8",
    "data.num_workers=0", "run.max_steps=1", "run.log_every=1", "queue.size=64",
    "heads.proj_hidden_dim=256", "heads.pred_hidden_dim=256", "heads.proj_out_dim=64",
]


# ------------------------------------------------------------------------------------------ weights file
def make_weights(path: Path, model_name: str, img_size: int, seed: int = 0) -> None:
    """Random-init encoder in the official MAE layout, ``{"model": state_dict}``, fp32; kept if present."""
    if path.is_file():
        print(f"{path} exists ({path.stat().st_size / GB:.2f} GB): kept")
        return
    import torch
    from scale_refiner.config import ModelConfig
    from scale_refiner.models.vit import build_vit, sincos_pos_embed
    from scale_refiner.models.weights import check_state_dict, convert_state_dict, load_checkpoint_file

    cfg = ModelConfig(name=model_name, img_size=img_size)
    meta = build_vit(cfg, device="meta")  # shapes and names only, no memory
    nbytes = sum(t.numel() * 4 for t in meta.state_dict().values())
    available = meminfo()["MemAvailable"]
    if available < nbytes + 2 * GIB:
        raise SystemExit(f"not enough host memory to write {path}: {nbytes / GB:.1f} GB needed, "
                         f"MemAvailable {available / GB:.1f} GB")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in meta.state_dict().items():  # one tensor at a time, straight into the single copy
        if name == "pos_embed":
            value = sincos_pos_embed(meta.embed_dim, meta.grid).unsqueeze(0)
        elif name.endswith(".bias"):
            value = torch.zeros(t.shape)
        elif t.ndim == 1:  # LayerNorm weights
            value = torch.ones(t.shape)
        else:
            value = torch.empty(t.shape).normal_(0.0, 0.02, generator=gen)
        state[name] = value.float().contiguous()
    conv = convert_state_dict(state, "mae")
    assert not conv.unknown and not conv.conflicts, (conv.unknown, conv.conflicts)
    check_state_dict(meta, conv.state_dict, "generated state dict")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    started = time.time()
    torch.save({"model": state}, tmp)
    del state, conv
    tmp.rename(path)
    # Read back the way the refine job reads it (memory-mapped) and check it against the model, strictly.
    back = convert_state_dict(load_checkpoint_file(path), "mae")
    assert not back.unknown and not back.conflicts
    check_state_dict(meta, back.state_dict, str(path))
    print(f"wrote {path}: {model_name} img_size {img_size}, {len(back.state_dict)} tensors, "
          f"{path.stat().st_size / GB:.2f} GB, {time.time() - started:.0f} s")


# ------------------------------------------------------------------------------------------ /proc readers
def meminfo() -> Dict[str, int]:
    out = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    return out


STATUS_KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int) -> Optional[Dict[str, int]]:
    """Memory fields of /proc/PID/status in bytes; None once the process is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            text = handle.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in STATUS_KEYS:
            out[key] = int(rest.split()[0]) * 1024
        elif key == "State" and rest.split()[0] in ("Z", "X"):
            return None
    return out if "VmHWM" in out else None


def zombie_exit_code(pid: int) -> Optional[int]:
    """Exit status of a zombie, from field 52 of /proc/PID/stat (readable until its parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields[0] != "Z" or len(fields) < 50:
        return None
    status = int(fields[49])
    return -(status & 0x7F) if status & 0x7F else (status >> 8) & 0xFF


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ one run
class Rank:
    def __init__(self, rank: int, pid: int, started: float):
        self.rank, self.pid, self.started = rank, pid, started
        self.ended: Optional[float] = None
        self.last: Dict[str, int] = {}
        self.peak = {k: 0 for k in STATUS_KEYS}
        self.peak_at = 0.0  # elapsed time of the highest VmRSS sample
        self.exit: Optional[str] = None
        self.curve: List[list] = []  # [t, VmRSS, RssAnon, RssFile, RssShmem] in GB, thinned
        self._kept = None

    def sample(self, t: float, status: Dict[str, int]) -> None:
        self.last = status
        for k in STATUS_KEYS:
            self.peak[k] = max(self.peak[k], status.get(k, 0))
        if status["VmRSS"] >= self.peak["VmRSS"]:
            self.peak_at = t
        point = [round(t, 2)] + [round(status.get(k, 0) / GB, 3) for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")]
        # Keep a point every 0.5 s, or sooner when RSS moved by 0.25 GB; always keep a new maximum.
        if (self._kept is None or t - self._kept[0] >= 0.5 or abs(point[1] - self._kept[1]) >= 0.25
                or status["VmRSS"] >= self.peak["VmRSS"]):
            self.curve.append(point)
            self._kept = point

    def record(self) -> dict:
        return {"rank": self.rank, "pid": self.pid,
                "peak_rss_gb": round(self.last.get("VmHWM", self.peak["VmHWM"]) / GB, 3),  # last VmHWM read
                "peak_anon_gb": round(self.peak["RssAnon"] / GB, 3),
                "peak_file_gb": round(self.peak["RssFile"] / GB, 3),
                "peak_shmem_gb": round(self.peak["RssShmem"] / GB, 3),
                "peak_rss_at_s": round(self.peak_at, 2),
                "wall_s": round((self.ended or time.time()) - self.started, 1),
                "exit": self.exit, "curve": self.curve}


def launcher_command(args, engine: str, port: int, out_dir: Path) -> List[str]:
    bin_dir = Path(args.python).parent
    overrides = list(RECIPE_OVERRIDES) + [
        f"model.name={args.model}", f"engine.precision={args.precision}", f"run.out_dir={out_dir}",
        "stages.run=[refine]" if args.stages == "refine" else
        "stages.run=[heads]" if args.stages == "heads" else "stages.run=[heads,refine]",
    ]
    overrides.append(f"model.weights={args.weights}" if args.weights else "model.weights=null")
    if engine == "deepspeed":
        overrides += ["engine.kind=deepspeed", f"engine.zero_config={args.zero_config}"]
        head = [args.python, str(bin_dir / "deepspeed"), "--num_gpus", str(args.ranks), "--master_port", str(port)]
    else:
        overrides += ["engine.kind=fsdp2"]
        head = [args.python, str(bin_dir / "torchrun"), "--nproc_per_node", str(args.ranks),
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return head + ["launch/refine.py", "--config", args.config, "--eval-samples", "0"] + overrides + list(args.set)


def _set_oom_score():
    # The job, not whatever else runs on the box, is what the OOM killer should take if it acts before we do;
    # and it runs at normal priority (the sampler raised its own).
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("1000")
    except OSError:
        pass


def measure(args, engine: str) -> dict:
    repo = Path(args.repo).resolve()
    port = free_port()
    run_id = f"{engine}-{args.precision}-{args.stages}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    out_dir = Path(tempfile.mkdtemp(prefix=f"bench_build_memory-{run_id}-"))
    log_path = Path(args.log_dir) / f"{run_id}.log" if args.log_dir else out_dir.with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = launcher_command(args, engine, port, out_dir)
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    shm_before = {p.name for p in SHM_DIR.glob(SHM_PREFIX + "*")}
    available = meminfo()["MemAvailable"]
    record = {"engine": engine, "precision": args.precision, "stages": args.stages, "model": args.model,
              "weights": args.weights, "ranks_requested": args.ranks, "repo": str(repo),
              "commit": _git(repo, "rev-parse", "HEAD"), "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "command": f"cd {repo} && PYTHONPATH={repo} OMP_NUM_THREADS={args.threads} " + " ".join(cmd),
              "mem_available_start_gb": round(available / GB, 2), "log": str(log_path)}
    if available < args.min_start_gib * GIB:
        record.update(status=f"not started: MemAvailable {available / GIB:.1f} GiB < {args.min_start_gib} GiB",
                      ranks=[])
        return record
    print(f"[{engine}] {record['command']}\n[{engine}] log: {log_path}", flush=True)

    started = time.time()
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_set_oom_score, text=True, errors="replace")
    markers: List[list] = []  # [t, line] of the job's log, timestamped when read

    def pump():
        for line in proc.stdout:
            t = time.time() - started
            log.write(f"[{t:8.2f}] {line}")
            log.flush()
            markers.append([round(t, 2), line.rstrip()[:300]])
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()

    import psutil
    launcher = psutil.Process(proc.pid)
    known: Dict[int, float] = {proc.pid: launcher.create_time()}  # every pid of the tree -> create time
    ranks: Dict[int, Rank] = {}

    def kill_all():
        # Ranks first (they hold the memory), then everything else we saw in the tree, each by its own pid
        # (torchrun starts its ranks in sessions of their own, so one killpg does not reach them).
        order = [r.pid for r in ranks.values()] + [p for p in known if p not in {r.pid for r in ranks.values()}]
        for pid in order:
            try:
                if psutil.Process(pid).create_time() == known.get(pid):
                    os.kill(pid, signal.SIGKILL)
            except (psutil.Error, ProcessLookupError, PermissionError):
                pass

    try:
        status, killed, min_avail, min_avail_at = _watch(args, proc, launcher, started, known, ranks, kill_all,
                                                         available)
    except BaseException:  # the sampler itself failed or was interrupted: leave nothing of the job running
        kill_all()
        raise
    if killed:  # anything of the tree still around (it should not be) goes as well
        time.sleep(0.5)
        kill_all()
    return _report(args, record, proc, reader, log, log_path, started, ranks, markers, status, min_avail,
                   min_avail_at, shm_before, port, out_dir)


def _watch(args, proc, launcher, started, known, ranks, kill_all, available):
    """Sample until the job is over (or killed): returns status, killed, MemAvailable minimum and its time."""
    import psutil
    is_rank_env: Dict[int, Optional[int]] = {}
    min_avail, min_avail_at, status, killed = available, 0.0, None, False
    while True:
        now = time.time()
        t = now - started
        avail = meminfo()["MemAvailable"]
        if avail < min_avail:
            min_avail, min_avail_at = avail, t
        try:
            children = launcher.children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            if child.pid in known:
                continue
            try:
                known[child.pid] = child.create_time()
                env_c = child.environ()
                is_rank_env[child.pid] = int(env_c.get("RANK", env_c["LOCAL_RANK"])) if "LOCAL_RANK" in env_c else None
                parent = child.ppid()
            except (psutil.Error, KeyError, ValueError):
                is_rank_env.setdefault(child.pid, None)
                continue
            if is_rank_env[child.pid] is not None and is_rank_env.get(parent) is None:
                ranks[child.pid] = Rank(is_rank_env[child.pid], child.pid, known[child.pid])
        for r in ranks.values():
            if r.ended is not None:
                continue
            st = proc_status(r.pid)
            if st is None:
                r.ended = now
                code = zombie_exit_code(r.pid)
                if code is not None:
                    r.exit = str(code)
            else:
                r.sample(t, st)
        if avail < args.min_available_gib * GIB and not killed:
            per_rank = ", ".join(
                f"rank {r.rank} {r.last.get('VmRSS', 0) / GB:.1f} ({r.last.get('RssAnon', 0) / GB:.1f})"
                for r in sorted(ranks.values(), key=lambda r: r.rank))
            status = (f"aborted: host memory exhausted at {per_rank} GB per rank (VmRSS (RssAnon); MemAvailable "
                      f"{avail / GIB:.2f} GiB at {t:.1f} s)")
            for r in ranks.values():
                if r.ended is None:
                    r.ended, r.exit = now, "killed (abort)"
            kill_all()
            killed = True
        if t > args.timeout and not killed:
            status = f"timeout after {args.timeout} s"
            for r in ranks.values():
                if r.ended is None:
                    r.ended, r.exit = now, "killed (timeout)"
            kill_all()
            killed = True
        if proc.poll() is not None and all(r.ended is not None for r in ranks.values()):
            return status, killed, min_avail, min_avail_at
        time.sleep(args.interval)


def _report(args, record, proc, reader, log, log_path, started, ranks, markers, status, min_avail, min_avail_at,
            shm_before, port, out_dir) -> dict:
    proc.wait()
    reader.join(timeout=10)
    log.close()
    wall = time.time() - started
    text = log_path.read_text(errors="replace")
    for r in ranks.values():  # exit codes the launchers print, where the zombie was reaped before we saw it
        if r.exit is not None:
            continue
        m = re.search(rf"exitcode\s*:\s*(-?\d+) \(pid: {r.pid}\)", text)
        if m:
            r.exit = m.group(1)
        elif re.search(rf"Process {r.pid} exits successfully", text):
            r.exit = "0"
        elif proc.returncode == 0:
            r.exit = "0"
        else:
            m = re.search(rf"--local_rank={r.rank}\b.*exits with return code = (-?\d+)", text)
            r.exit = m.group(1) if m else "?"
    if status is None:
        status = "ok" if proc.returncode == 0 else f"failed: launcher exit {proc.returncode}"
    # The last lines of the job's log before each rank's peak: where in the run the peak sits.
    for r in ranks.values():
        before = [line for tm, line in markers if tm <= r.peak_at and line.strip() and not line[0].isspace()
                  and "Warning" not in line and "real_accelerator" not in line]
        r.__dict__["before_peak"] = before[-1] if before else ""
    new_shm = [p for p in SHM_DIR.glob(SHM_PREFIX + "*") if p.name not in shm_before and f"_{port}_" in p.name]
    for p in new_shm:
        p.unlink(missing_ok=True)
    if not args.keep_out:
        shutil.rmtree(out_dir, ignore_errors=True)
    record.update(status=status, launcher_exit=proc.returncode, wall_s=round(wall, 1),
                  mem_available_min_gb=round(min_avail / GB, 2), mem_available_min_at_s=round(min_avail_at, 1),
                  shm_removed=[p.name for p in new_shm], out_dir=str(out_dir) if args.keep_out else None,
                  markers=[m for m in markers if _is_marker(m[1])],
                  ranks=[dict(r.record(), last_log_before_peak=r.__dict__["before_peak"])
                         for r in sorted(ranks.values(), key=lambda r: r.rank)])
    weights_gb = Path(args.weights).stat().st_size / GB if args.weights else 0.0
    for r in record["ranks"]:
        r["phases"] = phases(r["curve"], record["markers"], weights_gb)
    return record


def phases(curve: List[list], markers: List[list], weights_gb: float) -> List[dict]:
    """Split a rank's RSS curve into the run's phases and give each one's highest VmRSS and RssAnon (GB).

    Boundaries: the checkpoint load is where ``RssFile`` stands more than half the weights file above its
    level before (the file is memory-mapped, so its pages show up there while it is copied in); the engine is
    built when rank 0 logs ``stage ... on``; a stage's steps end with its last ``step N/N`` line; after that the
    stage end (full-state gather, checkpoint, the next stage's rebuild, exports) and exit.
    """
    if not curve:
        return []
    stage_at = [t for t, line in markers if re.search(r"INFO stage \w+ on", line)]
    step_at = [t for t, line in markers if re.search(r"INFO \w+ step (\d+)/\1 ", line)]
    bounds = []  # (name, start, end)
    load = None
    if weights_gb:
        # RssFile's level outside the load: the lower quartile once torch is imported (shared libraries)
        settled = sorted(p[3] for p in curve if p[1] > 0.5) or [0.0]
        base = settled[len(settled) // 4]
        inside = [i for i, p in enumerate(curve) if p[3] - base > 0.5 * weights_gb]
        if inside:  # widened to where RssFile left (and regained) its level
            lo, hi = inside[0], inside[-1]
            # The level before: the lowest RssFile once RssAnon had (nearly) reached its value at the load.
            anon0 = curve[lo][2]
            before = [p[3] for p in curve[:lo] if p[2] >= 0.95 * anon0 and p[1] >= 0.5]
            if before:
                level = min(before)
                while lo > 0 and curve[lo - 1][3] > level + 0.05:
                    lo -= 1
            while hi + 1 < len(curve) and curve[hi + 1][3] > base + 0.05 and curve[hi + 1][3] < curve[hi][3] - 0.001:
                hi += 1
            load = (curve[lo][0], curve[hi][0])
    first_stage = stage_at[0] if stage_at else float("inf")
    if load:
        bounds += [("imports + build", 0.0, load[0]), ("load (checkpoint mapped)", load[0], load[1] + 0.01),
                   ("engine init", load[1] + 0.01, first_stage)]
    else:  # no file: the build ends with its in-place re-initialisation, the first flat stretch of RssAnon
        built = _first_plateau_end(curve, before=first_stage)
        if built is not None:
            bounds += [("imports + build", 0.0, built), ("engine init", built, first_stage)]
        else:
            bounds += [("imports + build + engine init", 0.0, first_stage)]
    if stage_at:
        first_step_end = step_at[0] if step_at else float("inf")
        bounds += [("first stage's steps", first_stage, first_step_end)]
        if step_at:
            bounds += [("after the steps (stage end, rebuild, export, exit)", first_step_end, float("inf"))]
    out = []
    for name, lo, hi in bounds:
        pts = [p for p in curve if lo <= p[0] < hi]
        if pts:
            top = max(pts, key=lambda p: p[1])
            out.append({"phase": name, "from_s": round(lo, 1), "to_s": round(min(hi, curve[-1][0]), 1),
                        "max_rss_gb": top[1], "max_anon_gb": max(p[2] for p in pts),
                        "max_file_gb": max(p[3] for p in pts), "max_rss_at_s": top[0]})
    return out


def _first_plateau_end(curve: List[list], before: float, hold_s: float = 5.0) -> Optional[float]:
    """End of the first stretch of at least ``hold_s`` seconds over which RssAnon, having grown past 1 GB,
    changes by less than 0.05 GB (the model is allocated and its weights are being initialised in place)."""
    start = None
    for i, p in enumerate(curve):
        if p[0] >= before:
            break
        if p[2] < 1.0:
            continue
        if start is None or abs(p[2] - curve[start][2]) >= 0.05:
            if start is not None and curve[i - 1][0] - curve[start][0] >= hold_s:
                return curve[i - 1][0]
            start = i
    return None


MARKER = re.compile(r"stage \w+ on|step \d+/\d+|DeepSpeed info|ZeRO|optimizer|Error|error|Traceback|exits|"
                    r"exitcode|TensorBoard|Killed|signal", re.I)


def _is_marker(line: str) -> bool:
    return bool(MARKER.search(line))


def _git(repo: Path, *argv) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def table(records: List[dict]) -> str:
    lines = ["| engine | precision | stages | weights | rank | peak RSS (VmHWM GB) | peak anon GB (RssAnon) | "
             "peak file GB (RssFile) | wall s | exit status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        weights = "file" if rec.get("weights") else "none"
        for r in rec["ranks"]:
            lines.append(f"| {rec['engine']} | {rec['precision']} | {rec['stages']} | {weights} | {r['rank']} | "
                         f"{r['peak_rss_gb']:.2f} | {r['peak_anon_gb']:.2f} | {r['peak_file_gb']:.2f} | "
                         f"{r['wall_s']:.0f} | {r['exit']} |")
        if not rec["ranks"]:
            lines.append(f"| {rec['engine']} | {rec['precision']} | {rec['stages']} | {weights} | - | - | - | - | - | "
                         f"{rec['status']} |")
    notes = []
    for rec in records:
        notes.append(f"- {rec['engine']}: {rec['status']}; MemAvailable min "
                     f"{rec.get('mem_available_min_gb', float('nan')):.2f} GB at "
                     f"{rec.get('mem_available_min_at_s', 0):.0f} s (start {rec['mem_available_start_gb']:.2f} GB); "
                     f"wall {rec.get('wall_s', 0):.0f} s")
        for r in rec["ranks"]:
            notes.append(f"  - rank {r['rank']}: VmRSS peak at {r['peak_rss_at_s']:.0f} s, after log line: "
                         f"{r['last_log_before_peak'][:160]!r}")
            for ph in r.get("phases", []):
                notes.append(f"    - {ph['phase']} ({ph['from_s']:.0f}-{ph['to_s']:.0f} s): VmRSS max "
                             f"{ph['max_rss_gb']:.2f} GB (anon {ph['max_anon_gb']:.2f}, "
                             f"file {ph['max_file_gb']:.2f} max)")
    return "\n".join(lines + [""] + notes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-weights", metavar="PATH", help="write a random-init MAE-layout checkpoint and exit")
    ap.add_argument("--model", default="vit_2b_patch14", help="model.name (default vit_2b_patch14)")
    ap.add_argument("--img-size", type=int, default=224, help="img_size of --make-weights' position grid")
    ap.add_argument("--repo", default=str(ROOT), help="repository to run launch/refine.py from (default: this one)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter whose bin/ holds deepspeed and torchrun (default: this one)")
    ap.add_argument("--config", default="configs/mae_2b14.yaml", help="recipe, relative to --repo")
    ap.add_argument("--zero-config", default="ds_configs/cpu_demo.json", help="engine.zero_config for ZeRO-3")
    ap.add_argument("--engines", nargs="+", default=["deepspeed", "fsdp2"], choices=["deepspeed", "fsdp2"],
                    help="measured one after the other, never together")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--stages", default="refine", choices=["refine", "heads", "both"],
                    help="stages.run: [refine] (one build), [heads] or [heads,refine]")
    ap.add_argument("--weights", help="model.weights (unset: the build alone, random init)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each rank")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override (repeatable)")
    ap.add_argument("--out", help="append one JSON line per run to this file")
    ap.add_argument("--log-dir", help="where the job's logs go (default: beside its temporary run.out_dir)")
    ap.add_argument("--keep-out", action="store_true", help="keep the run's run.out_dir (checkpoints can be large)")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    ap.add_argument("--min-available-gib", type=float, default=1.5,
                    help="kill the job when system MemAvailable drops under this")
    ap.add_argument("--min-start-gib", type=float, default=6.0, help="do not start under this MemAvailable")
    ap.add_argument("--timeout", type=float, default=3600.0, help="kill the job after this many seconds")
    ap.add_argument("--table", metavar="FILE", help="print the table of the JSON lines in FILE (no run)")
    args = ap.parse_args(argv)

    if args.table:
        records = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
        for rec in records:  # phases again, with this version's boundaries (needs the weights file's size)
            weights = Path(rec["weights"]) if rec.get("weights") else None
            if weights is not None and not weights.is_file():
                continue  # keep the phases stored with the record
            size = weights.stat().st_size / GB if weights is not None else 0.0
            for r in rec["ranks"]:
                r["phases"] = phases(r["curve"], rec.get("markers", []), size)
        print(table(records))
        return 0
    if args.make_weights:
        make_weights(Path(args.make_weights), args.model, args.img_size)
        return 0
    if args.weights and not Path(args.weights).is_file():
        ap.error(f"--weights {args.weights} does not exist (write it with --make-weights)")
    if args.weights:
        args.weights = str(Path(args.weights).resolve())
    try:  # the sampler, not the job, should get the CPU when the box is busy
        os.setpriority(os.PRIO_PROCESS, 0, -5)
    except OSError:
        pass
    records = []
    for engine in args.engines:
        rec = measure(args, engine)
        records.append(rec)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as handle:
                handle.write(json.dumps(rec) + "\n")
        print(table([rec]), flush=True)
    print("\n" + table(records))
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
