"""Layer-wise lr decay, weight-decay rules and the warm-up + cosine schedule."""
import math

import pytest
import torch

from scale_refiner.engine.optim import param_groups, scaled_lr, warmup_cosine
from scale_refiner.heads.id_head import IDHead
from scale_refiner.models.vit import VisionTransformer


def groups_by_param(groups):
    return {name.split(".", 1)[1] if name.startswith("encoder.") else name.replace("heads.", "", 1): g
            for g in groups for name in g["param_names"]}


def test_layer_decay_multipliers_for_24_blocks():
    depth, decay = 24, 0.65
    enc = VisionTransformer(patch_size=4, embed_dim=8, depth=depth, num_heads=2, img_size=8)
    heads = torch.nn.ModuleList([IDHead(8, 16, 8, 16)])
    by_name = groups_by_param(param_groups(enc, heads, depth, 0.05, 1e-5, decay))
    for name in ("patch_embed.proj.weight", "cls_token", "pos_embed"):
        assert by_name[name]["lr_scale"] == pytest.approx(decay ** 25), name
    for j in range(depth):
        assert by_name[f"blocks.{j}.attn.qkv.weight"]["lr_scale"] == pytest.approx(decay ** (24 - j))
        assert by_name[f"blocks.{j}.norm1.weight"]["lr_scale"] == pytest.approx(decay ** (24 - j))
    assert by_name["blocks.23.mlp.fc2.weight"]["lr_scale"] == pytest.approx(decay)
    assert by_name["norm.weight"]["lr_scale"] == 1.0
    assert by_name["0.projector.0.weight"]["lr_scale"] == 1.0


def test_weight_decay_rules():
    enc = VisionTransformer(patch_size=4, embed_dim=8, depth=2, num_heads=2, img_size=8)
    heads = torch.nn.ModuleList([IDHead(8, 16, 8, 16)])
    by_name = groups_by_param(param_groups(enc, heads, 2, 0.05, 1e-5, 0.65))
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    for name in ("blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "norm.bias", "cls_token", "pos_embed",
                 "patch_embed.proj.bias"):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["0.projector.0.weight"]["weight_decay"] == 1e-5
    assert by_name["0.projector.1.weight"]["weight_decay"] == 0.0  # BN affine
    assert by_name["0.predictor.4.bias"]["weight_decay"] == 0.0


def test_frozen_parameters_are_left_out():
    enc = VisionTransformer(patch_size=4, embed_dim=8, depth=4, num_heads=2, img_size=8)
    enc.freeze(2)
    heads = torch.nn.ModuleList([IDHead(8, 16, 8, 16)])
    names = set(groups_by_param(param_groups(enc, heads, 4, 0.05, 1e-5, 0.65)))
    assert not any(n.startswith(("blocks.0.", "blocks.1.", "patch_embed", "cls_token", "pos_embed")) for n in names)
    assert "blocks.2.attn.qkv.weight" in names
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad} | {n for n, _ in heads.named_parameters()}
    assert names == trainable


def test_warmup_then_cosine():
    lrs = [warmup_cosine(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert warmup_cosine(100, 100, 10, 1.0) == pytest.approx(0.0)
    assert scaled_lr(4e-4, 1024) == pytest.approx(1.6e-3)
