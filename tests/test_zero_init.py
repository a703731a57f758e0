"""ViT-2B built under deepspeed.zero.Init on 2 gloo ranks: each rank holds about half of the parameters."""

from scale_refiner.config import ModelConfig


def _build_2b(rank, world):
    import deepspeed
    from scale_refiner.models.vit import build_vit
    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    model = build_vit(ModelConfig(name="vit_2b_patch14"), zero_init_config=config)
    total = sum(p.ds_numel for p in model.parameters())
    held = sum(p.ds_tensor.numel() for p in model.parameters())
    assert 1.88e9 < total < 1.90e9, total
    # each rank's partitions: half of every tensor (rounded up), nothing gathered
    assert abs(held - total / world) < 1e-4 * total, (held, total)
    assert all(p.numel() == 0 for p in model.parameters())  # no full tensor materialised


def test_vit_2b_under_zero_init_is_halved_over_two_ranks(gloo):
    gloo(_build_2b, 2)
