"""Weighted k-NN classification (DINO protocol): features standardised with the train set's mean and std,
L2-normalised, cosine similarity, top-k neighbours voting with weight exp(sim / T).

Also: input checks shared by every protocol (``check_split``, ``check_classes``), the per-block k-NN of the
paper's Fig. 3b (``per_block_knn``), ``quick_knn``, the k-NN a training loop can call periodically, and
``knn_of_state``, the refine job's measurement of a full encoder state on every rank.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def check_split(feats: torch.Tensor, labels, name: str, min_samples: int = 1) -> None:
    """Clear errors for empty, label-less or malformed evaluation data."""
    if labels is None:
        raise ValueError(f"{name} split has no labels: every evaluation protocol needs class labels")
    if feats is None or len(feats) == 0:
        raise ValueError(f"{name} split is empty")
    if len(feats) < min_samples:
        raise ValueError(f"{name} split has {len(feats)} samples, at least {min_samples} needed")
    if not torch.is_tensor(labels) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name} labels must be an integer tensor, got "
                         f"{labels.dtype if torch.is_tensor(labels) else type(labels).__name__}")
    if labels.ndim != 1 or len(labels) != len(feats):
        raise ValueError(f"{name} split: {len(feats)} samples but labels of shape {tuple(labels.shape)}")
    if int(labels.min()) < 0:
        raise ValueError(f"{name} labels must be >= 0 (class indices); found {int(labels.min())}")
    if feats.is_floating_point() and not torch.isfinite(feats).all():
        raise ValueError(f"{name} features contain NaN or inf")


def check_classes(train_labels: torch.Tensor, test_labels: torch.Tensor) -> None:
    """Every test class must occur in the train split (otherwise no classifier can predict it)."""
    unseen = sorted(set(test_labels.unique().tolist()) - set(train_labels.unique().tolist()))
    if unseen:
        raise ValueError(f"test classes {unseen} do not occur in the train split "
                         f"(train classes: {sorted(train_labels.unique().tolist())})")


def prepare(train: torch.Tensor, test: torch.Tensor):
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp(min=1e-6)
    return F.normalize((train - mean) / std, dim=1), F.normalize((test - mean) / std, dim=1)


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = (10, 20), temperature: float = 0.07,
                 chunk: int = 1024) -> Dict[int, float]:
    """Top-1 accuracy (in [0, 1]) for each k, computed in test chunks to bound memory.

    Ties in the vote go to the lowest class index (``argmax``)."""
    check_split(train_feats, train_labels, "train", min_samples=2)
    check_split(test_feats, test_labels, "test")
    check_classes(train_labels, test_labels)
    if not ks or min(ks) < 1:
        raise ValueError(f"k-NN needs k >= 1, got {list(ks)}")
    if max(ks) > len(train_feats):
        raise ValueError(f"k = {max(ks)} exceeds the {len(train_feats)} train samples")
    train, test = prepare(train_feats.float(), test_feats.float())
    train_labels, test_labels = train_labels.long(), test_labels.long()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    max_k = max(ks)
    correct = {k: 0 for k in ks}
    for start in range(0, test.shape[0], chunk):
        sims, idx = (test[start:start + chunk] @ train.T).topk(max_k, dim=1)
        weights = (sims / temperature).exp()
        votes_labels = train_labels[idx]
        truth = test_labels[start:start + chunk]
        for k in ks:
            votes = torch.zeros(idx.shape[0], num_classes, dtype=weights.dtype)
            votes.scatter_add_(1, votes_labels[:, :k], weights[:, :k])
            correct[k] += int((votes.argmax(1) == truth).sum())
    return {k: correct[k] / test.shape[0] for k in ks}


def per_block_knn(train_blocks: torch.Tensor, train_labels: torch.Tensor, test_blocks: torch.Tensor,
                  test_labels: torch.Tensor, ks: Sequence[int] = (10, 20),
                  temperature: float = 0.07) -> Dict[int, list]:
    """k-NN accuracy of each block's features: ``*_blocks`` are (N, B, D) (e.g. the raw CLS taps with the
    final-norm CLS appended as a last entry); returns ``{k: [acc of entry 0, ..., entry B-1]}``."""
    if train_blocks.ndim != 3 or test_blocks.ndim != 3 or train_blocks.shape[1] != test_blocks.shape[1]:
        raise ValueError(f"per-block features must be (N, blocks, D) for both splits, got "
                         f"{tuple(train_blocks.shape)} and {tuple(test_blocks.shape)}")
    out = {k: [] for k in ks}
    for b in range(train_blocks.shape[1]):
        acc = knn_accuracy(train_blocks[:, b], train_labels, test_blocks[:, b], test_labels, ks, temperature)
        for k in ks:
            out[k].append(acc[k])
    return out


def quick_knn(encoder, train: Tuple[torch.Tensor, torch.Tensor], test: Tuple[torch.Tensor, torch.Tensor],
              ks: Sequence[int] = (10, 20), temperature: float = 0.07, batch_size: int = 256,
              prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
              autocast_dtype: Optional[torch.dtype] = None) -> Dict[int, float]:
    """k-NN accuracy of ``encoder``'s final-norm CLS, for periodic use during training.

    ``train`` / ``test`` are ``(images, labels)`` (e.g. from ``data.loaders.eval_arrays`` with a limit). The
    encoder is put in eval mode and restored. Inside an initialised process group with more than one rank it is
    collective: every rank passes the same images, extracts a contiguous part, and every rank gets the same
    result (equal to a one-process run's). ``prepare`` maps each batch once it is on the encoder's device (e.g.
    ``normalize_batch`` for uint8 images); ``autocast_dtype`` runs the forward under autocast (bf16 on a GPU)."""
    from scale_refiner.eval.features import extract_distributed

    import torch.distributed as dist
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    try:
        def fn(x):
            x = prepare(x) if prepare is not None else x
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                                 enabled=autocast_dtype is not None):
                return {"final": encoder([x])[0]["final"].float()}
        train_f = extract_distributed(fn, train[0], batch_size, rank, world, device)["final"]
        test_f = extract_distributed(fn, test[0], batch_size, rank, world, device)["final"]
    finally:
        encoder.train(was_training)
    return knn_accuracy(train_f, train[1], test_f, test[1], ks, temperature)


def knn_of_state(encoder_state: Dict[str, torch.Tensor], cfg, device: torch.device,
                 eval_data: Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
                 ks: Sequence[int] = (10, 20)) -> Dict[str, float]:
    """The refine job's k-NN of an encoder given as a full state dict (on every rank); ``eval_data`` is
    ``(train, test)`` of uint8 ``(images, labels)`` (``eval_arrays(..., uint8=True)``), keys of the result are
    ``str(k)``.

    Collective, like :func:`quick_knn`: each rank puts the encoder on its own ``device`` and extracts the
    features of a share of the images, under bf16 autocast where ``cfg.engine.precision`` resolves to bf16;
    one rank alone would leave the others waiting in a collective (for ViT-2B, hours on a CPU). The encoder
    holds no gradients (autocast would otherwise keep a bf16 copy of every weight for the whole pass), and
    the global random stream is left as it was, so measuring does not change training."""
    from scale_refiner.data.augment import normalize_batch
    from scale_refiner.engine.distributed import resolve_precision
    from scale_refiner.models.vit import vit_from_state
    encoder = vit_from_state(cfg.model, encoder_state).requires_grad_(False).to(device)
    dtype = resolve_precision(cfg.engine.precision, device)
    with torch.random.fork_rng(devices=[]):
        accuracy = quick_knn(encoder, *eval_data, ks=ks, prepare=normalize_batch,
                             autocast_dtype=dtype if dtype != torch.float32 else None)
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the measuring's blocks back before training resumes
    return {str(k): v for k, v in accuracy.items()}
