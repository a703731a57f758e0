"""MAE pre-training: the method against naive references, the weights file against the refiner's MAE import,
and the launcher (1 process, ZeRO-3 and FSDP2 on 2 CPU ranks) with reuse, stop and bit-identical resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale_refiner.config import ConfigError, PretrainConfig, load_config
from scale_refiner.engine.distributed import free_port
from scale_refiner.mae import MAEPretrainer, build_mae, mask_noise, mae_state_dict, patchify
from scale_refiner.models.vit import VisionTransformer
from scale_refiner.models.weights import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["model.name=vit_test_patch4", "model.img_size=16", "augment.global_size=16", "augment.local_size=8",
        "mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2", "data.batch_size=8",
        "data.num_workers=0", "data.pipeline=memory", "data.samples_per_epoch=32", "stages.mae.epochs=2",
        "stages.mae.warmup_epochs=0.5", "run.log_every=1", "engine.zero_config=ds_configs/cpu_demo.json"]


def tiny_mae(mask_ratio=0.75, norm_pix_loss=True):
    torch.manual_seed(0)
    encoder = VisionTransformer(patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16)
    return MAEPretrainer(encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2, mask_ratio=mask_ratio,
                         norm_pix_loss=norm_pix_loss)


def test_patchify_matches_a_loop_over_patches():
    images = torch.randn(2, 3, 8, 12)
    out = patchify(images, 4)
    assert out.shape == (2, 6, 48)
    for b in range(2):
        for row in range(2):
            for col in range(3):
                patch = images[b, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4]  # c, p, q
                assert torch.equal(out[b, row * 3 + col], patch.permute(1, 2, 0).reshape(-1))


def test_visible_encoding_equals_the_encoder_on_the_kept_patches_only():
    model = tiny_mae().eval()
    images = torch.randn(3, 3, 16, 16)
    noise = torch.rand(3, 16)
    latent, mask, restore = model.encode_visible(images, noise)
    enc = model.encoder
    assert latent.shape == (3, 1 + 4, 32) and mask.sum(1).tolist() == [12, 12, 12]
    for b in range(3):
        kept = noise[b].argsort()[:4]  # the 4 smallest noises are kept, in that order
        assert mask[b, kept].sum() == 0
        tokens = enc.patch_embed(images[b:b + 1])[0] + enc.pos_embed[0, 1:]
        x = torch.cat([enc.cls_token[0] + enc.pos_embed[0, :1], tokens[kept]])[None]
        for block in enc.blocks:
            x = block(x)
        torch.testing.assert_close(latent[b], enc.norm(x)[0], rtol=1e-5, atol=1e-5)
        shuffle = noise[b].argsort()
        assert torch.equal(shuffle[restore[b]], torch.arange(16))


def test_decoder_puts_each_token_back_at_its_patch_position():
    model = tiny_mae().eval()
    dec = model.decoder
    latent = torch.randn(2, 1 + 4, 32)
    noise = torch.rand(2, 16)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    out = dec(latent, restore)
    for b in range(2):  # naive: place visible tokens at their patches, mask tokens elsewhere, then the blocks
        embedded = dec.decoder_embed(latent[b])
        tokens = dec.mask_token[0].expand(16, -1).clone()
        tokens[shuffle[b, :4]] = embedded[1:]
        x = torch.cat([embedded[:1], tokens])[None] + dec.decoder_pos_embed
        for block in dec.decoder_blocks:
            x = block(x)
        torch.testing.assert_close(out[b], dec.decoder_pred(dec.decoder_norm(x))[0, 1:], rtol=1e-5, atol=1e-5)


def test_raw_pixel_loss_without_normalisation():
    model = tiny_mae(norm_pix_loss=False)
    images = torch.randn(1, 3, 16, 16)
    target = patchify(images, 4)
    mask = torch.zeros(1, 16)
    mask[0, 3] = 1
    pred = target + 0.5
    torch.testing.assert_close(model.loss(images, pred, mask).item(), 0.25)


def test_loss_is_the_mean_squared_error_on_hidden_patches_of_normalised_pixels():
    model = tiny_mae()
    images = torch.randn(2, 3, 16, 16)
    pred = torch.randn(2, 16, 48)
    mask = (torch.rand(2, 16) < 0.75).float()
    total, count = 0.0, 0
    for b in range(2):
        for i in range(16):
            if mask[b, i]:
                target = patchify(images, 4)[b, i]
                target = (target - target.mean()) / (target.var() + 1e-6).sqrt()
                total += ((pred[b, i] - target) ** 2).mean().item()
                count += 1
    torch.testing.assert_close(model.loss(images, pred, mask).item(), total / count, rtol=1e-5, atol=1e-6)


def test_masks_of_ranks_are_rows_of_the_one_process_mask():
    full = mask_noise(2, 8, 16, seed=3, step=5, rank=0, world=1, device="cpu").view(2, 8, 16)
    parts = [mask_noise(2, 4, 16, seed=3, step=5, rank=r, world=2, device="cpu").view(2, 4, 16) for r in (0, 1)]
    assert torch.equal(torch.cat(parts, dim=1), full)  # rank r holds images 4r..4r+3 of both views
    assert not torch.equal(full, mask_noise(2, 8, 16, 3, 6, 0, 1, "cpu").view(2, 8, 16))  # new masks each step


def test_pretraining_lowers_the_reconstruction_loss_and_trains_no_position_embedding():
    model = tiny_mae()
    model.set_stage("mae")
    pos = model.encoder.pos_embed.detach().clone()
    decoder_pos = model.decoder.decoder_pos_embed.detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    images = torch.randn(16, 3, 16, 16)
    losses = []
    for _ in range(40):
        loss, _ = model(images, step=0)  # the same masks every step: a memorisation problem
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]  # 1.37 -> 0.90 when written
    assert torch.equal(model.encoder.pos_embed, pos) and torch.equal(model.decoder.decoder_pos_embed, decoder_pos)


def test_weights_file_loads_into_the_refiners_encoder_as_the_mae_format(tmp_path):
    model = tiny_mae()
    state = mae_state_dict(model.state_dict())
    assert {"mask_token", "decoder_embed.weight", "decoder_pos_embed", "cls_token", "blocks.0.attn.qkv.weight"} \
        <= set(state)
    torch.save({"model": state}, tmp_path / "mae.pth")
    encoder = VisionTransformer(patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16)
    report = load_pretrained(encoder, tmp_path / "mae.pth")
    assert report["format"] == "mae"
    for name, value in model.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], value), name


@pytest.mark.parametrize("override, key", [
    ("augment.num_local=2", "augment.num_local"),
    ("mae.mask_ratio=1.0", "mae.mask_ratio"),
    ("mae.decoder_heads=3", "mae.decoder_heads"),
    ("augment.global_size=8", "augment.global_size"),
    ("model.freeze_blocks=1", "model.freeze_blocks"),
])
def test_bad_pretraining_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/demo_mae.yaml", TINY + [override], schema_class=PretrainConfig)


def test_demo_recipe_builds():
    cfg = load_config("configs/demo_mae.yaml", schema_class=PretrainConfig)
    model = build_mae(cfg)
    assert model.encoder.embed_dim == 128 and len(model.decoder.decoder_blocks) == cfg.mae.decoder_depth


# ------------------------------------------------------------------------------------------- the launcher
def pretrain(out, extra=(), kind="single"):
    args = [str(ROOT / "launch/pretrain_mae.py"), "--config", "configs/demo_mae.yaml", f"run.out_dir={out}",
            *TINY, *extra]
    if kind == "single":
        cmd = [sys.executable, *args, "engine.kind=single"]
    elif kind == "deepspeed":
        cmd = [sys.executable, str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *args,
               "engine.kind=deepspeed"]
    else:
        cmd = [sys.executable, str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
               *args, "engine.kind=fsdp2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{kind} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def weights(out):
    return torch.load(Path(out) / "mae_pretrained.pth", weights_only=True)["model"]


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mae_straight")
    proc = pretrain(out)
    (out / "launcher_output.txt").write_text(proc.stdout + proc.stderr)
    return out


def test_mae_step_log_reports_no_queue_metrics(straight_run):
    """MAE has no NN queue: its step lines carry loss, lr and throughput, not an 'nn-acc nan'."""
    steps = [line for line in (straight_run / "launcher_output.txt").read_text().splitlines()
             if " step " in line and " loss " in line]
    assert steps and not any("nn-acc" in line or "nan" in line for line in steps), steps[:3]


def test_launcher_writes_weights_and_reuses_them(straight_run):
    assert len(losses(straight_run)) == 8  # 32 samples / 8 = 4 steps an epoch, 2 epochs
    before = (straight_run / "mae_pretrained.pth").stat().st_mtime_ns
    proc = pretrain(straight_run)
    assert "reused" in proc.stdout
    assert (straight_run / "mae_pretrained.pth").stat().st_mtime_ns == before
    recipe = json.loads((straight_run / "mae_pretrained.json").read_text())
    assert recipe["mae"]["decoder_dim"] == 16 and "out_dir" not in recipe["run"]


def test_another_recipe_is_not_reused_and_force_starts_over(straight_run, tmp_path):
    pretrain(tmp_path)
    first = weights(tmp_path)
    changed = subprocess.run([sys.executable, str(ROOT / "launch/pretrain_mae.py"), "--config", "configs/demo_mae.yaml",
                              f"run.out_dir={tmp_path}", "run.resume=auto", *TINY, "stages.mae.base_lr=3e-3",
                              "engine.kind=single"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert changed.returncode == 2 and "another model or recipe" in changed.stderr
    assert torch.equal(weights(tmp_path)["blocks.0.attn.qkv.weight"], first["blocks.0.attn.qkv.weight"])
    pretrain(tmp_path, ["stages.mae.base_lr=3e-3", "run.resume=auto", "--force"])
    again = weights(tmp_path)
    assert not torch.equal(again["blocks.0.attn.qkv.weight"], first["blocks.0.attn.qkv.weight"])
    assert json.loads((tmp_path / "mae_pretrained.json").read_text())["stages"]["mae"]["base_lr"] == 3e-3


def test_stop_and_resume_is_bit_identical(straight_run, tmp_path):
    pretrain(tmp_path, ["run.stop_after=3"])
    assert not (tmp_path / "mae_pretrained.pth").exists()
    pretrain(tmp_path, ["run.resume=auto"])
    a, b = weights(straight_run), weights(tmp_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["deepspeed", "fsdp2"])  # ZeRO-3; FSDP2 with every encoder/decoder block a unit
def test_two_ranks_equal_one_process(straight_run, tmp_path, kind):
    pretrain(tmp_path, kind=kind)
    torch.testing.assert_close(losses(tmp_path), losses(straight_run), rtol=1e-4, atol=1e-6)
    a, b = weights(straight_run), weights(tmp_path)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)


def test_run_control_keys_do_not_change_the_recipe():
    """A preempted MAE run resumes (and its finished weights are reused) whatever its stop signals, timed
    saves, timeout or allowed resume changes: they say how the run is kept alive, not what it trains."""
    from scale_refiner.cli.pretrain_mae import mae_signature
    base = load_config(ROOT / "configs/demo_mae.yaml", schema_class=PretrainConfig)
    other = load_config(ROOT / "configs/demo_mae.yaml", [
        "run.timeout_minutes=60", "run.save_every_minutes=5", "run.stop_signals=[SIGUSR1]", "run.control_every=4",
        "run.resume_allow_changes=[data.batch_size]"], schema_class=PretrainConfig)
    assert mae_signature(base) == mae_signature(other)
    changed = load_config(ROOT / "configs/demo_mae.yaml", ["stages.mae.base_lr=7.7e-4"], schema_class=PretrainConfig)
    assert mae_signature(base) != mae_signature(changed)


def test_periodic_knn_is_logged_and_leaves_the_weights_unchanged(tmp_path):
    """--eval-samples N with run.knn_every: a k-NN of the encoder every that many steps, in the log and in
    TensorBoard; measuring forks the random streams, so the weights equal those of an unmeasured run bit for bit."""
    pretrain(tmp_path / "plain")
    measured = pretrain(tmp_path / "knn", ["--eval-samples", "64", "run.knn_every=1"])
    lines = [line for line in measured.stderr.splitlines() if "k-NN {" in line]
    steps = len(losses(tmp_path / "knn"))
    assert len(lines) == steps and "(64 train / 64 test images)" in lines[0], measured.stderr[-2000:]
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "knn")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next((tmp_path / "knn" / "tensorboard").iterdir()).parent))
    events.Reload()
    assert "mae/knn_top1_k20" in events.Tags()["scalars"]


def test_keys_added_later_leave_a_recipe_unchanged_at_their_old_behaviour():
    """A weights file recorded before a key existed keeps matching while the key holds the value that does what
    runs did then; another value is another recipe."""
    from scale_refiner.cli.pretrain_mae import RECIPE_KEYS_ADDED, recipe_of
    from scale_refiner.config import PretrainConfig, load_config
    cfg = load_config(ROOT / "configs/demo_mae.yaml", [], schema_class=PretrainConfig)
    recipe = recipe_of(cfg)
    for (group, key), _ in RECIPE_KEYS_ADDED.items():
        assert key not in recipe[group]
    other = load_config(ROOT / "configs/demo_mae.yaml", ["engine.optimizer_impl=fused"], schema_class=PretrainConfig)
    assert recipe_of(other)["engine"]["optimizer_impl"] == "fused" and recipe_of(other) != recipe


@pytest.mark.parametrize("residual", ["compute", "fp32"])
def test_mae_encoder_carries_the_configured_residual_stream_under_bf16(residual):
    """MAE's visible-patch encoding follows model.residual_dtype as the refiner's embed does: bf16 between blocks
    under bf16 autocast with fp32 weights (the single engine), fp32 when asked."""
    from scale_refiner.mae import build_mae
    cfg = load_config(ROOT / "configs/demo_mae.yaml", TINY + [f"model.residual_dtype={residual}"],
                      schema_class=PretrainConfig)
    model = build_mae(cfg)
    seen = set()
    hooks = [b.register_forward_hook(lambda m, args, out: seen.update({str(args[0].dtype), str(out.dtype)}))
             for b in model.encoder.blocks]
    images = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode_visible(images, torch.rand(2, 16))
    for hook in hooks:
        hook.remove()
    assert seen == {"torch.bfloat16" if residual == "compute" else "torch.float32"}
