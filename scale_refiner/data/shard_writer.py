"""Writing a shard set: samples shuffled across the whole split (DALI's reader shuffles only within a buffer of
``initial_fill`` samples), tars and DALI indexes, and the manifest, written last.

Layout of a shard set (``shards/NAME``)::

    manifest.json                 written last; its presence means the set is complete
    train-00000.tar  train-00000.idx  train-00001.tar ...
    test-00000.tar   test-00000.idx   ...

Every file is written to a temporary name in the same directory and renamed into place; the manifest is renamed
last, so an interrupted run leaves no manifest and ``manifest.load_manifest`` refuses the directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from scale_refiner.atomic import atomic_write
from scale_refiner.data.shard_format import (FORMAT_NAME, FORMAT_VERSION, INDEX_VERSION, MANIFEST, PathLike, Sample,
                                             ShardError, _pil_format)
from scale_refiner.data.shard_jobs import DONE_SUFFIX, ShardJob, ShardWorkers, finished_shard, write_shard
from scale_refiner.data.shard_sources import source_digits, source_fashion_mnist, source_folder, source_tar
from scale_refiner.data.manifest import load_manifest


SHARD_ROOT_ENV = "SCALE_REFINER_SHARD_ROOT"


EMBEDDED_DATASET = "fashion-mnist"  # the data set whose shards are written on first use, under the shard root


def _checkout() -> Optional[Path]:
    """The repository this package is imported from when it is a source checkout (an editable install, or
    PYTHONPATH pointing at it): the directory above the package that holds ``setup.py`` and ``shards/README.md``.
    None for an installed package, whose parent directory is site-packages and no place to write data into."""
    repo = Path(__file__).resolve().parents[2]
    return repo if (repo / "setup.py").is_file() and (repo / "shards" / "README.md").is_file() else None


def shard_root(configured: Optional[PathLike] = None) -> Path:
    """Where the embedded shard sets live: ``configured`` (``data.shard_root``, ``--shard-root``), else the
    environment variable ``SCALE_REFINER_SHARD_ROOT``, else ``shards/`` of the source checkout the package runs
    from, else ``$XDG_CACHE_HOME/scale-refiner/shards`` (``~/.cache/...``) for an installed package."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(SHARD_ROOT_ENV):
        return Path(os.environ[SHARD_ROOT_ENV]).expanduser()
    repo = _checkout()
    if repo is not None:
        return repo / "shards"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "scale-refiner" / "shards"


def split_jobs(samples: Sequence[Sample], out_dir: PathLike, split: str, samples_per_shard: int, seed: int,
               fmt: str = "keep", quality: int = 95) -> List[ShardJob]:
    """The shards of a split: ``samples`` in a seeded order, cut into ``{split}-{i:05d}`` of ``samples_per_shard``."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not samples:
        raise ShardError(f"split {split!r} has no samples to write")
    order = list(range(len(samples)))
    random.Random(f"{seed}-{split}").shuffle(order)
    return [ShardJob(str(out_dir), split, shard_no, [samples[i] for i in order[start:start + samples_per_shard]],
                     fmt, quality)
            for shard_no, start in enumerate(range(0, len(order), samples_per_shard))]


def write_split(samples: Sequence[Sample], out_dir: PathLike, split: str, samples_per_shard: int,
                seed: int, fmt: str = "keep", quality: int = 95) -> List[Dict]:
    """Shuffle ``samples`` (seeded) and write them as ``{split}-{i:05d}.tar`` + ``.idx`` in this process; returns
    shard records. Each image member's extension (``png``, ``jpg``) follows its bytes."""
    return [write_shard(job)[0] for job in split_jobs(samples, out_dir, split, samples_per_shard, seed, fmt, quality)]


def _write_jobs(jobs: List[ShardJob], workers: ShardWorkers, progress: bool, log: Callable[[str], None]
                ) -> List[Tuple[Dict, List[str]]]:
    """Each job's (record, image extensions), in the jobs' order: reused where an earlier run finished the
    shard from the same inputs, else written by the workers. Shows files and shards done and files/s."""
    results: List[Optional[Tuple[Dict, List[str]]]] = [finished_shard(job) for job in jobs]
    todo = [job for job, done in zip(jobs, results) if done is None]
    files = sum(len(job.samples) for job in todo)
    reused = len(jobs) - len(todo)
    if reused:
        log(f"resuming: {reused} of {len(jobs)} shards are finished from the same inputs and kept; writing "
            f"{len(todo)}")
    position = {id(job): i for i, job in enumerate(jobs)}
    t0 = time.perf_counter()
    from tqdm import tqdm
    with tqdm(total=files, unit="file", disable=not progress, mininterval=1.0, smoothing=0.1,
              desc=f"shards 0/{len(todo)}") as bar:
        for n, (job, record, exts) in enumerate(workers.write(todo), 1):
            results[position[id(job)]] = (record, exts)
            bar.set_description(f"shards {n}/{len(todo)}", refresh=False)
            bar.update(len(job.samples))
    seconds = time.perf_counter() - t0
    log(f"wrote {files} files in {len(todo)} shards in {seconds:.1f} s: {files / max(seconds, 1e-9):.0f} files/s "
        f"with {workers.workers} worker{'s' if workers.workers > 1 else ''}")
    return results  # type: ignore[return-value]


