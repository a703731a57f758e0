"""Process-group set-up from the launcher's environment (deepspeed, torchrun, or none).

Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. With a GPU the backend is
NCCL and each rank takes cuda:LOCAL_RANK; without one it is gloo on the CPU.
"""
from __future__ import annotations

import atexit
import datetime
import faulthandler
import logging
import os
import pickle
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    # Host-side (gloo) group for the trainer's control messages -- stop requests, timed saves -- so that polling
    # them never waits for the GPU; None: the world group (already gloo on CPU ranks) or a single process
    control_group: Optional[Any] = None

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        """The process group the method gathers over; None in a single process."""
        return dist.group.WORLD if self.world > 1 else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(use_deepspeed: bool = False, need_group: bool = False,
                     timeout_minutes: float = 0.0) -> DistContext:
    """``need_group``: make a process group even for one process (FSDP2 shards over a device mesh).
    ``timeout_minutes`` (``run.timeout_minutes``; 0: the backend's default): how long any collective on any of
    the job's groups waits for a peer before failing, so that a stalled or lost rank ends the job instead of
    hanging it."""
    timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes > 0 else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    control_group = None
    _loopback_only_when_local()
    if world > 1 or use_deepspeed:
        if use_deepspeed:
            import deepspeed
            if "RANK" not in os.environ:
                # `python launch/refine.py engine.kind=deepspeed` with no launcher: a 1-rank group on this
                # machine. Without these DeepSpeed falls back to MPI discovery and dies importing mpi4py.
                os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
                _loopback_only_when_local()
            extra = {"timeout": timeout} if timeout is not None else {}
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", **extra)
        elif not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                    device_id=device if device.type == "cuda" else None)
        world, rank = dist.get_world_size(), dist.get_rank()
        if world > 1 and dist.get_backend() != "gloo":
            control_group = dist.new_group(backend="gloo", timeout=timeout)
    elif need_group and not dist.is_initialized():
        # a plain `python launch/refine.py`: a 1-rank group over an in-memory store, no rendezvous
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    if dist.is_initialized():
        atexit.register(end_job)  # whichever way the launcher's main() returns
        _watch_for_uncaught_exceptions()
        # A native abort in one rank (NCCL, gloo, a C++ assert) then prints that rank's Python stacks instead of
        # only the launcher's "exited with signal 6".
        if not faulthandler.is_enabled():
            faulthandler.enable()
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=device, control_group=control_group)


_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _loopback_only_when_local() -> None:
    """A job whose rendezvous address is loopback runs on this machine alone: its gloo pairs and NCCL's
    bootstrap then bind to the loopback interface instead of whichever one they would pick (every rank sets the
    same, before its group exists; a value already in the environment wins). The launcher's TCPStore is not
    ours to bind: it listens on all interfaces (docs/training.md, "What listens where")."""
    if os.environ.get("MASTER_ADDR", "127.0.0.1") in _LOOPBACK:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def start_job(cfg) -> DistContext:
    """What every launcher (refine, pretrain_mae) does first: the process group its ``engine.kind`` needs,
    warnings only from ranks other than 0, then the config validated against the world size. Raises
    ``ConfigError`` naming the key."""
    from scale_refiner.config import ConfigError, validate
    from scale_refiner.engine.run_control import install_stop_signals
    # before the group exists: a stop signal from then on is remembered and acted on at the next step
    install_stop_signals(cfg.run.stop_signals)
    if "LOCAL_RANK" in os.environ:  # started by a launcher: leave when it is gone (engine/watchdog.py)
        from scale_refiner.engine.watchdog import watch_launcher
        watch_launcher(int(os.environ.get("RANK", "0")))
    ctx = init_distributed(use_deepspeed=cfg.engine.kind == "deepspeed", need_group=cfg.engine.kind == "fsdp2",
                           timeout_minutes=cfg.run.timeout_minutes)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    validate(cfg, world_size=ctx.world)
    if cfg.engine.kind == "single" and ctx.world > 1:
        raise ConfigError(f"config key 'engine.kind': single runs in one process, launched with {ctx.world} "
                          f"ranks; use deepspeed or fsdp2")
    return ctx


