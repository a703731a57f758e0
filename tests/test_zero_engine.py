"""ZeroEngine on 2 gloo ranks: EMA on local fp32 partitions equals a full-parameter EMA; the first trainable
block behind a frozen prefix gets a gradient with activation checkpointing on."""
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=vit_test_patch4", "heads.blocks=[1,2]", "heads.proj_hidden_dim=64", "heads.proj_out_dim=16",
        "heads.pred_hidden_dim=64", "queue.size=256", "augment.num_local=2", "data.batch_size=16",
        "heads.norm=syncbn", "model.freeze_blocks=1", "model.checkpointing=true", "engine.kind=deepspeed",
        "engine.zero_config=ds_configs/cpu_demo.json"]


def _zero_steps(rank, world):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from scale_refiner.config import load_config
    from scale_refiner.engine.distributed import DistContext
    from scale_refiner.engine.ema import EncoderEMA
    from scale_refiner.engine.trainer import build_engine
    from scale_refiner.refiner import build_refiner

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(ROOT / "configs/demo.yaml", TINY)
    torch.manual_seed(0)
    refiner = build_refiner(cfg)
    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    engine = build_engine(refiner, cfg, "refine", ctx)
    ema = EncoderEMA(engine, 0.9)
    start = engine.encoder_state()
    trainable = set(ema.shadow)
    assert "blocks.0.attn.qkv.weight" not in trainable and "blocks.1.attn.qkv.weight" in trainable
    naive = {n: start[n].double() for n in trainable}
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        crops = torch.randn(2, 16, 3, 32, 32, generator=g), torch.randn(2, 16, 3, 16, 16, generator=g)
        part = slice(8 * rank, 8 * rank + 8)
        engine.set_lr(1e-2)
        loss, _ = engine.forward(crops[0][:, part], crops[1][:, part], torch.arange(8) + 8 * rank + 16 * step,
                                 torch.zeros(8, dtype=torch.long), topk=4, step=step)
        engine.backward(loss)
        if step == 0:
            first_trainable = safe_get_full_grad(engine._params["encoder.blocks.1.attn.qkv.weight"])
            assert first_trainable is not None and first_trainable.abs().sum() > 0
        engine.step(None)
        ema.update()
        full = engine.encoder_state()
        for n in trainable:
            naive[n] = 0.9 * naive[n] + 0.1 * full[n].double()
    ema_full = ema.full_state()
    assert ema_full.keys() == trainable
    for n in trainable:
        assert torch.allclose(ema_full[n].double(), naive[n], atol=1e-6), n
    assert not torch.equal(ema_full["blocks.1.attn.qkv.weight"], start["blocks.1.attn.qkv.weight"])
    # the local partitions hold 1/world of each tensor (rounded up), and a full state restores them exactly
    local = {n: t.clone() for n, t in ema.shadow.items()}
    assert sum(t.numel() for t in local.values()) < 0.6 * sum(naive[n].numel() for n in trainable)
    ema.load_full_state(ema_full)
    assert all(torch.equal(local[n], ema.shadow[n]) for n in trainable)


def test_zero3_ema_and_checkpointing_gradient(gloo):
    gloo(_zero_steps, 2)
