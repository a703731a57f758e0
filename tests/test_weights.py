"""Checkpoint loading (MAE, timm, MAWS, data2vec 2.0 layouts) and timm export, on tiny ViTs.

Every layout test builds a file the way its source project writes it and compares our loaded model with an
independent reference: timm's own ``VisionTransformer`` where the source project uses it (MAE, timm, the
round trip), and a naive forward written here from the raw source tensors (MAWS, data2vec 2.0), so that a
wrong or swapped mapping changes the output. Models run in float64 so the comparisons can be tight.
"""
import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT

import scale_refiner.models.weights as weights
from scale_refiner.models.vit import VisionTransformer, sincos_pos_embed
from scale_refiner.models.weights import (WeightsError, detect_format, export_timm, load_checkpoint_file,
                                          load_pretrained, load_timm_export)

PATCH, DIM, DEPTH, HEADS, IMG = 4, 32, 3, 2, 32
GRID = IMG // PATCH
EPS = 1e-6
ATOL = 1e-10  # float64 throughout


def tiny(arch="prenorm", **overrides):
    kwargs = dict(patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, img_size=IMG, arch=arch)
    kwargs.update(overrides)
    return VisionTransformer(**kwargs).double().eval()


def images(seed=0, size=IMG, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@torch.no_grad()
def randomize_(module, seed):
    """Random values everywhere (norm gains around 1), so that any swapped or skipped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2
        p.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") else noise)
    return module


def our_cls(model, x):
    with torch.no_grad():
        return model([x])[0]["final"]


def timm_cls(model, x):
    with torch.no_grad():
        return model.forward_features(x)[:, 0]


def timm_twin(model):
    return TimmViT(**model.timm_kwargs()).double().eval()


# ------------------------------------------------------------ naive reference forwards (plain torch ops)
def naive_attention(x, sd, prefix, heads):
    b, n, d = x.shape
    qkv = F.linear(x, sd[f"{prefix}.qkv.weight"], sd[f"{prefix}.qkv.bias"])
    q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # each (B, H, N, hd)
    weights_ = torch.softmax(q @ k.transpose(-2, -1) * (d // heads) ** -0.5, dim=-1)
    out = (weights_ @ v).transpose(1, 2).reshape(b, n, d)
    return F.linear(out, sd[f"{prefix}.proj.weight"], sd[f"{prefix}.proj.bias"])


def naive_mlp(x, sd, prefix):
    hidden = F.gelu(F.linear(x, sd[f"{prefix}.fc1.weight"], sd[f"{prefix}.fc1.bias"]))
    return F.linear(hidden, sd[f"{prefix}.fc2.weight"], sd[f"{prefix}.fc2.bias"])


def naive_ln(x, sd, prefix):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=EPS)


def naive_patches(x, weight, bias):
    return F.conv2d(x, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)


def naive_prenorm_cls(sd, x, heads, prefix=""):
    """timm / MAWS ViT: cls + pos[0], patches + pos[1:], pre-norm blocks, final norm."""
    p = lambda name: f"{prefix}{name}"  # noqa: E731
    pos = sd[p("pos_embed")]
    tokens = naive_patches(x, sd[p("patch_embed.proj.weight")], sd[p("patch_embed.proj.bias")]) + pos[:, 1:]
    cls = (sd[p("cls_token")] + pos[:, :1]).expand(x.shape[0], -1, -1)
    h = torch.cat([cls, tokens], dim=1)
    depth = len({k.split(".")[1] for k in sd if k.startswith(p("blocks."))})
    for i in range(depth):
        blk = p(f"blocks.{i}")
        h = h + naive_attention(naive_ln(h, sd, f"{blk}.norm1"), sd, f"{blk}.attn", heads)
        h = h + naive_mlp(naive_ln(h, sd, f"{blk}.norm2"), sd, f"{blk}.mlp")
    return naive_ln(h, sd, p("norm"))[:, 0]


D2V = "modality_encoders.IMAGE."


def naive_d2v2_cls(sd, x, heads, prenet_depth, depth):
    """data2vec 2.0 image encoder from fairseq names: patches + positions, prepend the extra token (no
    position), LayerNorm, prenet blocks then top-level blocks, each x = LN1(x + attn(x)); x = LN2(x + mlp(x))."""
    tokens = naive_patches(x, sd[D2V + "local_encoder.proj.weight"], sd[D2V + "local_encoder.proj.bias"])
    tokens = tokens + sd[D2V + "fixed_positional_encoder.positions"]
    h = torch.cat([sd[D2V + "extra_tokens"].expand(x.shape[0], -1, -1), tokens], dim=1)
    h = naive_ln(h, sd, D2V + "context_encoder.norm")
    names = [f"{D2V}context_encoder.blocks.{i}" for i in range(prenet_depth)] + [f"blocks.{i}" for i in range(depth)]
    for blk in names:
        h = naive_ln(h + naive_attention(h, sd, f"{blk}.attn", heads), sd, f"{blk}.norm1")
        h = naive_ln(h + naive_mlp(h, sd, f"{blk}.mlp"), sd, f"{blk}.norm2")
    return h[:, 0]


def fairseq_block(prefix, g, dim=DIM):
    shapes = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
              "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
              "norm2.weight": (dim,), "norm2.bias": (dim,), "mlp.fc1.weight": (4 * dim, dim),
              "mlp.fc1.bias": (4 * dim,), "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,)}
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g, dtype=torch.float64) * 0.2
        out[f"{prefix}.{name}"] = t + 1.0 if "norm" in name and name.endswith("weight") else t
    return out


def d2v2_state_dict(prenet_depth=0, depth=DEPTH, seed=0):
    """A data2vec 2.0 image pre-training state dict with fairseq's names (Data2VecMultiModel.state_dict)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64) * 0.2  # noqa: E731
    sd = {
        D2V + "local_encoder.proj.weight": rnd(DIM, 3, PATCH, PATCH),
        D2V + "local_encoder.proj.bias": rnd(DIM),
        D2V + "fixed_positional_encoder.positions": sincos_pos_embed(DIM, GRID)[1:].double().unsqueeze(0),
        D2V + "extra_tokens": rnd(1, 1, DIM),
        D2V + "context_encoder.norm.weight": rnd(DIM) + 1.0,
        D2V + "context_encoder.norm.bias": rnd(DIM),
        # conv decoder (Decoder2d) and its projection: pre-training only
        D2V + "decoder.blocks.0.0.weight": rnd(16, DIM // 16, 5, 5),
        D2V + "decoder.blocks.0.0.bias": rnd(16),
        D2V + "decoder.proj.weight": rnd(DIM, 16),
        D2V + "decoder.proj.bias": rnd(DIM),
    }
    for i in range(prenet_depth):
        sd.update(fairseq_block(f"{D2V}context_encoder.blocks.{i}", g))
    for i in range(depth):
        sd.update(fairseq_block(f"blocks.{i}", g))
    return sd


# ------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("arch", ["prenorm", "postnorm"])
def test_round_trip_through_timm(arch):
    ours = randomize_(tiny(arch), seed=1)
    twin = timm_twin(ours)
    twin.load_state_dict(ours.state_dict(), strict=True)
    x = images()
    torch.testing.assert_close(timm_cls(twin, x), our_cls(ours, x), rtol=0, atol=1e-12)

    back = tiny(arch)
    back.load_state_dict(twin.state_dict(), strict=True)
    assert torch.equal(our_cls(back, x), our_cls(ours, x))


# ------------------------------------------------------------------------------------------- MAE
def test_mae_official_pth_drops_decoder_and_matches_timm(tmp_path):
    twin = randomize_(timm_twin(tiny()), seed=2)
    decoder = {
        "mask_token": torch.randn(1, 1, 16),
        "decoder_embed.weight": torch.randn(16, DIM), "decoder_embed.bias": torch.randn(16),
        "decoder_pos_embed": torch.randn(1, 1 + GRID ** 2, 16),
        "decoder_blocks.0.norm1.weight": torch.randn(16), "decoder_blocks.0.attn.qkv.weight": torch.randn(48, 16),
        "decoder_norm.weight": torch.randn(16), "decoder_norm.bias": torch.randn(16),
        "decoder_pred.weight": torch.randn(PATCH * PATCH * 3, 16), "decoder_pred.bias": torch.randn(48),
    }
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    # MAE's save_model layout (util/misc.py), minus the objects weights_only refuses ('args').
    torch.save({"model": {**twin.state_dict(), **decoder}, "epoch": 799}, path)

    model = tiny()
    report = load_pretrained(model, path)
    assert report["format"] == "mae"
    assert report["dropped"] == sorted(decoder)
    assert report["renamed"] == {}
    assert report["resampled_pos_embed"] is None
    x = images(3)
    torch.testing.assert_close(our_cls(model, x), timm_cls(twin, x), rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------- timm
def test_timm_safetensors_drops_head(tmp_path):
    twin = randomize_(TimmViT(**{**tiny().timm_kwargs(), "num_classes": 10}).double(), seed=4)
    path = tmp_path / "vit_tiny.safetensors"
    save_file(twin.state_dict(), str(path))

    model = tiny()
    report = load_pretrained(model, path)
    assert report["format"] == "timm"
    assert report["dropped"] == ["head.bias", "head.weight"]
    x = images(5)
    torch.testing.assert_close(our_cls(model, x), timm_cls(twin.eval(), x), rtol=0, atol=ATOL)


def test_timm_global_pool_checkpoint_is_refused_for_its_missing_norm(tmp_path):
    # With global_pool='avg' timm (and MAE fine-tuning) keep fc_norm instead of norm: fc_norm is dropped as a
    # pooled-feature norm, so the CLS-token norm is missing and must be reported, not invented.
    twin = TimmViT(**{**tiny().timm_kwargs(), "global_pool": "avg"})
    assert "fc_norm.weight" in twin.state_dict() and "norm.weight" not in twin.state_dict()
    path = tmp_path / "vit_avgpool.safetensors"
    save_file(twin.state_dict(), str(path))
    with pytest.raises(WeightsError) as info:
        load_pretrained(tiny(), path)
    assert "norm.weight" in str(info.value) and "norm.bias" in str(info.value)


def test_pos_embed_from_another_resolution_is_resampled(tmp_path):
    # MAWS fine-tuned files are at 512/518 px; here: a grid of 10 loaded into a grid of 8.
    twin = randomize_(TimmViT(**{**tiny().timm_kwargs(), "img_size": 40}).double(), seed=6)
    path = tmp_path / "vit_res40.pth"
    torch.save(twin.state_dict(), path)

    model = tiny()
    report = load_pretrained(model, path)
    assert report["resampled_pos_embed"] == {"from": [10, 10], "to": [8, 8]}
    source = twin.state_dict()["pos_embed"]
    assert torch.equal(model.pos_embed[:, :1], source[:, :1])  # CLS slot untouched
    expected = resample_abs_pos_embed(source, new_size=[8, 8], old_size=[10, 10], num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=False)
    torch.testing.assert_close(model.pos_embed.data, expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------- MAWS
def test_maws_flat_timm_file_matches_naive_forward(tmp_path):
    # maws/model_builder.py: timm VisionTransformer(..., num_classes=0) and load_state_dict(torch.load(file)):
    # a flat timm state dict, no wrapper. Checked against a forward written from the raw tensors.
    source = randomize_(timm_twin(tiny()), seed=7).state_dict()
    path = tmp_path / "vit_2b14.pt"
    torch.save(source, path)
    assert detect_format(load_checkpoint_file(path)) == "native"

    model = tiny()
    report = load_pretrained(model, path, fmt="maws")
    assert report["dropped"] == [] and report["renamed"] == {}
    x = images(8)
    torch.testing.assert_close(our_cls(model, x), naive_prenorm_cls(source, x, HEADS), rtol=0, atol=ATOL)


def test_maws_clip_file_takes_the_vision_encoder(tmp_path):
    # maws/model.py CLIP: vision_encoder (timm ViT), text_encoder, projections and logit_scale.
    vision = randomize_(timm_twin(tiny()), seed=9).state_dict()
    clip = {f"vision_encoder.{k}": v for k, v in vision.items()}
    text_tower = {"text_encoder.encoder.transformer.layers.0.attention.in_proj_weight": torch.randn(12, 4),
                  "text_projection": torch.randn(8, DIM), "vision_projection": torch.randn(DIM, DIM),
                  "logit_scale": torch.tensor(2.6)}
    path = tmp_path / "vit_b16_xlmr_b.pt"
    torch.save({**clip, **text_tower}, path)

    model = tiny()
    report = load_pretrained(model, path)
    assert report["format"] == "maws"
    assert report["dropped"] == sorted(text_tower)
    assert report["renamed"]["vision_encoder.blocks.2.mlp.fc2.bias"] == "blocks.2.mlp.fc2.bias"
    x = images(10)
    torch.testing.assert_close(our_cls(model, x), naive_prenorm_cls(vision, x, HEADS), rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------- data2vec 2.0
@pytest.mark.parametrize("prenet_depth", [0, 1])
def test_d2v2_checkpoint_matches_naive_postnorm_forward(tmp_path, prenet_depth):
    depth = DEPTH - prenet_depth  # fairseq splits the encoder into prenet (context_encoder) + top-level blocks
    sd = d2v2_state_dict(prenet_depth=prenet_depth, depth=depth, seed=11)
    ema = {"blocks.0.attn.qkv.weight": torch.randn(3 * DIM, DIM)}
    path = tmp_path / "data2vec2_tiny.pt"
    torch.save({"model": {**sd, "_ema": ema}}, path)

    model = tiny("postnorm")
    report = load_pretrained(model, path)
    assert report["format"] == "d2v2"
    assert report["dropped"] == sorted([k for k in sd if ".decoder." in k] + ["_ema.blocks.0.attn.qkv.weight"])
    assert report["renamed"][D2V + "extra_tokens"] == "cls_token"
    last = f"blocks.{depth - 1}.norm2.weight"  # top-level blocks follow the prenet blocks
    assert report["renamed"].get(last, last) == f"blocks.{DEPTH - 1}.norm2.weight"
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(DIM, dtype=torch.float64))
    x = images(12)
    expected = naive_d2v2_cls(sd, x, HEADS, prenet_depth, depth)
    torch.testing.assert_close(our_cls(model, x), expected, rtol=0, atol=ATOL)


def test_d2v2_finetuned_layout_with_model_prefix(tmp_path):
    # mae_image_classification.py nests the encoder under 'model.' and adds fc_norm / head.
    sd = {k: v for k, v in d2v2_state_dict(seed=13).items() if ".decoder." not in k}
    finetuned = {f"model.{k}": v for k, v in sd.items()}
    finetuned.update({"fc_norm.weight": torch.ones(DIM), "fc_norm.bias": torch.zeros(DIM),
                      "head.weight": torch.randn(10, DIM), "head.bias": torch.zeros(10)})
    path = tmp_path / "data2vec2_tiny_ft.safetensors"
    save_file(finetuned, str(path))

    model = tiny("postnorm")
    report = load_pretrained(model, path)
    assert report["format"] == "d2v2"
    assert report["dropped"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    x = images(14)
    torch.testing.assert_close(our_cls(model, x), naive_d2v2_cls(sd, x, HEADS, 0, DEPTH), rtol=0, atol=ATOL)


def test_d2v2_into_prenorm_model_is_refused(tmp_path):
    path = tmp_path / "data2vec2_tiny.pt"
    torch.save({"model": d2v2_state_dict()}, path)
    with pytest.raises(WeightsError) as info:
        load_pretrained(tiny("prenorm"), path)
    message = str(info.value)
    assert "norm.weight" in message  # our final norm has no source
    assert f"norm_pre.weight (from {D2V}context_encoder.norm.weight)" in message


# ------------------------------------------------------------------------------------------- errors
def native_file(tmp_path, name, state):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def assert_untouched(model, before):
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_missing_block_keys_are_all_listed(tmp_path):
    state = dict(randomize_(tiny(), seed=15).state_dict())
    for key in ("blocks.1.attn.qkv.weight", "blocks.2.mlp.fc1.bias", "norm.bias"):
        del state[key]
    path = native_file(tmp_path, "missing_block.safetensors", state)
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_pretrained(model, path)
    message = str(info.value)
    assert "missing_block.safetensors" in message and "missing (3)" in message
    for key in ("blocks.1.attn.qkv.weight", "blocks.2.mlp.fc1.bias", "norm.bias"):
        assert key in message
    assert_untouched(model, before)


def test_unknown_keys_are_unexpected_not_ignored(tmp_path):
    state = dict(tiny().state_dict())
    state["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    state["totally_unknown"] = torch.zeros(3)
    path = native_file(tmp_path, "extra_keys.safetensors", state)
    with pytest.raises(WeightsError) as info:
        load_pretrained(tiny(), path)
    message = str(info.value)
    assert "extra_keys.safetensors" in message and "unexpected (2)" in message
    assert "blocks.0.attn.q_norm.weight" in message and "totally_unknown" in message


def test_other_model_size_lists_every_shape_mismatch(tmp_path):
    bigger = tiny(embed_dim=48, num_heads=3)
    path = native_file(tmp_path, "vit_dim48.safetensors", bigger.state_dict())
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_pretrained(model, path)
    message = str(info.value)
    assert "vit_dim48.safetensors" in message
    assert f"shape mismatch ({len(bigger.state_dict())})" in message
    for key in bigger.state_dict():
        assert f"{key}: checkpoint" in message
    assert "blocks.0.attn.qkv.weight: checkpoint (144, 48) vs model (96, 32)" in message
    assert_untouched(model, before)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "no_such_checkpoint.pth"
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint.pth"):
        load_pretrained(tiny(), path)


def test_unreadable_files_name_the_path(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth"):
        load_checkpoint_file(garbage)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match="broken.safetensors"):
        load_checkpoint_file(broken)
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"")
    with pytest.raises(WeightsError, match="weights.npz"):
        load_checkpoint_file(odd)


# ------------------------------------------------------------------------------------------- weights_only
EXECUTED = []


def _mark_executed():
    EXECUTED.append(True)
    return "payload"


class Payload:
    """Unpickling this calls _mark_executed: what a hostile checkpoint would do."""

    def __reduce__(self):
        return (_mark_executed, ())


def test_torch_load_is_called_with_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "plain.pth"
    torch.save({"model": tiny().state_dict()}, path)
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    load_pretrained(tiny(), path)
    assert calls and all(c.get("weights_only") is True and c.get("map_location") == "cpu" for c in calls)


@pytest.mark.parametrize("zipfile", [True, False])
def test_checkpoints_are_memory_mapped_and_the_old_format_still_loads(tmp_path, monkeypatch, zipfile):
    """Current torch files are mapped (the ranks of a node share one page-cache copy); the pre-1.6 format,
    which cannot be, is read the ordinary way, with the same tensors."""
    state = tiny().state_dict()
    path = tmp_path / "model.pth"
    torch.save({"model": state}, path, _use_new_zipfile_serialization=zipfile)
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("mmap", False))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    loaded = load_checkpoint_file(path)
    assert calls == ([True] if zipfile else [True, False])
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    path = tmp_path / "hostile.pth"
    torch.save({"model": tiny().state_dict(), "extra": Payload()}, path)
    EXECUTED.clear()
    with pytest.raises(WeightsError, match="hostile.pth"):
        load_checkpoint_file(path)
    assert EXECUTED == []
    with pytest.raises(pickle.UnpicklingError):  # the refusal is torch's weights_only unpickler
        torch.load(path, weights_only=True)


# ------------------------------------------------------------------------------------------- export
def legacy_export(model, out, name, block_fn=None):
    """The layout exports had before timm's hub layout: <name>.safetensors + <name>.json with timm_kwargs."""
    kwargs, callables = {}, []
    for key, value in model.timm_kwargs().items():
        if isinstance(value, type):
            kwargs[key], callables = f"{value.__module__}:{value.__qualname__}", callables + [key]
        else:
            kwargs[key] = value
    if block_fn is not None:
        kwargs["block_fn"] = block_fn
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors"))
    (out / f"{name}.json").write_text(json.dumps({
        "architecture": weights.TIMM_ARCHITECTURE, "timm_kwargs": kwargs, "callable_kwargs": callables,
        "extra_config": {}}))
    return out / f"{name}.safetensors", out / f"{name}.json"


@pytest.mark.parametrize("arch", ["prenorm", "postnorm"])
def test_export_timm_writes_timm_hub_layout_that_create_model_loads(tmp_path, arch):
    """The export directory is timm's hub layout: timm.create_model("local-dir:...") builds the model, loads the
    weights bit for bit, computes our encoder's CLS token, and resolve_data_config gives the trained preprocessing
    (not timm's 224 px / mean 0.5 defaults of a ViT name)."""
    import timm
    from timm.data import resolve_data_config
    from timm.models.vision_transformer import Block

    model = randomize_(tiny(arch), seed=21).float()
    weights_path, config_path = export_timm(model, tmp_path / "export", arch, extra_config={"source": "unit test"})
    export_dir = tmp_path / "export" / arch
    assert (weights_path, config_path) == (export_dir / "model.safetensors", export_dir / "config.json")
    assert sorted(os.listdir(export_dir)) == ["README.md", "config.json", "model.safetensors"]  # no temp files
    config = json.loads(config_path.read_text())
    assert config["num_classes"] == 0 and config["num_features"] == DIM and config["global_pool"] == "token"
    assert config["model_args"] == dict(img_size=IMG, patch_size=PATCH, in_chans=3, embed_dim=DIM, depth=DEPTH,
                                        num_heads=HEADS, mlp_ratio=4.0, qkv_bias=True, num_classes=0,
                                        global_pool="token")
    assert config["scale_refiner"] == {"source": "unit test"}
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, IMG, IMG] and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 1.0
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["std"] == [0.229, 0.224, 0.225]
    # pre-norm is plain timm (a registry ViT name + model_args); post-norm needs our registered entry point
    assert config["architecture"] == ("vit_base_patch16_224" if arch == "prenorm" else weights.POSTNORM_ARCHITECTURE)

    created = timm.create_model(f"local-dir:{export_dir}", pretrained=True).eval()
    assert isinstance(created, TimmViT)
    assert (type(created.blocks[0]) is Block) == (arch == "prenorm")
    state = created.state_dict()
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in resolve_data_config({}, model=created).items()}
    assert data == {"input_size": (3, IMG, IMG), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                    "std": (0.229, 0.224, 0.225), "crop_pct": 1.0, "crop_mode": "center"}
    x = images(22).float()
    with torch.no_grad():
        assert torch.equal(created(x), model.eval()([x])[0]["final"])
        assert torch.equal(created.forward_features(x), model.forward_tokens(x))

    # our loader keeps the exported dtype: a float64 export comes back float64
    model64 = randomize_(tiny(arch), seed=17)
    export_timm(model64, tmp_path / "export64", "m")
    for path in (tmp_path / "export64" / "m", tmp_path / "export64" / "m" / "config.json"):
        rebuilt = load_timm_export(path).eval()
        assert isinstance(rebuilt, TimmViT) and rebuilt.cls_token.dtype == torch.float64
        torch.testing.assert_close(timm_cls(rebuilt, images(18)), our_cls(model64, images(18)), rtol=0, atol=1e-12)
    # and the exported weights load back into our model as 'native'
    again = tiny(arch)
    assert load_pretrained(again, tmp_path / "export64" / "m" / "model.safetensors")["format"] == "native"
    assert torch.equal(our_cls(again, images(18)), our_cls(model64, images(18)))


def test_export_data_config_and_model_card(tmp_path):
    """A caller's preprocessing replaces the defaults; the card names the encoder, recipe, data, k-NN, the
    create_model line and the preprocessing; a key timm's pretrained_cfg does not know is refused unwritten."""
    import timm
    from timm.data import resolve_data_config

    card = {"title": "MIM-Refiner test ViT", "encoder": "EMA encoder",
            "recipe": {"model": "vit_test_patch4 (prenorm), 32 px", "stages": "heads 0.5 epochs, refine 9 epochs",
                       "batch size": 128},
            "data": {"data set": "fashion-mnist", "train images": 60000},
            "knn": {"online": {"10": 0.712, "20": 0.705}, "EMA": {"10": 0.7234, "20": 0.7}}}
    mean, std = [0.2860] * 3, [0.3530] * 3
    _, config_path = export_timm(tiny().float(), tmp_path, "ema", card=card,
                                 data_config={"mean": mean, "std": std, "interpolation": "bilinear"})
    created = timm.create_model(f"local-dir:{config_path.parent}", pretrained=True)
    data = resolve_data_config({}, model=created)
    assert list(data["mean"]) == mean and list(data["std"]) == std and data["interpolation"] == "bilinear"
    text = (config_path.parent / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: timm\n")
    for needle in ("# MIM-Refiner test ViT", "the EMA encoder of the run", "| batch size | 128 |",
                   "| data set | fashion-mnist |", "| train images | 60000 |", "| encoder | k-NN@10 | k-NN@20 |",
                   "| EMA | 72.3 % | 70.0 % |", "| online | 71.2 % | 70.5 % |",
                   'timm.create_model("local-dir:PATH/TO/THIS/DIRECTORY", pretrained=True)',
                   "resolve_data_config", "RGB, 32x32 px", "(bilinear)", "mean (0.286, 0.286, 0.286)",
                   "| patch size / width / depth / heads | 4 / 32 / 3 / 2 |"):
        assert needle in text, needle
    assert "http" not in text and "scale_refiner.models.weights" not in text  # pre-norm: plain timm loads it
    post = export_timm(tiny("postnorm").float(), tmp_path, "post")[1].parent / "README.md"
    assert "import scale_refiner.models.weights" in post.read_text() and "Not measured" in post.read_text()

    with pytest.raises(ValueError, match="pretrained_cfg does not know.*'crop'"):
        export_timm(tiny(), tmp_path, "bad", data_config={"crop": 0.9})
    assert not (tmp_path / "bad").exists()


def test_legacy_export_pair_still_loads(tmp_path):
    """An export in the layout before the hub one (<name>.safetensors + <name>.json) still loads, both files."""
    model = randomize_(tiny("postnorm"), seed=5)
    weights_path, config_path = legacy_export(model, tmp_path, "ema")
    for path in (weights_path, config_path):
        rebuilt = load_timm_export(path).eval()
        assert rebuilt.cls_token.dtype == torch.float64
        torch.testing.assert_close(timm_cls(rebuilt, images(3)), our_cls(model, images(3)), rtol=0, atol=1e-12)
    with pytest.raises(FileNotFoundError, match="export file not found"):
        load_timm_export(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="not an export directory"):
        load_timm_export(tmp_path)


def test_failed_export_leaves_no_files(tmp_path, monkeypatch):
    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(weights, "save_file", failing_save)
    out = tmp_path / "export"
    with pytest.raises(OSError, match="disk full"):
        export_timm(tiny(), out, "tiny")
    assert os.listdir(out / "tiny") == []


def test_legacy_export_config_may_only_name_known_packages(tmp_path):
    _, config_path = legacy_export(tiny("postnorm"), tmp_path, "tiny", block_fn="os:system")
    with pytest.raises(WeightsError, match="refusing to import 'os'"):
        load_timm_export(config_path)


def test_default_preprocessing_is_the_pipelines():
    """An export that names no preprocessing gets what every pipeline applies (models may not import data, so
    weights.py takes timm's ImageNet constants: they must stay data.augment's)."""
    from scale_refiner.config import RefineConfig
    from scale_refiner.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from scale_refiner.eval.card import run_data_config
    default = weights.default_data_config(tiny())
    assert default["mean"] == list(IMAGENET_MEAN) and default["std"] == list(IMAGENET_STD)
    cfg = RefineConfig()
    cfg.model.img_size = cfg.augment.global_size = IMG
    assert run_data_config(cfg) == default


def test_plain_timm_loads_a_prenorm_export_and_refuses_a_postnorm_one(tmp_path):
    """In a process that never imports scale_refiner: timm alone builds and loads the pre-norm export; the
    post-norm one names an architecture only scale_refiner registers, so timm refuses it instead of building a
    pre-norm model with the wrong forward."""
    import subprocess
    import sys
    model = randomize_(tiny(), seed=31).float().eval()
    export_timm(model, tmp_path, "pre")
    export_timm(tiny("postnorm").float(), tmp_path, "post")
    x = images(32).float()
    torch.save(x, tmp_path / "x.pt")
    torch.save(model([x])[0]["final"].detach(), tmp_path / "ours.pt")
    script = f"""
import sys, torch, timm
m = timm.create_model("local-dir:{tmp_path / 'pre'}", pretrained=True).eval()
with torch.no_grad():
    assert torch.equal(m(torch.load("{tmp_path / 'x.pt'}")), torch.load("{tmp_path / 'ours.pt'}"))
assert timm.data.resolve_data_config({{}}, model=m)["input_size"] == (3, {IMG}, {IMG})
try:
    timm.create_model("local-dir:{tmp_path / 'post'}", pretrained=True)
except RuntimeError as exc:
    assert "Unknown model (vit_data2vec2_postnorm)" in str(exc), exc
else:
    raise AssertionError("timm built the post-norm export without scale_refiner")
assert not any(name.startswith("scale_refiner") for name in sys.modules)
print("ok")
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
