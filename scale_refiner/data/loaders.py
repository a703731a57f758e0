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


class SeededViews(torch.utils.data.Dataset):
    """Draws each sample's views from a seed of (run seed, epoch, dataset index), whatever process or worker
    draws them: the views of a sample do not depend on the number of workers, the rank layout or a resume
    in the middle of an epoch, which is what makes a resumed run bit-identical to an uninterrupted one."""

    def __init__(self, base: ArrayDataset, seed: int):
        self.base, self.seed, self.epoch = base, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index))
            return self.base[index]


def train_batches(cfg: RefineConfig, rank: int = 0, world: int = 1):
    """Returns (batches(epoch, start_batch) -> iterator of collated multi-crop batches, samples per epoch).

    Every rank computes the same permutation of the epoch (seeded by run seed and epoch) and takes its part of
    each global batch, so each sample is seen once per epoch across ranks; ``start_batch`` skips batches
    already trained on (resume).
    """
    images, labels = _arrays(cfg, "train")
    aug = cfg.augment
    transform = MultiCropAugment(aug.global_size, aug.global_scale, aug.local_size, aug.local_scale,
                                 aug.num_local, color=aug.color)
    dataset = SeededViews(ArrayDataset(images, labels, transform), cfg.run.seed)
    samples = cfg.data.samples_per_epoch or len(dataset)
    samples = min(samples, len(dataset))
    per_rank_batch = cfg.data.batch_size // world

    def batches(epoch: int, start_batch: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(cfg.run.seed * 100_003 + epoch)
        steps = samples // cfg.data.batch_size
        order = torch.randperm(len(dataset), generator=generator)[:steps * cfg.data.batch_size]
        # Global batch s is order[s*G:(s+1)*G]; rank r takes its r-th contiguous part, so the gathered batch
        # is in the same order as a 1-process batch (NN picks are drawn by global position).
        mine = order.view(steps, world, per_rank_batch)[:, rank].reshape(-1)[start_batch * per_rank_batch:].tolist()
        dataset.epoch = epoch
        loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=mine, drop_last=True,
                            num_workers=cfg.data.num_workers, collate_fn=transform.collate,
                            persistent_workers=False)
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
