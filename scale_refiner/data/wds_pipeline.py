"""The reference pipeline: webdataset shards -> PIL decode -> :class:`MultiCropAugment` (torchvision) in a torch
DataLoader. The fallback where DALI is not installed, and the baseline of ``launch/bench_data.py``.

Same output as :class:`scale_refiner.data.dali_pipeline.DaliMultiCropLoader` (``MultiCropAugment.collate``):
``{"global": [2, B, 3, Hg, Wg], "local": [N, B, 3, Hl, Wl], "label": [B], "index": [B]}``.

Sharding: rank ``r`` of ``world`` reads the tars ``r, r + world, ...`` of the (per-epoch seeded) shuffled shard
list, so the ranks read disjoint tars and together every sample once per epoch. Within a rank, DataLoader
workers split the rank's tars when there are at least as many tars as workers, else they read all of them and
keep every ``num_workers``-th sample. ``drop_last=True`` yields ``steps_per_epoch`` batches on every rank (the
smallest rank's share of samples over the batch size, from the manifest's per-shard counts) so ranks stay in
lock-step; ``drop_last=False`` yields every sample of the rank once.

Views of a sample are drawn from a seed of (run seed, epoch, dataset index), as in ``loaders.SeededViews``: they
do not depend on the number of workers or ranks.

Bad input: ``on_error="raise"`` raises :class:`ShardError` naming the shard and the key (corrupt or truncated
image, missing ``.cls``/``.idx``, a truncated tar); ``on_error="skip"`` drops what cannot be read and counts it
by shard in the main process (:attr:`WdsMultiCropLoader.lost_by_shard`, :attr:`WdsMultiCropLoader.skipped`): a
bad sample counts 1; a tar that cannot be read on counts every sample of it the manifest lists and it did not
give (all of them for a tar that does not open). Workers send these counts through the stream itself, as
``LostSamples`` records, so nothing is shared between processes. An epoch that ends short of its batches says so.
"""
from __future__ import annotations

import io
import logging
import multiprocessing
import random
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from scale_refiner.data.augment import EvalTransform, MultiCropAugment, sample_seed
from scale_refiner.data.shard_format import IMAGE_EXTS, ShardError

log = logging.getLogger("scale_refiner")


@dataclass
class LostSamples:
    """What a worker could not read, sent to the main process in place of a sample: ``count`` samples of ``shard``
    (``why``: the error)."""
    shard: str
    count: int
    why: str


