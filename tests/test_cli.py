"""The packaged command line: the ``scale-refiner`` console script and the modules under the launchers."""
import os
import subprocess
import sys
from pathlib import Path

from scale_refiner.engine.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TINY = ["model.name=vit_test_patch4", "heads.blocks=[1,2]", "heads.proj_hidden_dim=64", "heads.proj_out_dim=16",
        "heads.pred_hidden_dim=64", "queue.size=256", "augment.num_local=2", "data.batch_size=16",
        "data.num_workers=0", "data.pipeline=memory", "stages.run=[refine]", "data.samples_per_epoch=32",
        "stages.refine.epochs=1", "engine.zero_config=ds_configs/cpu_demo.json"]


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV, **kw)


def test_console_script_lists_and_dispatches_commands():
    proc = run([str(BIN / "scale-refiner"), "--help"])
    assert proc.returncode == 0
    for name in ("refine", "pretrain-mae", "evaluate", "make-shards", "benchmark", "demo"):
        assert f"  {name} " in proc.stdout
    proc = run([str(BIN / "scale-refiner"), "refne"])
    assert proc.returncode == 2 and "unknown command 'refne'" in proc.stderr
    proc = run([str(BIN / "scale-refiner"), "make-shards", "--help"])
    assert proc.returncode == 0 and "--samples-per-shard" in proc.stdout


def test_console_script_runs_the_main_job(tmp_path):
    proc = run([str(BIN / "scale-refiner"), "refine", "--config", "configs/demo.yaml", "--eval-samples", "0",
                f"run.out_dir={tmp_path}", "engine.kind=single"] + TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "export/ema/model.safetensors").is_file()


def test_the_module_runs_under_torchrun_and_deepspeed(tmp_path):
    args = ["--config", "configs/demo.yaml", "--eval-samples", "0"] + TINY
    proc = run([sys.executable, str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                "-m", "scale_refiner.cli.refine"] + args + [f"run.out_dir={tmp_path / 'fsdp2'}", "engine.kind=fsdp2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run([sys.executable, str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                "--module", "scale_refiner.cli.refine"] + args + [f"run.out_dir={tmp_path / 'zero'}",
                                                                  "engine.kind=deepspeed"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind in ("fsdp2", "zero"):
        assert (tmp_path / kind / "checkpoints/refine-end/model_state.pt").is_file()
