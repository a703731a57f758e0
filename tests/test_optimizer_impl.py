"""engine.optimizer_impl and the optimiser step's other throughput details, on every engine, against the plain path.

- fused AdamW (the GPU default) against the for-loop AdamW on the single engine (fp32 and bf16), FSDP2 and ZeRO-3
  (2 gloo ranks, bf16): the same first loss bit for bit (the optimiser has not run yet), then losses and trained weights
  equal within rounding. The fused kernel computes the same update with another order of operations (it folds the
  bias corrections into one step size), so the weights differ in the last bits of each step: measured here below
  1e-6 of the loss in fp32 after 3 steps. bf16 rounds the forward, not the fp32 update, so the bound is the same;
- FSDP2 without clipping takes the gradient norm without clip_grad_norm_'s multiply by 1;
- ZeRO-3's prefetch bucket raised to one block of the model (a ViT-2B block: 78.7 M parameters);
- refusals naming the key.
"""
from pathlib import Path

import pytest
import torch

from scale_refiner.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=vit_test_patch4", "heads.blocks=[1,2]", "heads.proj_hidden_dim=64", "heads.proj_out_dim=16",
        "heads.pred_hidden_dim=64", "queue.size=256", "augment.num_local=2", "data.batch_size=16",
        "model.freeze_blocks=1", "model.checkpointing=true", "stages.refine.base_lr=1e-2"]
STEPS = 3
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5  # AdamW's step is lr-sized (1e-2 x 16/256 here); rounding differences are far below it


def _trained_steps(cfg, ctx, impl):
    """STEPS refine steps of ``cfg`` with AdamW's ``impl``; (losses, the trained encoder weights, the engine's
    optimiser defaults, the last step's returned gradient norm)."""
    from scale_refiner.bench.runner import build, run_steps, synthetic_batch
    from scale_refiner.bench.timers import StageTimer
    cfg.engine.optimizer_impl = impl
    engine = build(cfg, ctx, "refine")
    batch = synthetic_batch(cfg, cfg.data.batch_size // ctx.world, ctx.device, ctx.rank)
    losses = []
    run_steps(engine, cfg, ctx, batch, STEPS, "refine", StageTimer(ctx.device, enabled=False), losses=losses)
    state = engine.encoder_state()
    trained = {n: state[n] for n in engine.trainable_encoder}
    optimizer = engine.optimizer
    defaults = dict(getattr(optimizer, "optimizer", optimizer).defaults)  # DeepSpeed wraps torch's
    return torch.stack(losses).float(), trained, defaults, engine


def _compare_impls(cfg, ctx):
    losses, weights = {}, {}
    for impl in ("loop", "fused"):
        torch.manual_seed(0)
        losses[impl], weights[impl], defaults, engine = _trained_steps(cfg, ctx, impl)
        assert bool(defaults.get("fused")) == (impl == "fused"), (impl, defaults)
        del engine
    assert torch.equal(losses["fused"][0], losses["loop"][0])  # before any optimiser step: the same model
    assert not torch.equal(losses["loop"][0], losses["loop"][-1])  # it trains
    torch.testing.assert_close(losses["fused"], losses["loop"], rtol=LOSS_RTOL, atol=0)
    for name, value in weights["loop"].items():
        torch.testing.assert_close(weights["fused"][name], value, rtol=0, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_adamw_on_the_single_engine_matches_the_loop(precision):
    from scale_refiner.engine.distributed import DistContext
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + ["engine.kind=single", f"engine.precision={precision}"])
    _compare_impls(cfg, DistContext(0, 1, 0, torch.device("cpu")))


def _sharded_engines(rank, world, kind):
    import torch.distributed as dist
    from scale_refiner.engine.distributed import DistContext
    extra = {"fsdp2": ["engine.kind=fsdp2"],
             "deepspeed": ["engine.kind=deepspeed", "engine.zero_config=ds_configs/cpu_demo.json"]}[kind]
    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    # bf16, the GPU's precision (fp32 is compared on the single engine; the sharded engines' fp32 steps are the
    # same AdamW on the same fp32 storage)
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + extra + ["engine.precision=bf16"])
    _compare_impls(cfg, ctx)
    dist.barrier()
    if kind == "fsdp2":
        _fsdp_norm_without_clip_pass(rank, world)


def test_fused_adamw_on_fsdp2_matches_the_loop_and_no_clip_pass(gloo):
    gloo(_sharded_engines, 2, "fsdp2")


def test_fused_adamw_on_zero3_matches_the_loop(gloo):
    import deepspeed  # noqa: F401  (its process-group set-up must be importable in the ranks)
    gloo(_sharded_engines, 2, "deepspeed")


