"""ViT: taps, multi-resolution, frozen prefix, non-reentrant checkpointing, timm exchange, ViT-2B size."""
import pytest
import timm
import torch

from scale_refiner.config import ModelConfig
from scale_refiner.models.vit import VisionTransformer, build_vit


def tiny(arch="prenorm", depth=4):
    torch.manual_seed(0)
    return VisionTransformer(patch_size=4, embed_dim=32, depth=depth, num_heads=2, img_size=32, arch=arch)


@pytest.mark.parametrize("arch", ["prenorm", "postnorm"])
def test_taps_and_final_match_a_manual_block_loop(arch):
    model = tiny(arch)
    x = torch.randn(3, 3, 32, 32)
    out = model([x], tap_blocks=[2, 0])[0]
    h = model.embed(x)
    raw = []
    for block in model.blocks:
        h = block(h)
        raw.append(h[:, 0])
    assert torch.allclose(out["taps"][:, 0], raw[2]) and torch.allclose(out["taps"][:, 1], raw[0])
    assert torch.allclose(out["final"], model.norm(h)[:, 0])


@pytest.mark.parametrize("arch", ["prenorm", "postnorm"])
def test_exchange_state_dict_with_timm(arch):
    ours = tiny(arch)
    theirs = timm.models.vision_transformer.VisionTransformer(**ours.timm_kwargs())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(theirs.forward_features(x), ours.forward_tokens(x))
    back = tiny(arch)
    torch.manual_seed(1)
    theirs2 = timm.models.vision_transformer.VisionTransformer(**ours.timm_kwargs())
    back.load_state_dict(theirs2.state_dict(), strict=True)
    assert torch.equal(back([x])[0]["final"], theirs2.forward_features(x)[:, 0])


def test_resolutions_in_one_call_equal_separate_calls_with_interpolated_pos():
    model = tiny()
    g, l = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)
    both = model([g, l], tap_blocks=[1])
    alone = model([l], tap_blocks=[1])[0]
    assert torch.allclose(both[1]["final"], alone["final"]) and torch.allclose(both[1]["taps"], alone["taps"])
    # The 16 px crop uses a 4x4 interpolation of the 8x8 grid, not the first 16 rows of the table.
    grid = model.pos_embed[:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    tokens = model.embed(l)
    patches = model.patch_embed(l)
    assert torch.allclose(tokens[:, 1:] - patches, expected.flatten(2).transpose(1, 2), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model([torch.randn(1, 3, 18, 18)])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_frozen_prefix_has_no_grad_and_first_trainable_block_does(checkpointing):
    model = tiny(depth=4)
    model.freeze(2)
    model.set_grad_checkpointing(checkpointing)
    out = model([torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)], tap_blocks=[0, 3])
    (out[0]["final"].sum() + out[1]["taps"].sum()).backward()
    for name, p in model.named_parameters():
        frozen = name.startswith(("patch_embed", "cls_token", "pos_embed", "blocks.0.", "blocks.1."))
        assert p.requires_grad != frozen, name
        if frozen:
            assert p.grad is None, name
    first = model.blocks[2].attn.qkv.weight.grad
    assert first is not None and first.abs().sum() > 0


def test_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny()
        model.freeze(1)
        model.set_grad_checkpointing(checkpointing)
        out = model([torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))], tap_blocks=[2])[0]
        (out["final"].pow(2).sum() + out["taps"].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_whole_freeze_runs_without_graph():
    model = tiny()
    model.freeze(0, whole=True)
    out = model([torch.randn(2, 3, 32, 32)], tap_blocks=[1])[0]
    assert not out["final"].requires_grad and not out["taps"].requires_grad
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="cannot freeze 5 blocks"):
        model.freeze(5)


def test_vit_2b_on_meta_has_1_89b_parameters():
    model = build_vit(ModelConfig(name="vit_2b_patch14"), device="meta")
    count = sum(p.numel() for p in model.parameters())
    assert 1.88e9 < count < 1.90e9, count
    assert all(p.is_meta for p in model.parameters())
    assert model.blocks[0].mlp.fc1.out_features == 10240 and model.blocks[0].attn.num_heads == 32
