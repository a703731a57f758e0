"""launch/bench_data.py states the need: beside a pipeline's images/s, what one GPU's refine step of a recipe
consumes (the planner's fastest plan on that GPU) and, for a CPU pipeline, the cores per GPU its rate per core
implies."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from scale_refiner.data.shards import make_shards
    out = tmp_path_factory.mktemp("digits")
    make_shards("digits", out, samples_per_shard=300)
    return out


def test_bench_data_prints_the_gpu_need_and_cores_per_gpu(digits, capsys):
    from scale_refiner.cli.bench_data import gpu_need, main
    need, label = gpu_need(str(ROOT / "configs/mae_l16.yaml"), "h100-80gb")
    assert need > 0 and label
    main(["--shards", str(digits), "--seconds", "1", "--workers", "1", "--skip", "dali",
          "--need", str(ROOT / "configs/mae_l16.yaml")])
    out = capsys.readouterr().out
    assert f"consumes {need:.1f} images/s" in out
    row = next(line for line in out.splitlines() if line.startswith("| reference"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    ips, per_core, vs_need, cores = float(cells[2]), float(cells[5]), cells[6], float(cells[7])
    assert per_core == pytest.approx(ips, abs=0.05)  # one worker
    assert vs_need == f"{ips / need:.2f}x"
    assert cores == pytest.approx(need / per_core, rel=0.02)