def check_source(source: str) -> None:
    """``ShardError`` unless ``source`` is one ``make_shards`` reads; a bare path is told its prefix."""
    if source in ("fashion-mnist", "digits") or source.startswith(("folder:", "tar:")):
        return
    hint = ""
    if os.sep in source or os.path.exists(source):
        hint = f"; a directory of class folders is --source folder:{source}"
        if source.endswith(".tar") or "*" in source:
            hint = f"; tar files are --source 'tar:{source}'"
    raise ShardError(f"unknown source {source!r}: expected fashion-mnist, digits, folder:PATH or tar:GLOB{hint}")


def make_shards(source: str, out: PathLike, samples_per_shard: int = 2000, seed: int = 0, fmt: str = "keep",
                quality: int = 95, limit: int = 0, skip_bad: bool = False, upscale: int = 1,
                test_fraction: float = 0.0, log: Callable[[str], None] = lambda s: None,
                name: Optional[str] = None, workers: int = 1, progress: bool = False) -> Path:
    """Write a shard set for ``source`` into ``out``; returns the manifest path (written last).

    source: ``fashion-mnist`` | ``digits`` | ``folder:PATH`` | ``tar:GLOB``. ``fmt``: ``keep`` stores PNG and
    JPEG images with their own bytes and re-encodes others as PNG; ``png`` / ``jpg`` store every image so
    (:func:`normalize_image_bytes`). ``limit`` keeps the first N samples of each split (tests); ``skip_bad``
    skips undecodable images (folder/tar sources) and records them in the manifest instead of failing;
    ``upscale`` enlarges the digits (benchmarks at larger resolution); ``test_fraction`` holds out that part of
    each class of a folder source without a test split. ``name``: the data set's name in the manifest, which
    a run's ``data.dataset`` must equal (default: the source's name, the folder's, or the tars' directory's).

    ``workers`` processes read, encode and write whole shards in parallel (1: this process); the manifest is
    the same for any number. They are spawned, so a script calling this with ``workers > 1`` needs Python's
    ``if __name__ == "__main__":`` guard (a spawned worker imports the script's main module again).
    ``progress``: a progress bar (files, shards, files/s) on stderr. A rerun into the same ``out`` keeps every
    shard an earlier (interrupted) run finished from the same inputs and writes the others (``shard_jobs``); a
    shard whose source, seed, format or size changed is written again.
    """
    fmt = "jpg" if fmt == "jpeg" else fmt
    _pil_format(fmt)
    if test_fraction and not source.startswith("folder:"):
        raise ShardError(f"--test-fraction {test_fraction}: only a folder: source is split by fraction; "
                         f"{source!r} brings its own splits")
    with ShardWorkers(workers) as pool:
        return _make_shards(source, Path(out), samples_per_shard, seed, fmt, quality, limit, skip_bad, upscale,
                            test_fraction, log, name, pool, progress)


