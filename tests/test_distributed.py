"""The process-group helpers every launcher and distributed test stands on (scale_refiner/engine/distributed.py)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from scale_refiner.engine.distributed import spawn_gloo

ROOT = Path(__file__).resolve().parents[1]


def _sum_of_ranks(rank, world, scale):
    x = torch.tensor([float(rank)])
    dist.all_reduce(x)
    return {"sum": x * scale, "world": world}


def _rank_one_fails(rank, world):
    if rank == 1:
        raise ValueError("rank 1 refuses")
    dist.barrier()


def test_spawn_gloo_returns_rank_zeros_value_tensors_included():
    out = spawn_gloo(_sum_of_ranks, 2, 10.0)
    assert out["world"] == 2 and torch.equal(out["sum"], torch.tensor([10.0]))  # (0 + 1) x 10, reduced


def test_spawn_gloo_raises_a_ranks_error():
    """Whichever rank's failure arrives first is raised: rank 1's own error, or rank 0's lost connection to
    it (rank 0 is in a barrier when rank 1 goes; gloo words it "reset" or "closed by peer")."""
    with pytest.raises(torch.multiprocessing.ProcessRaisedException,
                       match="rank 1 refuses|Connection reset|Connection closed"):
        spawn_gloo(_rank_one_fails, 2)


SCRIPT = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from scale_refiner.engine.distributed import init_distributed
    init_distributed(need_group=True)  # a 1-rank gloo group, as a plain `python launch/refine.py` makes
    destroy = dist.destroy_process_group
    def spy(*args, **kwargs):
        print("destroyed", flush=True)
        destroy(*args, **kwargs)
    dist.destroy_process_group = spy
    if sys.argv[1] == "raise":
        raise RuntimeError("boom")
""")


@pytest.mark.parametrize("how, destroyed", [("return", True), ("raise", False)])
def test_group_destroyed_at_exit_unless_an_exception_escapes(tmp_path, how, destroyed):
    """A finished job tears its group down before interpreter shutdown; a failing rank does not (with NCCL
    that would wait for collectives its peers never finish) and leaves ending the job to the launcher."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # the package, installed or not
    proc = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, timeout=120, env=env)
    assert ("destroyed" in proc.stdout) == destroyed, (proc.stdout, proc.stderr[-2000:])
    assert (proc.returncode == 0) == (how == "return")
    if how == "raise":
        assert "boom" in proc.stderr
