"""Parameter groups (layer-wise lr decay, weight-decay rules) and the warm-up + cosine schedule.

Layer-wise decay with L blocks: patch embedding, cls and pos get decay^(L+1), block j gets decay^(L-j),
the final norm and the heads get 1. No weight decay for biases, 1-D parameters (norms) and the cls / pos
tokens (MAE and timm exclude the tokens too). Frozen parameters are left out entirely, so they get no
optimiser state.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

NO_DECAY_NAMES = ("cls_token", "pos_embed")


def encoder_layer_id(name: str, depth: int) -> int:
    """0 for the embedding (patch, cls, pos, pre-norm), j + 1 for block j, depth + 1 for the final norm."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith(("patch_embed", "cls_token", "pos_embed", "norm_pre")):
        return 0
    return depth + 1


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES


def param_groups(encoder: nn.Module, heads: nn.Module, depth: int, weight_decay: float,
                 head_weight_decay: float, layer_decay: float, heads_prefix: str = "heads") -> List[Dict]:
    """Groups with ``lr_scale`` (multiplied into the scheduled lr) and ``weight_decay``, named for logs.

    ``heads`` is everything trained beside the encoder: the ID heads (``heads_prefix="heads"``) or MAE's
    decoder (``"decoder"``). ``param_names`` are relative to the model (``encoder.…``, ``heads.…``), so an
    engine that replaces the parameters (FSDP2's sharding) can rebuild the same groups by name.
    """
    groups: Dict[tuple, Dict] = {}

    def add(group_name, name, param, lr_scale, wd):
        key = (group_name, lr_scale, wd)
        if key not in groups:
            groups[key] = {"name": group_name, "params": [], "param_names": [], "lr_scale": lr_scale,
                           "weight_decay": wd}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)

    for name, param in encoder.named_parameters():
        if not param.requires_grad:
            continue
        layer = encoder_layer_id(name, depth)
        scale = layer_decay ** (depth + 1 - layer)
        decay = "no_decay" if _no_decay(name, param) else "decay"
        add(f"encoder.layer{layer}.{decay}", f"encoder.{name}", param, scale,
            0.0 if decay == "no_decay" else weight_decay)
    for name, param in heads.named_parameters():
        if not param.requires_grad:
            continue
        decay = "no_decay" if _no_decay(name, param) else "decay"
        add(f"{heads_prefix}.{decay}", f"{heads_prefix}.{name}", param, 1.0,
            0.0 if decay == "no_decay" else head_weight_decay)
    return list(groups.values())


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, end_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then cosine to ``end_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return end_lr + 0.5 * (base_lr - end_lr) * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The paper's linear scaling: lr = base_lr * batch / 256."""
    return base_lr * global_batch / 256


def resolve_optimizer_impl(impl: str, on_gpu: bool) -> str:
    """``engine.optimizer_impl`` as it runs: ``auto`` is the fused kernel on a GPU (a few launches per group
    instead of several per tensor: on one H200 the step of a ViT-2B on FSDP2, a foreach AdamW over DTensor shards
    plus a clip pass, took 67 ms) and torch's own choice elsewhere (``default``, the per-tensor loop on the CPU):
    the CPU recipes, their tests and the documented demo figures were measured with it, and the fused CPU kernel,
    while equal within rounding, is not bit-identical to it. The engines and the planner's memory model both
    ask this."""
    if impl == "auto":
        return "fused" if on_gpu else "default"
    return impl


def adamw_kernel(impl: str, device: torch.device) -> Dict[str, bool]:
    """torch.optim.AdamW's kernel switches for ``engine.optimizer_impl``. The fused kernel works on every
    engine's fp32 storage: plain tensors (single), FSDP2's DTensor shards (its sharding rule is the elementwise
    one) and ZeRO's flat fp32 partitions, so DeepSpeed needs no JIT-built FusedAdam of its own."""
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False},
            "default": {}}[resolve_optimizer_impl(impl, device.type == "cuda")]


def adamw(groups: List[Dict], betas, device: torch.device, impl: str = "auto") -> torch.optim.AdamW:
    """AdamW over ``groups`` (lr set per step by the engine's ``set_lr``) with ``engine.optimizer_impl``'s
    kernel; groups carry ``lr_scale``, ``weight_decay`` and names beside their params (kept by torch)."""
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(betas), **adamw_kernel(impl, device))
