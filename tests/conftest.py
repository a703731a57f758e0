import os
from pathlib import Path

import pytest
import torch

from scale_refiner.engine.distributed import spawn_gloo  # installed (pip install -e .), or pytest.ini's pythonpath

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(2)
# the jobs the tests start (python launch/..., deepspeed, torchrun) import this checkout's package too, installed
# or not (pytest.ini's pythonpath reaches this process only)
_inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + _inherited)


def run_gloo(fn, world: int = 2, *args):
    """Run ``fn(rank, world, *args)`` in ``world`` real processes joined by a gloo process group.

    ``fn`` must be a module-level function; assertions inside it fail the spawn and so the test.
    """
    return spawn_gloo(fn, world, *args, threads=1)


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


@pytest.fixture(autouse=True)
def _shm_buffers_of_this_test_removed(request):
    """Each test's buffers removed when it ends, not only at the session's end: the buffer's name holds only the
    rendezvous port, and a later test drawing the same free port would have its ranks open the stale buffer --
    whose leftover collective states can send DeepSpeed's all-reduce into its "Should not get here" assertion
    (a SIGABRT seen once in CI)."""
    before = set(_SHM.glob(_SHM_PATTERN)) if _SHM.is_dir() else set()
    yield
    if _SHM.is_dir():
        for path in set(_SHM.glob(_SHM_PATTERN)) - before:
            path.unlink(missing_ok=True)


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_shm_before", None)
    if before is None or not _SHM.is_dir():
        return
    for path in set(_SHM.glob(_SHM_PATTERN)) - before:
        path.unlink(missing_ok=True)