def decode_image(data: bytes) -> torch.Tensor:
    """Image bytes -> uint8 [C, H, W], C in (1, 3): 8-bit L/RGB as they are, 16-bit greyscale scaled to 8 bits,
    CMYK / palette / alpha converted to RGB."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im).astype(np.float64)
            arr = np.clip(np.round(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        elif im.mode == "L":
            arr = np.asarray(im)
        else:
            arr = np.asarray(im.convert("RGB"))
    t = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def _parse_int(sample: Dict, comp: str) -> int:
    where = f"shard {sample.get('__url__')}, key {sample.get('__key__')!r}"
    if comp not in sample:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise ShardError(f"{where}: sample has no .{comp} component (has {have})")
    try:
        return int(bytes(sample[comp]).decode().strip())
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{where}: .{comp} {bytes(sample[comp])[:20]!r} is not an integer") from e


def decode_sample(sample: Dict):
    """(uint8 image [C, H, W], label, dataset index) of a webdataset sample; ShardError naming shard and key."""
    where = f"shard {sample.get('__url__')}, key {sample.get('__key__')!r}"
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise ShardError(f"{where}: sample has no image (.png/.jpg) component (has {have})")
    label, index = _parse_int(sample, "cls"), _parse_int(sample, "idx")
    try:
        img = decode_image(sample[ext])
    except Exception as e:
        raise ShardError(f"{where}: cannot decode .{ext} ({type(e).__name__}: {e})") from e
    return img, label, index


class _Handler:
    """webdataset exception handler: re-raise as ShardError naming the shard, or count and continue."""

    def __init__(self, on_error: str, counter=None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be raise or skip, got {on_error!r}")
        self.on_error, self.counter = on_error, counter  # counter: None where the stream counts (LostSamples)

    def __call__(self, exn: Exception) -> bool:
        if self.on_error == "skip":
            if self.counter is not None:
                with self.counter.get_lock():
                    self.counter.value += 1
            return True
        if isinstance(exn, ShardError):
            raise exn
        urls = [a for a in getattr(exn, "args", ()) if isinstance(a, str) and a.endswith(".tar")]
        raise ShardError(f"shard {urls[-1] if urls else '?'}: {type(exn).__name__}: "
                         f"{exn.args[0] if exn.args else exn}") from exn


class _EpochStream(torch.utils.data.IterableDataset):
    """One epoch of one rank: tars -> samples -> shuffled -> (views, label, index)."""

    def __init__(self, urls: List[str], transform, seed: int, epoch: int, rank: int, shuffle_buffer: int,
                 handler: _Handler, decode_only: bool = False, counts: Optional[Dict[str, int]] = None):
        self.urls, self.transform, self.seed, self.epoch, self.rank = urls, transform, seed, epoch, rank
        self.shuffle_buffer, self.handler, self.decode_only = shuffle_buffer, handler, decode_only
        # url -> the manifest's sample count: given, a skipped error travels as a LostSamples record
        self.counts = counts

    def _map(self, sample):
        if isinstance(sample, LostSamples):
            return sample
        try:
            img, label, index = decode_sample(sample)
            if self.decode_only:
                return self.transform(img), label, index
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, self.epoch, index))
                return self.transform(img), label, index
        except Exception as e:
            if self.handler(e):
                if self.counts is not None:
                    return LostSamples(str(sample.get("__url__")), 1, f"{type(e).__name__}: {e}")
                return None
            raise

    def _read_tars(self, shards):
        """webdataset's tar reader, one shard at a time, so that a shard that cannot be read on is known with the
        samples it gave: the rest of its manifest count becomes one LostSamples record (skip mode)."""
        for shard in shards:
            url, given = shard["url"], 0
            try:
                for sample in wds.tarfile_to_samples(handler=wds.reraise_exception)(iter([shard])):
                    given += 1
                    yield sample
            except Exception as e:  # noqa: BLE001  (skip mode: every reader error of the shard)
                self.handler(e)  # raises unless skipping
                yield LostSamples(url, max(self.counts.get(url, 0) - given, 1), f"{type(e).__name__}: {e}")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        urls, sample_split = self.urls, nw > 1 and len(self.urls) < nw
        if nw > 1 and not sample_split:
            urls = urls[wid::nw]
        read = (wds.filters.pipelinefilter(self._read_tars)() if self.counts is not None
                else wds.tarfile_to_samples(handler=self.handler))
        stages = [wds.SimpleShardList(urls), read]
        if sample_split:
            stages.append(wds.filters.pipelinefilter(_every_nth)(wid, nw))
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{wid}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        stages.append(wds.filters.pipelinefilter(_map_skip)(self._map))
        return iter(wds.DataPipeline(*stages))


def _every_nth(data, k: int, n: int):
    for i, x in enumerate(data):
        if i % n == k:
            yield x


def _map_skip(data, f):
    for x in data:
        y = f(x)
        if y is not None:
            yield y


def rank_shards(tars: Sequence[str], counts: Sequence[int], rank: int, world: int, epoch: int, seed: int,
                shuffle: bool) -> List[str]:
    """The tars rank ``rank`` reads in ``epoch`` (a seeded per-epoch shuffle of the list, then every world-th)."""
    del counts
    order = list(range(len(tars)))
    if shuffle:
        random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    return [tars[i] for i in order[rank::world]]


class WdsMultiCropLoader:
    """Multi-crop batches for one rank from webdataset shards through the torchvision augmentation."""

    def __init__(self, tars: Sequence[str], counts: Sequence[int], batch_size: int, *, rank: int = 0,
                 world: int = 1, global_size: int = 224, global_scale=(0.25, 1.0), local_size: int = 96,
                 local_scale=(0.05, 0.25), num_local: int = 10, color: bool = True, normalize: bool = True,
                 shuffle: bool = True, shuffle_buffer: int = 1024, seed: int = 0, num_workers: int = 2,
                 drop_last: bool = True, on_error: str = "raise", max_steps_per_epoch: int = 0):
        if not tars:
            raise ShardError("webdataset pipeline: empty shard list")
        if len(tars) != len(counts):
            raise ValueError(f"{len(tars)} tars but {len(counts)} per-shard sample counts")
        if len(tars) < world:
            raise ShardError(f"{len(tars)} shards cannot be split over {world} ranks (write more shards: "
                             f"make_shards --samples-per-shard)")
        self.tars, self.counts = list(tars), [int(c) for c in counts]
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer if shuffle else 0, seed
        self.num_workers, self.drop_last = num_workers, drop_last
        self.augment = MultiCropAugment(global_size, global_scale, local_size, local_scale, num_local,
                                        color=color, normalize=normalize)
        self.on_error = on_error
        self.skipped = multiprocessing.get_context("fork").Value("l", 0)  # samples lost, every epoch so far
        self.lost_by_shard: Dict[str, int] = {}  # shard -> samples lost, every epoch so far (skip mode)
        self._handler = _Handler(on_error)
        self.epoch, self.step = 0, 0
        if drop_last:
            # Every rank reads at least len(tars) // world tars in any epoch's shard permutation, so the sum of
            # that many smallest shards bounds every rank's share in every epoch.
            worst = sum(sorted(self.counts)[:len(self.tars) // world])
            self.steps_per_epoch = worst // batch_size
            if self.steps_per_epoch == 0:
                raise ValueError(f"rank shares of {worst} samples do not fill one batch of {batch_size}")
        else:
            self.steps_per_epoch = None
        if max_steps_per_epoch and (self.steps_per_epoch is None or max_steps_per_epoch < self.steps_per_epoch):
            self.steps_per_epoch = int(max_steps_per_epoch)  # tiny runs: the first batches of each epoch

    def _rank_samples(self, rank: int, epoch: int) -> int:
        if not self.shuffle:
            return sum(self.counts[rank::self.world])
        order = list(range(len(self.tars)))
        random.Random(f"shards-{self.seed}-{epoch}").shuffle(order)
        return sum(self.counts[i] for i in order[rank::self.world])

    def __len__(self) -> int:
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        return -(-self._rank_samples(self.rank, self.epoch) // self.batch_size)

    def state_dict(self) -> Dict:
        return {"epoch": self.epoch, "step": self.step, "skipped": int(self.skipped.value),
                "lost_by_shard": dict(self.lost_by_shard)}

    def load_state_dict(self, state: Dict) -> None:
        """Resume: the next iteration re-creates the epoch and skips the batches already produced (their views
        are recomputed and dropped: correct, not free). The count of skipped bad samples carries on."""
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.skipped.value = int(state.get("skipped", 0))
        self.lost_by_shard = {k: int(v) for k, v in state.get("lost_by_shard", {}).items()}

    def _loader(self, epoch: int):
        """Workers yield single samples (batch_size=None) and the batches are formed here: per-worker batching
        would drop (or emit short) batches at the end of every worker's share, so a rank's batch count would
        depend on the number of workers."""
        urls = rank_shards(self.tars, self.counts, self.rank, self.world, epoch, self.seed, self.shuffle)
        counts = dict(zip(self.tars, self.counts)) if self.on_error == "skip" else None
        stream = _EpochStream(urls, self.augment, self.seed, epoch, self.rank, self.shuffle_buffer, self._handler,
                              counts=counts)
        workers = self.num_workers
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                           prefetch_factor=4 * self.batch_size if workers else None,
                                           persistent_workers=False,
                                           multiprocessing_context="fork" if workers else None)

    def _lost(self, lost: LostSamples) -> None:
        new = lost.shard not in self.lost_by_shard
        self.lost_by_shard[lost.shard] = self.lost_by_shard.get(lost.shard, 0) + lost.count
        self.skipped.value += lost.count
        if new:  # named once per shard, by the rank that reads it
            log.warning("rank %d: shard %s: %d sample(s) lost (data.on_error=skip): %s", self.rank, lost.shard,
                        lost.count, lost.why[:300])

    def _batches(self, epoch: int):
        pending, produced = [], 0
        for sample in self._loader(epoch):
            if isinstance(sample, LostSamples):
                self._lost(sample)
                continue
            pending.append(sample)
            if len(pending) == self.batch_size:
                produced += 1
                yield self.augment.collate(pending)
                pending = []
        if pending and not self.drop_last:
            yield self.augment.collate(pending)
        elif self.steps_per_epoch is not None and produced < self.steps_per_epoch:
            lost = sum(self.lost_by_shard.values())
            log.warning("rank %d, epoch %d: %d of %d batches, the rank's readable samples ran out (%d lost so far in "
                        "%s); the next epoch starts early", self.rank, epoch, produced, self.steps_per_epoch, lost,
                        ", ".join(sorted(self.lost_by_shard)) or "no shard named")

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        skip = self.step
        batches = self._batches(self.epoch)
        try:
            for i, batch in enumerate(batches):
                if self.steps_per_epoch is not None and i >= self.steps_per_epoch:
                    break
                if i < skip:
                    continue
                self.step = i + 1
                yield batch
        finally:
            batches.close()  # shuts the workers down when the epoch is cut short
        self.epoch, self.step = self.epoch + 1, 0


class WdsEvalLoader:
    """Evaluation batches ``(images, labels, indices)`` of one rank: resize + centre crop, shard order."""

    def __init__(self, tars: Sequence[str], batch_size: int, *, rank: int = 0, world: int = 1, resize: int = 224,
                 crop: int = 224, normalize: bool = True, num_workers: int = 2, on_error: str = "raise"):
        if not tars:
            raise ShardError("webdataset pipeline: empty shard list")
        self.urls = list(tars)[rank::world]
        self.transform = EvalTransform(resize, crop, normalize)
        self.skipped = multiprocessing.get_context("fork").Value("l", 0)
        self._handler = _Handler(on_error, self.skipped)
        self.batch_size, self.num_workers = batch_size, num_workers

    def __iter__(self):
        stream = _EpochStream(self.urls, self.transform, 0, 0, 0, 0, self._handler, decode_only=True)
        loader = torch.utils.data.DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers,
                                             multiprocessing_context="fork" if self.num_workers else None)
        for x, y, i in loader:
            yield x, y, i
