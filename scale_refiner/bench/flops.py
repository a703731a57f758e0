"""Analytic FLOPs of a MIM-Refiner step (matmuls only; one multiply-add = 2 FLOPs).

Per image of N tokens (patches + CLS), width d, MLP hidden m = r.d, one block's forward is

    qkv 6.N.d^2 + attention scores and weighted sum 4.N^2.d + projection 2.N.d^2 + MLP 4.N.d.m
    = 24.N.d^2 + 4.N^2.d  for r = 4

plus the patch embedding 2.(N-1).(C.p^2).d. The ID heads run on the CLS token of every crop:
projector 2.(D.H + H.H + H.o), predictor 2.(o.H' + H'.o) per crop and head.

Model FLOPs of a training step: 3x forward (forward + backward) for what is trained, 1x for what is frozen
(the frozen prefix: patch embedding, cls / pos and the first ``model.freeze_blocks`` blocks; in the heads stage
the whole encoder), 3x for the heads. Recomputation from activation checkpointing is *not* model FLOPs
(it is reported separately as ``recompute``, so hardware FLOPs = model + recompute): one forward of each
checkpointed block (``model.checkpointing`` true: every trained block; N: N of them); selective checkpointing
recomputes no matmul, so nothing here (its pointwise recomputation is time, not FLOPs: plan/timing.py).
Norms, softmax, GELU, the loss and the queue lookup (no gradient, reported as ``lookup``) are left out: under
2 % for the paper's models.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List


def tokens(size: int, patch: int) -> int:
    """Tokens of a square crop: patches plus the CLS token."""
    return (size // patch) ** 2 + 1


def block_forward_flops(n_tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """One transformer block's forward on one image of ``n_tokens`` tokens (matmuls only)."""
    hidden = int(dim * mlp_ratio)
    return (2 * n_tokens * dim * 3 * dim          # qkv
            + 4 * n_tokens * n_tokens * dim        # q.k^T and attn.v
            + 2 * n_tokens * dim * dim             # output projection
            + 4 * n_tokens * dim * hidden)         # fc1 + fc2


def patch_embed_flops(size: int, patch: int, dim: int, in_chans: int = 3) -> int:
    return 2 * (size // patch) ** 2 * in_chans * patch * patch * dim


def vit_forward_flops(size: int, dims: Dict, in_chans: int = 3) -> Dict[str, int]:
    """Forward FLOPs of one crop of ``size`` px: ``embed``, ``block`` (one block), ``blocks`` (all), ``total``."""
    n = tokens(size, dims["patch_size"])
    block = block_forward_flops(n, dims["embed_dim"], dims.get("mlp_ratio", 4.0))
    embed = patch_embed_flops(size, dims["patch_size"], dims["embed_dim"], in_chans)
    return {"tokens": n, "embed": embed, "block": block, "blocks": block * dims["depth"],
            "total": embed + block * dims["depth"]}


def head_forward_flops(in_dim: int, proj_hidden: int = 2048, proj_out: int = 256, pred_hidden: int = 4096) -> int:
    """One ID head's forward on one CLS token: projector + predictor matmuls (linears have no bias)."""
    return 2 * (in_dim * proj_hidden + proj_hidden * proj_hidden + proj_hidden * proj_out
                + proj_out * pred_hidden + pred_hidden * proj_out)


@dataclass
class StepFlops:
    """FLOPs per *sample* (all its crops) of one training step, plus per-crop forward figures."""
    stage: str
    crops: List[Dict] = field(default_factory=list)  # size, count, tokens, forward (encoder only, one crop)
    encoder_forward: int = 0   # all crops of one sample, forward
    heads_forward: int = 0     # all heads, all crops of one sample, forward
    model: int = 0             # training model FLOPs per sample (3x trained, 1x frozen, heads 3x)
    recompute: int = 0         # extra forward of checkpointed blocks (not model FLOPs)
    lookup: int = 0            # queue similarity matmuls (no gradient; not in ``model``)
    tokens: int = 0            # encoder tokens per sample (all crops)
    crops_per_sample: int = 0

    @property
    def hardware(self) -> int:
        return self.model + self.recompute

    def as_dict(self) -> Dict:
        return dict(asdict(self), hardware=self.hardware)


def step_flops(cfg, stage: str = "refine") -> StepFlops:
    """Per-sample FLOPs of a step of ``stage`` (``heads`` or ``refine``) for a ``RefineConfig``."""
    from scale_refiner.models.vit import checkpointing_plan, resolve_model_dims
    dims = resolve_model_dims(cfg.model)
    depth = dims["depth"]
    frozen_all = stage == "heads"
    frozen = depth if frozen_all else cfg.model.freeze_blocks
    policy, checkpointed = checkpointing_plan(cfg.model.checkpointing, depth - frozen)
    recomputed = checkpointed if policy == "full" else 0
    crop_specs = [(cfg.augment.global_size, 2)] + ([(cfg.augment.local_size, cfg.augment.num_local)]
                                                  if cfg.augment.num_local else [])
    out = StepFlops(stage=stage)
    n_heads = len(cfg.heads.blocks) + 1
    head = head_forward_flops(dims["embed_dim"], cfg.heads.proj_hidden_dim, cfg.heads.proj_out_dim,
                              cfg.heads.pred_hidden_dim)
    for size, count in crop_specs:
        f = vit_forward_flops(size, dims, cfg.model.in_chans)
        out.crops.append(dict(size=size, count=count, tokens=f["tokens"], forward=f["total"]))
        out.encoder_forward += count * f["total"]
        out.tokens += count * f["tokens"]
        out.crops_per_sample += count
        # the patch embedding (and cls / pos) is frozen whenever any prefix is
        embed_mult = 1 if (frozen_all or frozen > 0) else 3
        trained = depth - frozen
        out.model += count * (embed_mult * f["embed"] + frozen * f["block"] + 3 * trained * f["block"])
        out.recompute += count * recomputed * f["block"]
    out.heads_forward = n_heads * out.crops_per_sample * head
    out.model += 3 * out.heads_forward
    # two global views per sample, each looked up against the full queue, per head
    out.lookup = n_heads * 2 * 2 * cfg.queue.size * cfg.heads.proj_out_dim
    return out


def stage_table(cfg) -> Dict[str, Dict]:
    return {stage: step_flops(cfg, stage).as_dict() for stage in ("heads", "refine")}