def _fsdp_norm_without_clip_pass(rank, world):
    from scale_refiner.bench.runner import build, synthetic_batch
    from scale_refiner.engine.distributed import DistContext
    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + ["engine.kind=fsdp2", "engine.precision=fp32"])
    torch.manual_seed(0)
    engine = build(cfg, ctx, "refine")
    batch = synthetic_batch(cfg, cfg.data.batch_size // world, ctx.device, rank)
    loss, _ = engine.forward(batch["global"], batch["local"], batch["index"] + 8 * rank, batch["label"], topk=4,
                             step=0)
    engine.backward(loss)
    full = [p.grad.full_tensor() for p in engine.trainable if p.grad is not None]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in full]))
    calls = []
    original = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        norm = engine.step(None)
    finally:
        torch.nn.utils.clip_grad_norm_ = original
    assert calls == []  # no clip pass when clipping is off
    torch.testing.assert_close(torch.as_tensor(norm), expected, rtol=1e-5, atol=0)


def test_zero3_prefetch_bucket_holds_a_vit_2b_block():
    from scale_refiner.engine.zero import ensure_prefetch_bucket, largest_unit_numel, load_ds_config
    from scale_refiner.refiner import build_refiner
    cfg = load_config(ROOT / "configs/mae_2b14.yaml", [])
    with torch.device("meta"):
        refiner = build_refiner(cfg, load_weights=False)
    block = sum(p.numel() for p in refiner.encoder.blocks[0].parameters())
    d, hidden = 2560, 10240  # qkv, proj, fc1, fc2 with biases; two LayerNorms
    assert block == d * 3 * d + 3 * d + d * d + d + d * hidden + hidden + hidden * d + d + 4 * d  # 78.7 M
    assert largest_unit_numel(refiner) == block  # larger than any ID head
    ds = load_ds_config(ROOT / "ds_configs/zero3.json")
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] < block  # the JSON's 5e7: one block in part
    assert ensure_prefetch_bucket(ds, refiner) == (5e7, block)
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == block
    assert ensure_prefetch_bucket(ds, refiner) is None  # large enough now: kept
    big = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 2e8}}
    assert ensure_prefetch_bucket(big, refiner) is None and big["zero_optimization"]["stage3_prefetch_bucket_size"] == 2e8
    zero2 = load_ds_config(ROOT / "ds_configs/zero2.json")
    assert ensure_prefetch_bucket(zero2, refiner) is None  # stage 2 has no parameter prefetch


def _zero3_engine_prefetch(rank, world, ds_json):
    from scale_refiner.bench.runner import build
    from scale_refiner.engine.distributed import DistContext
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + ["engine.kind=deepspeed", "engine.precision=fp32",
                                                          f"engine.zero_config={ds_json}"])
    engine = build(cfg, DistContext(rank, world, rank, torch.device("cpu")), "refine")
    units = [sum(p.ds_numel for p in unit.parameters()) for unit in [*engine.model.encoder.blocks,
                                                                      *engine.model.heads]]
    assert min(units) > 1000
    # what DeepSpeed itself runs with: the JSON's 1000 raised to the largest block or head
    assert engine.engine.zero_prefetch_bucket_size() == max(units)


def test_zero3_engine_gives_deepspeed_the_raised_bucket(gloo, tmp_path):
    import json
    ds = json.loads((ROOT / "ds_configs/cpu_demo.json").read_text())
    ds["zero_optimization"]["stage3_prefetch_bucket_size"] = 1000
    (tmp_path / "small_bucket.json").write_text(json.dumps(ds))
    gloo(_zero3_engine_prefetch, 2, str(tmp_path / "small_bucket.json"))


def test_optimizer_impl_is_validated_and_offload_refuses_a_kernel_choice():
    with pytest.raises(ConfigError, match="engine.optimizer_impl"):
        load_config(ROOT / "configs/demo.yaml", ["engine.optimizer_impl=apex"])
    from scale_refiner.engine.distributed import DistContext
    from scale_refiner.engine.trainer import build_engine
    from scale_refiner.refiner import build_refiner
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + ["engine.kind=deepspeed", "engine.optimizer_impl=fused",
                                                          "engine.zero_config=ds_configs/zero3_offload.json"])
    refiner = build_refiner(cfg, load_weights=False)
    with pytest.raises(ConfigError, match=r"'engine.optimizer_impl': fused with an offloaded optimiser "
                                          r"\(zero_optimization.offload_optimizer.device=cpu\)"):
        build_engine(refiner, cfg, "refine", DistContext(0, 1, 0, torch.device("cpu")))
