"""Activation checkpointing modes (model.checkpointing = false | true | N | selective): the same loss and gradients
as no checkpointing, the policy recomputes what it says, memory ordered as the modes promise and as the planner
predicts, bad values refused, and a 2-rank run through the launcher unchanged by checkpointing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scale_refiner.config import ConfigError, load_config
from scale_refiner.engine.distributed import free_port
from scale_refiner.models.vit import VisionTransformer, checkpointing_plan

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten
MODES = [True, 2, "selective"]


def tiny(arch="prenorm", depth=6, frozen=2, checkpointing=False):
    torch.manual_seed(0)
    model = VisionTransformer(patch_size=4, embed_dim=32, depth=depth, num_heads=2, img_size=32, arch=arch)
    model.freeze(frozen)
    model.set_grad_checkpointing(checkpointing)
    return model


def loss_and_grads(model):
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 3, 16, 16, generator=g)]
    out = model(crops, tap_blocks=[1, 3])  # one tap on a frozen block, one on a trained one
    loss = sum(o["final"].pow(2).sum() + o["taps"].tanh().sum() for o in out)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["prenorm", "postnorm"])
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_loss_and_every_gradient_bit_identical_to_no_checkpointing(arch, mode):
    """Bit-identical, not merely close: a recomputation runs the same CPU kernels on the same inputs with the same
    shapes, so it reproduces every value exactly, and the backward then runs the same ops on the same values
    (selective checkpointing hands back the very matmul outputs of the forward)."""
    loss0, grads0 = loss_and_grads(tiny(arch))
    loss1, grads1 = loss_and_grads(tiny(arch, checkpointing=mode))
    assert torch.equal(loss0, loss1)
    # trained blocks 2..5, the final norm (prenorm); nothing of the frozen prefix
    assert grads0.keys() == grads1.keys() and any(n.startswith("blocks.2.") for n in grads0)
    assert not any(n.startswith(("blocks.0.", "blocks.1.", "patch_embed", "cls_token", "pos_embed")) for n in grads0)
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode, recomputed_blocks, recomputed_matmuls", [
    (False, 0, False), (True, 4, True), (2, 2, True), ("selective", 4, False)], ids=str)
def test_backward_recomputes_what_the_mode_says(mode, recomputed_blocks, recomputed_matmuls):
    """Counted in the backward, per crop resolution: a recomputed block runs its two LayerNorms again; a fully
    recomputed one also its Linears (addmm: the backward of a Linear itself uses mm only) -- three or four of
    them: the recomputation stops as soon as the last tensor the backward needs is back, so the last crop's fc2
    is not rerun; selective checkpointing reruns the LayerNorms but never a matmul or the attention."""
    model = tiny(checkpointing=mode)
    crops = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16)]
    out = model(crops)
    loss = sum(o["final"].pow(2).sum() for o in out)
    with OpCounter() as ops:
        loss.backward()
    layer_norms = ops.counts.get(aten.native_layer_norm.default, 0)
    assert layer_norms == 2 * recomputed_blocks * len(crops)
    linears = ops.counts.get(aten.addmm.default, 0)
    if recomputed_matmuls:
        assert 3 * recomputed_blocks * len(crops) <= linears <= 4 * recomputed_blocks * len(crops)
    else:
        assert linears == 0
    attention = [op for op in ops.counts if "scaled_dot_product" in str(op) and "backward" not in str(op)]
    assert bool(attention) == recomputed_matmuls


def test_the_first_n_trained_blocks_are_checkpointed_and_follow_the_frozen_prefix():
    model = tiny(depth=6, frozen=2, checkpointing=2)
    assert [b.checkpoint_policy for b in model.blocks] == ["none", "none", "full", "full", "none", "none"]
    model.freeze(3)
    assert [b.checkpoint_policy for b in model.blocks] == ["none"] * 3 + ["full", "full", "none"]
    model.set_grad_checkpointing("selective")
    assert [b.checkpoint_policy for b in model.blocks] == ["none"] * 3 + ["selective"] * 3
    model.freeze(0, whole=True)  # the heads stage: nothing trained, nothing checkpointed
    assert {b.checkpoint_policy for b in model.blocks} == {"none"}
    assert checkpointing_plan(9, 4) == ("full", 4) and checkpointing_plan(0, 4) == ("none", 0)
    with pytest.raises(ValueError, match="checkpointing must be"):
        model.set_grad_checkpointing("full")


@pytest.mark.parametrize("value, message", [
    ("7", "7 is outside 0..6"), ("-1", "-1 is outside 0..6"), ("full", "'full' is not one of"),
    ("1.5", "1.5 is not one of"), ("[1]", "is not one of")])
def test_bad_values_are_refused_naming_the_key(value, message):
    with pytest.raises(ConfigError, match="model.checkpointing") as err:
        load_config(ROOT / "configs/demo.yaml", [f"model.checkpointing={value}"])
    assert message in str(err.value)
    # N counts trained blocks: with 2 frozen, 5 of the demo's 6 blocks is too many
    with pytest.raises(ConfigError, match=r"model.checkpointing': 5 is outside 0..4"):
        load_config(ROOT / "configs/demo.yaml", ["model.freeze_blocks=2", "model.checkpointing=5"])


def test_good_values_are_kept_as_given():
    for value, parsed in (("true", True), ("false", False), ("3", 3), ("selective", "selective")):
        assert load_config(ROOT / "configs/demo.yaml", [f"model.checkpointing={value}"]).model.checkpointing == parsed


def test_measured_memory_is_ordered_by_mode_and_the_planner_predicts_each_within_15_percent(tmp_path):
    """Real refine-stage steps of the demo's model (single process, fp32) under the storage tracker, one per mode;
    both the peak and the activations (the peak less what stays alive between steps) within 15 % of the
    prediction."""
    from scale_refiner.plan.validate import (CASES, ZERO3_CPU, measure_case_detail, predict_case,
                                             predicted_activations)
    zero_json = tmp_path / "zero3_cpu.json"
    zero_json.write_text(json.dumps(ZERO3_CPU))
    names = ["mini b32", "mini b32 selective", "mini b32 ckpt 3 blocks", "mini b32 ckpt"]  # off > sel > N > on
    peaks = []
    for name in names:
        case = next(c for c in CASES if c.name == name)
        predicted = predict_case(case, str(zero_json))
        peak, resting = measure_case_detail(case, str(zero_json))
        assert abs(predicted.peak_allocated / peak - 1) <= 0.15, (name, predicted.peak_allocated, peak)
        assert abs(predicted_activations(predicted) / (peak - resting) - 1) <= 0.15, \
            (name, predicted_activations(predicted), peak - resting)
        peaks.append(peak)
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 4, dict(zip(names, peaks))


# ------------------------------------------------------------------------------- 2 ranks, through the launcher
TINY = ["model.name=vit_test_patch4", "heads.blocks=[1,2]", "heads.proj_hidden_dim=64", "heads.proj_out_dim=16",
        "heads.pred_hidden_dim=64", "queue.size=256", "augment.num_local=2", "data.batch_size=16",
        "data.num_workers=0", "run.log_every=1", "heads.norm=syncbn", "model.freeze_blocks=1",
        "data.pipeline=memory", "stages.run=[refine]", "data.samples_per_epoch=48", "stages.refine.epochs=1",
        "stages.refine.warmup_epochs=0.5", "stages.refine.ema=0.9", "engine.kind=fsdp2"]


def torchrun_losses(out, checkpointing):
    cmd = [sys.executable, str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(ROOT / "launch/refine.py"), "--config", "configs/demo.yaml", "--eval-samples", "0",
           f"run.out_dir={out}", f"model.checkpointing={checkpointing}"] + TINY
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_fsdp2_checkpointing_two_blocks_gives_the_losses_of_none(tmp_path):
    """torchrun, 2 CPU ranks, FSDP2, the refine stage of a 4-block ViT with 1 frozen block: checkpointing the first
    2 of the 3 trained blocks changes no loss of the 3 steps."""
    plain = torchrun_losses(tmp_path / "off", "false")
    checkpointed = torchrun_losses(tmp_path / "two", "2")
    assert len(plain) == 3
    assert checkpointed == pytest.approx(plain, rel=1e-5)
