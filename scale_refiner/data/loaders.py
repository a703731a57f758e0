"""Training and evaluation data for the main job, behind one small stream interface.

``data.pipeline`` picks the reader:
- ``dali``: webdataset shards decoded by DALI (``mixed`` on a GPU, the CPU backend otherwise);
- ``wds``: webdataset shards through the torchvision augmentation in a DataLoader (the reference, and the
  fallback where DALI is missing);
- ``memory``: the embedded Fashion-MNIST arrays in memory, with per-sample seeded views and each rank taking a
  fixed part of every global batch: the pipeline whose runs do not depend on the rank layout, the number of
  workers or a resume point, which is what the equivalence and bit-identical-resume tests use;
- ``auto``: ``dali`` when DALI imports, else ``wds``.
With ``data.train_shards`` unset and ``data.dataset=fashion-mnist``, the shard pipelines use the embedded
Fashion-MNIST shards, written under ``data.shard_root`` (``shard_writer.shard_root``) on first use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from scale_refiner.config import ConfigError, RefineConfig
from scale_refiner.data.augment import ArrayDataset, EvalTransform, MultiCropAugment, sample_seed
from scale_refiner.data.fashion_mnist import load_fashion_mnist


def resolve_pipeline(cfg: RefineConfig) -> str:
    if cfg.data.pipeline != "auto":
        return cfg.data.pipeline
    try:
        import nvidia.dali  # noqa: F401
        return "dali"
    except ImportError:
        return "wds"


def _arrays(cfg: RefineConfig, split: str):
    if cfg.data.dataset != "fashion-mnist":
        raise ValueError(f"config key 'data.pipeline': the memory pipeline reads only the embedded "
                         f"fashion-mnist, not {cfg.data.dataset!r}; use data.pipeline=dali or wds with shards")
    return load_fashion_mnist(split)


@dataclass
class RunData:
    """What a run trains and evaluates on: the data set's name and its shard sets (train: the training stream and
    the k-NN bank; test: the k-NN queries), or None for both with the embedded Fashion-MNIST, whose arrays the
    evaluation reads (the same images as its shards, in the data set's own order)."""
    dataset: str
    train: Optional[object] = None  # manifest.ShardSet
    test: Optional[object] = None

    def describe(self) -> Dict:
        return {"name": self.dataset,
                "train": str(self.train.root) if self.train is not None else "embedded",
                "test": str(self.test.root) if self.test is not None else "embedded"}


def run_data(cfg: RefineConfig, evaluate: bool = False, train: bool = True) -> RunData:
    """The data a run reads, checked so that its training data, its evaluation data and ``data.dataset`` cannot
    disagree; a ``ConfigError`` names the key to change.

    ``data.test_shards`` unset means the ``data.train_shards`` set (one manifest holds both splits). The manifests'
    data set names (``make_shards --name``) must agree with each other and with ``data.dataset``: a recipe whose
    ``data.dataset`` says one thing while its shards hold another is an error, not silently one or the other.
    ``evaluate``: the test split, which the k-NN evaluation reads, must exist too; ``train``: the run trains, so
    its training split must fill one ``data.batch_size``."""
    from scale_refiner.data.manifest import load_manifest
    from scale_refiner.data.shard_format import ShardError
    from scale_refiner.data.shard_writer import EMBEDDED_DATASET
    d = cfg.data
    if d.train_shards is None:
        if d.test_shards is not None:
            raise ConfigError(f"config key 'data.test_shards' is set ({d.test_shards}) without data.train_shards: "
                              f"the run would train on one data set and be evaluated on another; set "
                              f"data.train_shards (the same directory when its manifest holds both splits)")
        if d.dataset != EMBEDDED_DATASET:
            raise ConfigError(f"config key 'data.train_shards' is not set and data.dataset={d.dataset!r} has no "
                              f"embedded shards: write them with launch/make_shards.py and point "
                              f"data.train_shards at them")
        return RunData(EMBEDDED_DATASET)
    if d.pipeline == "memory":
        raise ConfigError(f"config key 'data.pipeline': memory reads the embedded Fashion-MNIST arrays, not "
                          f"data.train_shards ({d.train_shards}); use data.pipeline=auto, dali or wds")
    sets = {}
    for key, path in (("data.train_shards", d.train_shards), ("data.test_shards", d.test_shards or d.train_shards)):
        try:
            sets[key] = load_manifest(path, verify="none")  # the readers check sizes or hashes (verify_shards)
        except ShardError as err:
            raise ConfigError(f"config key '{key}': {err}") from None
    bank, test = sets["data.train_shards"], sets["data.test_shards"]
    if test.dataset != bank.dataset or test.class_names != bank.class_names:
        raise ConfigError(f"config key 'data.test_shards': {test.root} holds {test.dataset!r} "
                          f"({test.num_classes} classes), but data.train_shards {bank.root} holds {bank.dataset!r} "
                          f"({bank.num_classes} classes): the k-NN bank and its queries must be one data set")
    if d.dataset != bank.dataset:
        raise ConfigError(f"config key 'data.dataset' is {d.dataset!r}, but data.train_shards {bank.root} holds "
                          f"{bank.dataset!r} (its manifest.json): set data.dataset={bank.dataset}, or point "
                          f"data.train_shards at the shards of {d.dataset!r}")
    for split, key, shard_set in (("train", "data.train_shards", bank), ("test", "data.test_shards", test)):
        if split not in shard_set.manifest["splits"] and (split == "train" or evaluate):
            key = key if d.test_shards is not None else "data.train_shards"
            hint = ("; the k-NN evaluation reads it: write the shards again with make_shards --test-fraction F, or "
                    "point data.test_shards at a set that has one" if split == "test" else "")
            raise ConfigError(f"config key '{key}': {shard_set.root} has no {split!r} split (it has "
                              f"{sorted(shard_set.manifest['splits'])}){hint}")
    n_train = int(bank.manifest["splits"]["train"]["num_samples"])
    if train and n_train < d.batch_size:  # drop_last: not one step an epoch
        raise ConfigError(f"config key 'data.batch_size': {d.batch_size} is more than the {n_train} training images "
                          f"of data.train_shards {bank.root}; lower it (at most {n_train})")
    return RunData(bank.dataset, bank, test)


def _shard_split(cfg: RefineConfig, split: str, training: bool):
    from scale_refiner.data.manifest import load_manifest
    from scale_refiner.data.shard_writer import EMBEDDED_DATASET, ensure_fashion_mnist_shards, shard_root
    data = run_data(cfg, evaluate=not training, train=training)
    shard_set = data.train if split == "train" else data.test
    if shard_set is None:
        root = ensure_fashion_mnist_shards(shard_root(cfg.data.shard_root) / EMBEDDED_DATASET)
    else:
        root = shard_set.root
    return load_manifest(root, verify=cfg.data.verify_shards).split(split)


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
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.base[index]


class TrainStream:
    """``batches(epoch, start_batch)`` yields this rank's collated multi-crop batches of one epoch;
    ``samples_per_epoch`` is global; ``state_dict`` / ``load_state_dict`` carry the reader position."""

    samples_per_epoch: int

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass

    @property
    def skipped_samples(self) -> int:
        """Bad samples this rank has dropped so far, this run and the runs it resumes (``data.on_error=skip``)."""
        return 0


class MemoryStream(TrainStream):
    """Every rank computes the same permutation of the epoch (seeded by run seed and epoch) and takes its part
    of each global batch, so each sample is seen once per epoch across ranks and the gathered batch is in the
    same order as a 1-process batch (NN picks are drawn by global position); ``start_batch`` skips batches
    already trained on (resume)."""

    def __init__(self, cfg: RefineConfig, rank: int, world: int):
        images, labels = _arrays(cfg, "train")
        aug = cfg.augment
        self.transform = MultiCropAugment(aug.global_size, aug.global_scale, aug.local_size, aug.local_scale,
                                          aug.num_local, color=aug.color)
        self.dataset = SeededViews(ArrayDataset(images, labels, self.transform), cfg.run.seed)
        self.samples_per_epoch = min(cfg.data.samples_per_epoch or len(self.dataset), len(self.dataset))
        self.cfg, self.rank, self.world = cfg, rank, world

    def batches(self, epoch, start_batch=0):
        global_batch = self.cfg.data.batch_size
        per_rank = global_batch // self.world
        steps = self.samples_per_epoch // global_batch
        generator = torch.Generator().manual_seed(self.cfg.run.seed * 100_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=generator)[:steps * global_batch]
        mine = order.view(steps, self.world, per_rank)[:, self.rank].reshape(-1)[start_batch * per_rank:].tolist()
        self.dataset.epoch = epoch
        loader = DataLoader(self.dataset, batch_size=per_rank, sampler=mine, drop_last=True,
                            num_workers=self.cfg.data.num_workers, collate_fn=self.transform.collate,
                            pin_memory=torch.cuda.is_available())  # the step's copies then need no host wait
        return iter(loader)


class ShardStream(TrainStream):
    """DALI or webdataset shards: each rank reads its own shards; the loader keeps its own epoch and position,
    restored from ``state_dict`` (DALI's reader checkpoint, or epoch + step for webdataset)."""

    def __init__(self, cfg: RefineConfig, rank: int, world: int, kind: str):
        split = _shard_split(cfg, "train", training=True)
        self.cfg, self.rank, self.world, self.kind, self.split = cfg, rank, world, kind, split
        self.loader = self._build(None)
        self.samples_per_epoch = len(self.loader) * cfg.data.batch_size

    def _build(self, state: Optional[Dict]):
        cfg, aug = self.cfg, self.cfg.augment
        per_rank = cfg.data.batch_size // self.world
        cap = cfg.data.samples_per_epoch // cfg.data.batch_size
        common = dict(rank=self.rank, world=self.world, global_size=aug.global_size, global_scale=aug.global_scale,
                      local_size=aug.local_size, local_scale=aug.local_scale, num_local=aug.num_local,
                      color=aug.color, seed=cfg.run.seed, drop_last=True, max_steps_per_epoch=cap)
        if self.kind == "dali":
            from scale_refiner.data.dali_pipeline import DaliMultiCropLoader
            return DaliMultiCropLoader(self.split.tars, self.split.indexes, self.split.num_samples, per_rank,
                                       num_threads=max(1, cfg.data.num_workers), initial_fill=cfg.data.shuffle_buffer,
                                       device=cfg.data.dali_device, state=state, **common)
        from scale_refiner.data.wds_pipeline import WdsMultiCropLoader
        loader = WdsMultiCropLoader(self.split.tars, self.split.counts, per_rank, num_workers=cfg.data.num_workers,
                                    shuffle_buffer=cfg.data.shuffle_buffer, on_error=cfg.data.on_error, **common)
        if state:
            loader.load_state_dict(state)
        return loader

    def batches(self, epoch, start_batch=0):
        # The loader tracks (and after a restore, continues) its own position. A loader left exactly at the end
        # of its epoch (the consumer stopped at the last batch) rolls over on an empty pass: then read again.
        for _ in range(2):
            produced = False
            for batch in self.loader:
                produced = True
                yield batch
            if produced:
                return

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        if state:
            self.loader = self._build(state)

    @property
    def skipped_samples(self) -> int:
        skipped = getattr(self.loader, "skipped", None)  # webdataset's counter; DALI raises on a bad sample
        return int(skipped.value) if skipped is not None else 0

    @property
    def lost_by_shard(self) -> Dict[str, int]:
        """Shard -> samples this rank could not read so far (data.on_error=skip; webdataset only)."""
        return dict(getattr(self.loader, "lost_by_shard", {}))


def train_stream(cfg: RefineConfig, rank: int = 0, world: int = 1) -> TrainStream:
    run_data(cfg)  # data.dataset and the shards agree, or a ConfigError before anything is read
    kind = resolve_pipeline(cfg)
    return MemoryStream(cfg, rank, world) if kind == "memory" else ShardStream(cfg, rank, world, kind)


def eval_arrays(cfg: RefineConfig, split: str, limit: int = 0,
                uint8: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """A split of the run's data (:func:`run_data`) as evaluation tensors (resize to the global crop size, centre
    crop): (N, 3, S, S) and (N,).

    Reads the shards the run trains on (``train``: the train split of data.train_shards, ``test``: the test split
    of data.test_shards, which defaults to the same set), or the embedded arrays without shards (the images the
    embedded shards hold). ``limit``: the first N of the split (shard sets are written shuffled).
    ``uint8``: the images before scaling and normalisation, a quarter of the memory
    (:func:`scale_refiner.data.augment.normalize_batch` finishes them batch by batch).
    """
    size = cfg.augment.global_size

    def finish(x):  # resized uint8 values as float k/255: exactly back to k
        return x.mul(255).round_().to(torch.uint8) if uint8 else x

    if run_data(cfg, evaluate=True, train=False).train is None:
        images, labels = _arrays(cfg, split)
        if limit:
            images, labels = images[:limit], labels[:limit]
        dataset = ArrayDataset(images, labels, EvalTransform(size, size, normalize=not uint8))
        loader = DataLoader(dataset, batch_size=512, num_workers=cfg.data.num_workers)
        xs, ys = zip(*[(finish(x), y) for x, y, _ in loader])
        return torch.cat(xs), torch.cat(ys)
    from scale_refiner.data.wds_pipeline import WdsEvalLoader
    shards = _shard_split(cfg, split, training=False)
    xs, ys, seen = [], [], 0
    for batch in WdsEvalLoader(shards.tars, 512, resize=size, crop=size, normalize=not uint8):
        x, y = finish(batch[0]), batch[1]
        xs.append(x)
        ys.append(y)
        seen += len(y)
        if limit and seen >= limit:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:limit], y[:limit]) if limit else (x, y)
