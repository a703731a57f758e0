import os
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_entry(rank, world, port, fn, args):
    import torch.distributed as dist
    # what torchrun and deepspeed export for every rank
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world: int = 2, *args):
    """Run ``fn(rank, world, *args)`` in ``world`` real processes joined by a gloo process group.

    ``fn`` must be a module-level function; assertions inside it fail the spawn and so the test.
    """
    torch.multiprocessing.spawn(_gloo_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


@pytest.fixture
def gloo():
    return run_gloo


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (pytest -m gpu; skipped without CUDA)")


# DeepSpeed's CPU all-reduce (its shm_comm op) leaves a 69 MB /dev/shm buffer per rank and port behind after
# every run; the suite launches dozens, and on a box that runs it repeatedly they filled /dev/shm (16 GB)
# until a 2-rank ViT-2B test was killed for memory. Remove the ones this session created, at its end.
_SHM = Path("/dev/shm")
_SHM_PATTERN = "deepspeed_allreduce_buffer_*"


def pytest_sessionstart(session):
    session.config._shm_before = set(_SHM.glob(_SHM_PATTERN)) if _SHM.is_dir() else set()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_shm_before", None)
    if before is None or not _SHM.is_dir():
        return
    for path in set(_SHM.glob(_SHM_PATTERN)) - before:
        path.unlink(missing_ok=True)
