"""model.compile on the sharded engines (2 gloo ranks): every block compiled in place before FSDP2's fully_shard or
DeepSpeed's ZeRO-3 wraps it, then three training steps against the eager engine from the same seed and batch.

Compiled with the ``aot_eager`` backend: dynamo traces each block and AOTAutograd builds its forward and
backward graphs (with the engine's hooks and the checkpointing inside), and the graphs run as eager ATen ops, so
what is checked is the composition (tracing, hooks, recompute, gradients), not inductor's CPU code generation,
which tests/test_compile.py covers on the single engine and which would cost each rank minutes here. The same
losses to 1e-6 relative (fp32: the same ops in the same order)."""
from pathlib import Path

import pytest
import torch

from scale_refiner.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=vit_test_patch4", "heads.blocks=[1,2]", "heads.proj_hidden_dim=64", "heads.proj_out_dim=16",
        "heads.pred_hidden_dim=64", "queue.size=256", "augment.num_local=2", "data.batch_size=16",
        "model.freeze_blocks=1", "model.checkpointing=selective", "engine.precision=fp32",
        "stages.refine.base_lr=1e-2"]
ENGINES = {"fsdp2": ["engine.kind=fsdp2"],
           "deepspeed": ["engine.kind=deepspeed", "engine.zero_config=ds_configs/cpu_demo.json"]}


def _losses(cfg, ctx, compiled: bool):
    from scale_refiner.bench.runner import run_steps, synthetic_batch
    from scale_refiner.bench.timers import StageTimer
    from scale_refiner.engine.trainer import build_engine
    from scale_refiner.refiner import build_refiner
    torch.manual_seed(0)
    refiner = build_refiner(cfg, load_weights=False)
    if compiled:
        for block in refiner.encoder.blocks:
            block.compile(backend="aot_eager")
    engine = build_engine(refiner, cfg, "refine", ctx)
    engine.module.train()
    batch = synthetic_batch(cfg, cfg.data.batch_size // ctx.world, ctx.device, ctx.rank)
    losses = []
    run_steps(engine, cfg, ctx, batch, 3, "refine", StageTimer(ctx.device, enabled=False), losses=losses)
    return torch.stack(losses)


def _compiled_against_eager(rank, world, kind):
    from scale_refiner.engine.distributed import DistContext
    torch._dynamo.reset()
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + ENGINES[kind])
    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    eager = _losses(cfg, ctx, compiled=False)
    compiled = _losses(cfg, ctx, compiled=True)
    assert not torch.equal(eager[0], eager[-1])  # it trains
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["fsdp2", "deepspeed"])
def test_compiled_blocks_on_sharded_engines_give_the_eager_losses(gloo, kind):
    if kind == "deepspeed":
        pytest.importorskip("deepspeed")
    gloo(_compiled_against_eager, 2, kind)
