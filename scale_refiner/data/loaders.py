"""Loaders over the embedded Fashion-MNIST (the reference torch pipeline: in-memory arrays, torchvision
augmentation, a DataLoader). Webdataset shards and DALI replace this path in the data issue."""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

import torch
from torch.utils.data import DataLoader, RandomSampler

from scale_refiner.config import RefineConfig
from scale_refiner.data.augment import ArrayDataset, EvalTransform, MultiCropAugment
from scale_refiner.data.fashion_mnist import load_fashion_mnist


def _arrays(cfg: RefineConfig, split: str):
    if cfg.data.dataset != "fashion-mnist":
        raise ValueError(f"data.dataset={cfg.data.dataset!r}: only the embedded 'fashion-mnist' has a loader "
                         f"so far (webdataset shards arrive with the data pipeline)")
    return load_fashion_mnist(split)


def train_batches(cfg: RefineConfig, rank: int = 0, world: int = 1):
    """Returns (batches(epoch) -> iterator of collated multi-crop batches, samples per epoch)."""
    images, labels = _arrays(cfg, "train")
    aug = cfg.augment
    transform = MultiCropAugment(aug.global_size, aug.global_scale, aug.local_size, aug.local_scale,
                                 aug.num_local, color=aug.color)
    dataset = ArrayDataset(images, labels, transform)
    samples = cfg.data.samples_per_epoch or len(dataset)
    samples = min(samples, len(dataset))
    per_rank_batch = cfg.data.batch_size // world

    def batches(epoch: int) -> Iterator[Dict[str, torch.Tensor]]:
        # Same permutation on every rank (seeded by epoch), each rank takes its slice: every sample once.
        generator = torch.Generator().manual_seed(cfg.run.seed * 100_003 + epoch)
        order = torch.randperm(len(dataset), generator=generator)[:samples]
        mine = order[rank::world].tolist()
        loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=mine, drop_last=True,
                            num_workers=cfg.data.num_workers, collate_fn=transform.collate,
                            persistent_workers=False, generator=generator)
        return iter(loader)

    return batches, samples


def eval_arrays(cfg: RefineConfig, split: str, limit: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whole ``split`` as evaluation tensors (resize to global size, centre crop), (N, 3, S, S) and (N,)."""
    images, labels = _arrays(cfg, split)
    if limit:
        images, labels = images[:limit], labels[:limit]
    size = cfg.augment.global_size
    transform = EvalTransform(size, size)
    dataset = ArrayDataset(images, labels, transform)
    loader = DataLoader(dataset, batch_size=512, num_workers=cfg.data.num_workers)
    xs, ys = zip(*[(x, y) for x, y, _ in loader])
    return torch.cat(xs), torch.cat(ys)
