"""Linear probe on frozen features, every sweep point trained at once.

The feature sets of the sweep (e.g. last-block CLS, CLS of the last 4 blocks, each with or without the mean
patch token) are column subsets of one concatenation of named *parts*. One ``BatchNorm1d(affine=False)``
normalises the concatenation (BN is per column, so this is BN of every subset), and one weight tensor
``W`` (G, C, D_total) holds a linear classifier per (feature set, learning rate) group; a fixed 0/1 column mask
per group zeroes the columns outside its set, so group g sees exactly its feature set. The logits of all
groups come from one matmul; the loss is the sum over groups of each group's mean cross-entropy, so each group
gets exactly its own gradient. SGD with momentum (torch's rule: buf = m * buf + grad; w -= lr * buf) with a
per-group learning rate and a per-step cosine schedule.

Selection: ``val_fraction`` of the train split (a seeded random subset) is held out; every group is trained on
the rest, and the best learning rate (per feature set, and overall) is chosen on the held-out accuracy; the
test accuracy of the chosen point is the reported number. Test accuracies of every point are reported too
(for the curve, not for selection). ``val_fraction=0`` selects on test and says so (``selected_on``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from scale_refiner.eval.knn import check_classes, check_split

# 13 learning rates, log-spaced from 1e-4 to 0.5 (the sweep range of DINOv2's linear evaluation).
DEFAULT_LRS = tuple(float(x) for x in np.geomspace(1e-4, 0.5, 13))


@dataclass
class LinearProbeConfig:
    lrs: Sequence[float] = DEFAULT_LRS
    epochs: int = 10
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    seed: int = 0
    # 0: zero init (the problem is convex), which makes every group's result independent of the others'
    # (a test checks a sweep point equals the same point trained alone); > 0: normal(0, init_std) as DINOv2.
    init_std: float = 0.0


def _split_val(n: int, fraction: float, seed: int):
    if fraction <= 0:
        return torch.arange(n), None
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, int(round(n * fraction)))
    if n - n_val < 2:
        raise ValueError(f"linear probe: {n} train samples cannot be split into train and a {fraction:.0%} "
                         f"held-out part")
    return perm[n_val:].sort().values, perm[:n_val].sort().values


@torch.no_grad()
def _accuracy(x, y, bn, W, b, masks, chunk=4096):
    G, C, _ = W.shape
    weight = (W * masks[:, None, :]).reshape(G * C, -1)
    correct = torch.zeros(G, dtype=torch.long)
    for s in range(0, len(x), chunk):
        logits = (bn(x[s:s + chunk]) @ weight.T).view(-1, G, C) + b
        correct += (logits.argmax(-1) == y[s:s + chunk, None]).sum(0).cpu()
    return (correct.double() / len(x)).tolist()


def linear_probe(train_parts: Dict[str, torch.Tensor], train_labels: torch.Tensor,
                 test_parts: Dict[str, torch.Tensor], test_labels: torch.Tensor,
                 sets: Dict[str, Sequence[str]], cfg: LinearProbeConfig = LinearProbeConfig(),
                 device=None) -> dict:
    """``*_parts``: {part name: (N, D_part)}; ``sets``: {feature-set name: [part names]}.

    Returns ``{"best": {set, lr, val, test}, "per_set": {set: {lr, val, test}}, "sweep": [{set, lr, val, test}],
    "selected_on": "val"|"test", "epochs", "n_train", "n_val"}`` (accuracies in [0, 1]).
    """
    if not sets:
        raise ValueError("linear probe: no feature sets given")
    names = list(train_parts)
    for set_name, parts in sets.items():
        unknown = [p for p in parts if p not in train_parts or p not in test_parts]
        if not parts or unknown:
            raise ValueError(f"linear probe: feature set {set_name!r} names unknown parts {unknown or parts}; "
                             f"known: {names}")
    x_all = torch.cat([train_parts[p].float() for p in names], 1)
    x_test = torch.cat([test_parts[p].float() for p in names], 1)
    check_split(x_all, train_labels, "train", min_samples=2)
    check_split(x_test, test_labels, "test")
    check_classes(train_labels, test_labels)
    if not cfg.lrs or min(cfg.lrs) <= 0:
        raise ValueError(f"linear probe learning rates must be > 0, got {list(cfg.lrs)}")
    device = torch.device(device or "cpu")
    y_all = train_labels.long()
    num_classes = int(max(y_all.max(), test_labels.max())) + 1
    train_idx, val_idx = _split_val(len(x_all), cfg.val_fraction, cfg.seed)
    x_tr, y_tr = x_all[train_idx].to(device), y_all[train_idx].to(device)

    # Columns of every part in the concatenation -> one 0/1 mask per feature set.
    offsets, start = {}, 0
    for p in names:
        offsets[p] = (start, start + train_parts[p].shape[1])
        start += train_parts[p].shape[1]
    dim = start
    set_names = list(sets)
    set_masks = torch.zeros(len(set_names), dim)
    for i, s in enumerate(set_names):
        for p in sets[s]:
            set_masks[i, offsets[p][0]:offsets[p][1]] = 1
    lrs = [float(v) for v in cfg.lrs]
    groups = [(s, lr) for s in set_names for lr in lrs]  # group g = set g // L, lr g % L
    G, C = len(groups), num_classes
    masks = set_masks.repeat_interleave(len(lrs), 0).to(device)
    group_lr = torch.tensor([lr for _, lr in groups], device=device)

    gen = torch.Generator().manual_seed(cfg.seed)
    W = torch.zeros(G, C, dim)
    if cfg.init_std > 0:
        W = torch.randn(G, C, dim, generator=gen) * cfg.init_std
    W = W.to(device) * masks[:, None, :]
    b = torch.zeros(G, C, device=device)
    W.requires_grad_(True)
    b.requires_grad_(True)
    buf_W, buf_b = torch.zeros_like(W), torch.zeros_like(b)
    bn = torch.nn.BatchNorm1d(dim, affine=False).to(device)

    n = len(x_tr)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch  # drop the last partial batch: BN needs > 1 sample, and steps stay equal
    total = max(1, cfg.epochs * steps_per_epoch)
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        bn.train()
        for s in range(steps_per_epoch):
            idx = order[s * batch:(s + 1) * batch]
            xb, yb = bn(x_tr[idx]), y_tr[idx]
            logits = (xb @ (W * masks[:, None, :]).reshape(G * C, dim).T).view(-1, G, C) + b
            # (B, C, G) vs (B, G): per-group mean over the batch, summed over groups.
            loss = F.cross_entropy(logits.permute(0, 2, 1), yb[:, None].expand(-1, G), reduction="none").mean(0).sum()
            gW, gb = torch.autograd.grad(loss, (W, b))
            scale = 0.5 * (1 + math.cos(math.pi * step / total))
            with torch.no_grad():
                if cfg.weight_decay:
                    gW = gW + cfg.weight_decay * W
                buf_W.mul_(cfg.momentum).add_(gW)
                buf_b.mul_(cfg.momentum).add_(gb)
                lr = (group_lr * scale)
                W.sub_(lr[:, None, None] * buf_W)
                b.sub_(lr[:, None] * buf_b)
            step += 1
    bn.eval()
    W = W.detach()
    b = b.detach()
    test_acc = _accuracy(x_test.to(device), test_labels.long().to(device), bn, W, b, masks)
    if val_idx is not None:
        val_acc = _accuracy(x_all[val_idx].to(device), y_all[val_idx].to(device), bn, W, b, masks)
        key, selected_on = val_acc, "val"
    else:
        val_acc, key, selected_on = [None] * G, test_acc, "test"
    sweep = [{"set": s, "lr": lr, "val": val_acc[g], "test": test_acc[g]} for g, (s, lr) in enumerate(groups)]
    per_set = {}
    for s in set_names:
        gs = [g for g in range(G) if groups[g][0] == s]
        best = max(gs, key=lambda g: (key[g], -g))  # ties: the smaller learning rate
        per_set[s] = {"lr": groups[best][1], "val": val_acc[best], "test": test_acc[best]}
    best = max(range(G), key=lambda g: (key[g], -g))
    return {"best": {"set": groups[best][0], "lr": groups[best][1], "val": val_acc[best], "test": test_acc[best]},
            "per_set": per_set, "sweep": sweep, "selected_on": selected_on, "epochs": cfg.epochs,
            "n_train": n, "n_val": 0 if val_idx is None else len(val_idx), "lrs": lrs}


def standard_sets(depth_available: int) -> Dict[str, List[str]]:
    """The four feature sets of DINOv2's linear probe over the parts that ``probe_parts`` names: last block vs the last
    n (<= 4) blocks' CLS, each with or without the mean patch token of the last block."""
    n = min(4, depth_available)
    last = [f"cls{n - 1}"]
    lastn = [f"cls{i}" for i in range(n)]
    return {"last_cls": last, "last_cls+mean": last + ["mean_patch"],
            f"last{n}_cls": lastn, f"last{n}_cls+mean": lastn + ["mean_patch"]}


def probe_parts(features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Parts from ``extract_block_features`` output: ``cls0..cls{n-1}`` (final-norm CLS of the last n
    blocks, oldest first) and ``mean_patch``."""
    last = features["last_cls"]
    parts = {f"cls{i}": last[:, i] for i in range(last.shape[1])}
    parts["mean_patch"] = features["mean_patch"]
    return parts