def _make_shards(source: str, out: Path, samples_per_shard: int, seed: int, fmt: str, quality: int, limit: int,
                 skip_bad: bool, upscale: int, test_fraction: float, log: Callable[[str], None],
                 name: Optional[str], pool: ShardWorkers, progress: bool) -> Path:
    stats: Dict = {"skipped": []}
    t0 = time.perf_counter()
    if source == "fashion-mnist":
        data, names = source_fashion_mnist(fmt, quality, limit)
    elif source == "digits":
        data, names = source_digits(fmt, quality, limit, upscale)
    elif source.startswith("folder:"):
        data, names = source_folder(source[len("folder:"):], fmt, quality, limit, skip_bad, test_fraction, seed,
                                    stats, check=pool.unreadable)
    elif source.startswith("tar:"):
        data, names = source_tar(source[len("tar:"):], fmt, quality, limit, skip_bad, stats, check=pool.unreadable)
    else:
        check_source(source)
    listed = sum(len(v) for v in data.values())
    log(f"listed {listed} images of {source} in {time.perf_counter() - t0:.1f} s"
        + (" (each decoded once to find the unreadable ones: --skip-bad)" if skip_bad and listed else ""))
    if not any(data.values()):
        skipped = f" ({len(stats['skipped'])} skipped as unreadable)" if stats["skipped"] else ""
        raise ShardError(f"source {source!r} holds no images{skipped}: nothing to write")
    if source.startswith(("folder:", "tar:")) and not data.get("train"):
        raise ShardError(f"source {source!r} holds no training images (splits found: "
                         f"{', '.join(f'{k}={len(v)}' for k, v in data.items())})")
    for note in stats.get("notes", ()):
        log(f"warning: {note}")
    name = name or stats.get("dataset") or source
    if not name.strip() or name != name.strip():
        raise ShardError(f"data set name {name!r}: give a non-empty name without surrounding spaces (--name)")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    with contextlib.suppress(FileNotFoundError):
        manifest_path.unlink()  # the set is incomplete until the new manifest lands
    for split in data:  # what a killed run was writing (atomic_path's temporaries: ".<file name>.<random>.tmp")
        for partial in out.glob(f".{split}-*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
    jobs = {split: split_jobs(samples, out, split, samples_per_shard, seed, fmt, quality)
            for split, samples in data.items() if samples}
    results = iter(_write_jobs([job for split_jobs_ in jobs.values() for job in split_jobs_], pool, progress, log))
    splits = {}
    image_exts = set()
    for split, split_jobs_ in jobs.items():
        samples = data[split]
        records = []
        for _ in split_jobs_:
            record, exts = next(results)
            records.append(record)
            image_exts.update(exts)
        counts = np.bincount([s.label for s in samples], minlength=len(names)).tolist()
        splits[split] = dict(num_samples=len(samples), class_counts=counts, shards=records)
        origin = stats.get("splits_from", {}).get(split)
        log(f"{split}: {len(samples)} samples in {len(records)} shards" + (f" (from {origin})" if origin else ""))
    # Remove stale shards of an earlier, larger run into the same directory.
    listed_files = {f"{job.stem}{suffix}" for split_jobs_ in jobs.values() for job in split_jobs_
                    for suffix in (".tar", ".idx", DONE_SUFFIX)}
    for split in splits:
        for suffix in (".tar", ".idx", DONE_SUFFIX):
            for stale in out.glob(f"{split}-*{suffix}"):
                if stale.name not in listed_files:
                    stale.unlink()
    # one extension, or DALI's list of alternatives ("jpg;png") when a kept source mixes PNG and JPEG
    exts = ";".join(sorted(image_exts))
    manifest = dict(format=FORMAT_NAME, version=FORMAT_VERSION, dataset=name, source=source, seed=seed,
                    image_format=fmt, image_ext=exts, num_classes=len(names), class_names=list(names),
                    keys=[exts, "cls", "idx"], index_format=f"DALI webdataset index {INDEX_VERSION}", splits=splits,
                    skipped=stats["skipped"])
    if test_fraction:
        manifest["test_fraction"] = test_fraction  # with ``seed``: the per-class hold-out is drawn again alike
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    skipped = f"; {len(stats['skipped'])} skipped, listed in the manifest" if stats["skipped"] else ""
    log(f"data set {name!r} (what a run's data.dataset must be): {len(names)} classes ({shown}); "
        f"images {exts} (--format {fmt}){skipped}")
    with atomic_write(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest_path


@contextlib.contextmanager
def _dir_lock(path: Path):
    import fcntl
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_fashion_mnist_shards(root: Optional[PathLike] = None, samples_per_shard: int = 5000,
                                seed: int = 0, log: Callable[[str], None] = lambda s: None) -> Path:
    """The embedded default: Fashion-MNIST shards in ``root`` (default: ``shard_root() / "fashion-mnist"``),
    written on first use; returns the manifest.

    Idempotent and safe when several ranks call it at once (a file lock; the others wait and reuse the set).
    An existing set is accepted when its manifest loads and every listed file has its recorded size.
    """
    root = Path(root) if root is not None else shard_root() / EMBEDDED_DATASET
    manifest = root / MANIFEST
    with _dir_lock(root):
        if manifest.is_file():
            try:
                load_manifest(manifest, verify="size")
                return manifest
            except ShardError:
                pass  # damaged or partial: rewrite
        log(f"writing the embedded Fashion-MNIST shards to {root} (another place: data.shard_root, --shard-root "
            f"or {SHARD_ROOT_ENV})")
        return make_shards("fashion-mnist", root, samples_per_shard=samples_per_shard, seed=seed)
