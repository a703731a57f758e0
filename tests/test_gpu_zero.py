"""DeepSpeed ZeRO-3 on one device against the single engine, the case every paper recipe runs: a frozen prefix
(no_grad) in front of non-reentrant checkpointed blocks. The first trained block must get a gradient (reentrant
checkpointing behind a frozen prefix silently trains only the heads), and three steps of each engine from the same
seed and batch must give the same losses.

The GPU test (``-m gpu``, one CUDA device, a 1-rank NCCL group; launch/gpu_check.sh runs it) has a CPU twin on a
1-rank gloo group that CI runs. Tolerances: fp32 1e-5 relative (measured on the CPU: equal bit for bit, losses
and gradient). bf16 4e-2 relative: the single engine keeps fp32 weights under autocast and an fp32 residual
stream, ZeRO-3 holds bf16 weights and a bf16 stream, so each block's output differs from the first step on in
bf16's last bits; measured on the CPU: losses 1.3e-2 apart at most over the 4 steps, the first trained block's
gradient norm 2.8e-3. The fp32 case is the sharp check; the bf16 one catches a broken cast or a frozen block
that trains.

Needs deepspeed (skipped where it is missing: the lent GPU machine gets it from the wheelhouse).
"""
import os
import warnings
from pathlib import Path

import pytest
import torch

from scale_refiner.config import load_config

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    gpu = pytest.mark.gpu
TOLERANCE = {"fp32": 1e-5, "bf16": 4e-2}
FIRST_TRAINED = "encoder.blocks.1.attn.qkv.weight"
TINY = ["model.name=vit_test_patch4", "heads.blocks=[1,2]", "heads.proj_hidden_dim=64", "heads.proj_out_dim=16",
        "heads.pred_hidden_dim=64", "queue.size=256", "augment.num_local=2", "data.batch_size=16",
        "model.freeze_blocks=1", "model.checkpointing=true", "stages.refine.base_lr=1e-2"]


def _losses_and_first_grad(kind: str, precision: str, device: torch.device):
    from scale_refiner.bench.runner import build, run_steps, synthetic_batch
    from scale_refiner.bench.timers import StageTimer
    from scale_refiner.engine.distributed import DistContext
    extra = ["engine.kind=single"] if kind == "single" else ["engine.kind=deepspeed",
                                                             "engine.zero_config=ds_configs/zero3.json"]
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + extra + [f"engine.precision={precision}"])
    ctx = DistContext(0, 1, 0, device)
    torch.manual_seed(0)
    engine = build(cfg, ctx, "refine")
    assert engine.model.encoder.blocks[1].attn.qkv.weight.requires_grad
    assert not engine.model.encoder.blocks[0].attn.qkv.weight.requires_grad
    batch = synthetic_batch(cfg, cfg.data.batch_size, device)
    g, l = batch["global"].to(device), batch["local"].to(device)
    loss, _ = engine.forward(g, l, batch["index"].to(device), batch["label"].to(device), topk=4, step=0)
    engine.backward(loss)
    if kind == "single":
        grad = dict(engine.model.named_parameters())[FIRST_TRAINED].grad
    else:
        from deepspeed.utils import safe_get_full_grad
        grad = safe_get_full_grad(engine._params[FIRST_TRAINED])
    grad_norm = float(grad.float().norm()) if grad is not None else 0.0
    engine.step(None)
    losses = [loss.detach().float()]
    run_steps(engine, cfg, ctx, batch, 3, "refine", StageTimer(device, enabled=False), step0=1, losses=losses)
    return torch.stack([x.float().cpu() for x in losses]), grad_norm


def zero3_against_single(device: torch.device) -> None:
    pytest.importorskip("deepspeed")
    for precision in ("fp32", "bf16"):
        single, single_grad = _losses_and_first_grad("single", precision, device)
        zero, zero_grad = _losses_and_first_grad("deepspeed", precision, device)
        assert single_grad > 0 and zero_grad > 0, (precision, single_grad, zero_grad)  # the first trained block trains
        assert not torch.equal(single[0], single[-1])  # it trains
        torch.testing.assert_close(zero, single, rtol=TOLERANCE[precision], atol=0, msg=precision)
        torch.testing.assert_close(torch.tensor(zero_grad), torch.tensor(single_grad), rtol=TOLERANCE[precision],
                                   atol=0, msg=f"{precision}: first trained block's gradient norm")


def _cpu_twin(rank, world):
    zero3_against_single(torch.device("cpu"))


def test_zero3_one_rank_equals_single_engine_cpu_twin(gloo):
    pytest.importorskip("deepspeed")
    gloo(_cpu_twin, 1)


def _nccl_rank(index: int, port: int) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        zero3_against_single(torch.device("cuda", 0))
    finally:
        dist.destroy_process_group()


@gpu
@cuda
def test_gpu_zero3_one_rank_equals_single_engine():
    pytest.importorskip("deepspeed")
    from scale_refiner.engine.distributed import free_port
    torch.multiprocessing.spawn(_nccl_rank, args=(free_port(),), nprocs=1)