_uncaught = []


def _watch_for_uncaught_exceptions() -> None:
    if getattr(sys.excepthook, "_scale_refiner", False):
        return
    previous = sys.excepthook

    def hook(kind, value, traceback):
        _uncaught.append(kind)
        previous(kind, value, traceback)

    hook._scale_refiner = True
    sys.excepthook = hook


def mark_failed() -> None:
    """This rank is ending on a fault its peers may not share: ``end_job`` then leaves the group alone, as
    after an uncaught exception."""
    _uncaught.append("fault")


def end_job() -> None:
    """Destroy the process group while the interpreter is still whole. Left to interpreter finalisation, the
    backend's worker threads can still hold tensors and abort the process at exit (pytorch/pytorch#179291),
    which turns a finished run into a failed one for the launcher.

    Not after an uncaught exception: its peers may sit in a collective this rank will never join, and
    destroying an NCCL group first waits for this rank's pending work, so the rank would hang until the
    watchdog's timeout instead of exiting and letting the launcher end the job."""
    if _uncaught:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a local rendezvous: tests, the CPU benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_rank(rank: int, world: int, port: int, threads: int, fn: Callable, args: tuple, results) -> None:
    faulthandler.enable()  # a native abort in a rank then prints every thread's Python stack, not just a signal
    # what torchrun and deepspeed export for every rank
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    try:
        import faiss
        faiss.omp_set_num_threads(threads)  # faiss has its own OpenMP pool; 2 ranks x all cores oversubscribe
    except ImportError:
        pass
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = fn(rank, world, *args)
        # Every rank past its last collective before any tears its sockets down: a rank that destroys the group
        # while its peer still reads from it can take that peer down with it.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        # As bytes: a tensor put as it is would travel as a shared-memory handle that dies with this process.
        results.put(pickle.dumps(out))


def spawn_gloo(fn: Callable[..., Any], world: int = 2, *args, threads: int = 1) -> Any:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes joined by a gloo group on this machine, with
    the environment the launchers export; return rank 0's return value. ``fn`` must be importable (module
    level). An exception in any rank re-raises here with that rank's traceback."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.SimpleQueue()
    context = torch.multiprocessing.start_processes(
        _spawned_rank, args=(world, free_port(), threads, fn, args, results), nprocs=world, join=False,
        start_method="spawn")
    out = None
    while True:  # drain while waiting: a result larger than the pipe's buffer would block rank 0 in put()
        done = context.join(timeout=0.2)
        if not results.empty():
            out = pickle.loads(results.get())
        if done:
            return out


# ------------------------------------------------------------------------------------------- device meshes
SHARD_DIM, REPLICATE_DIM = "dp_shard", "dp_replicate"


def data_parallel_mesh(device_type: str, world: int, replicate: int = 1):
    """The data-parallel ``DeviceMesh`` an FSDP2 engine shards over (``engine.fsdp_replicate``).

    ``replicate`` 1: a 1-D mesh of all ranks, named ``dp_shard`` (plain FSDP2). More: a 2-D mesh (``dp_replicate``,
    ``dp_shard``) of shape (replicate, world / replicate), rank r at row r // (world / replicate) -- so a shard group
    is a run of consecutive ranks, which is one node under torchrun and deepspeed's rank numbering -- for HSDP:
    ``fully_shard(mesh=...)`` shards within a row and replicates across rows (torchtitan's layout). Raises
    ``ConfigError`` naming the key when ``replicate`` does not divide the world."""
    from torch.distributed.device_mesh import init_device_mesh
    from scale_refiner.config import ConfigError
    if replicate < 1 or world % replicate:
        raise ConfigError(f"config key 'engine.fsdp_replicate': {replicate} replica groups do not divide the world "
                          f"size {world}")
    if replicate == 1:
        return init_device_mesh(device_type, (world,), mesh_dim_names=(SHARD_DIM,))
    return init_device_mesh(device_type, (replicate, world // replicate), mesh_dim_names=(REPLICATE_DIM, SHARD_DIM))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, fp32 on the CPU (CPU bf16 matmuls are slow and not the
    production path)."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
