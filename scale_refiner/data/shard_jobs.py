"""One shard as a unit of work: what it holds (:class:`ShardJob`), writing it in a worker process (read and encode
its images, tar, DALI index, ``.done`` record), and deciding whether a shard an earlier, interrupted run left is
the one this run would write (resume). Also the pool of worker processes that runs the jobs and the
``--skip-bad`` pre-check.

A finished shard is three files, renamed into place in this order: ``{stem}.tar``, ``{stem}.idx``,
``{stem}.done``. The ``.done`` record (JSON) holds the shard's manifest record, the image extensions it
stored, its sample keys and ``inputs``: a SHA-256 over what determined its bytes (its samples' images, named by
file path or tar offset, or hashed where the source holds them in memory; their labels and indexes; the shard's
name, ``--format`` and ``--quality``). A kill at any moment leaves each shard either whole with its record or
absent (temporary files are removed or ignored), so a rerun reuses a shard when its record's ``inputs`` equal the
job's, the tar has the recorded size and the index its recorded SHA-256; it re-hashes no tar.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from scale_refiner.atomic import atomic_write, sha256_file
from scale_refiner.data.shard_format import (FileImage, ImageData, Sample, TarImage, image_ext, read_image,
                                             unreadable, write_dali_index)


DONE_SUFFIX = ".done"


@dataclass
class ShardJob:
    """One shard to write: ``{split}-{number:05d}`` in ``out_dir``, its samples in their written order."""
    out_dir: str
    split: str
    number: int
    samples: List[Sample]
    fmt: str
    quality: int

    @property
    def stem(self) -> str:
        return f"{self.split}-{self.number:05d}"

    def keys(self) -> List[str]:
        return [f"{self.split}{s.index:08d}" for s in self.samples]

    def inputs(self) -> str:
        """SHA-256 over everything the shard's bytes follow from (the images by name; see the module's note)."""
        h = hashlib.sha256(json.dumps([self.stem, self.fmt, self.quality]).encode())
        for s in self.samples:
            h.update(json.dumps([_image_name(s.image), int(s.label), int(s.index)]).encode())
        return h.hexdigest()


def _image_name(image: ImageData) -> List:
    if isinstance(image, FileImage):
        return ["file", image.path]
    if isinstance(image, TarImage):
        return ["tar", image.tar, image.offset, image.size]
    return ["bytes", hashlib.sha256(image).hexdigest()]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(job: ShardJob) -> Tuple[Dict, List[str]]:
    """Write the job's tar, DALI index and ``.done`` record (each atomically, in that order); returns the
    manifest record and the image extensions stored. Runs in a worker process."""
    out_dir = Path(job.out_dir)
    tar_path, index_path = out_dir / f"{job.stem}.tar", out_dir / f"{job.stem}.idx"
    exts = set()
    with atomic_write(tar_path) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s, key in zip(job.samples, job.keys()):
                data = read_image(s.image, job.fmt, job.quality)
                ext = image_ext(data)
                exts.add(ext)
                _add_member(tar, f"{key}.{ext}", data)
                _add_member(tar, f"{key}.cls", str(int(s.label)).encode())
                _add_member(tar, f"{key}.idx", str(int(s.index)).encode())
    write_dali_index(tar_path, index_path)
    record = dict(tar=tar_path.name, index=index_path.name, num_samples=len(job.samples),
                  bytes=tar_path.stat().st_size, sha256=sha256_file(tar_path), index_sha256=sha256_file(index_path))
    done = dict(inputs=job.inputs(), record=record, image_exts=sorted(exts), keys=job.keys())
    with atomic_write(out_dir / f"{job.stem}{DONE_SUFFIX}", "w") as f:
        json.dump(done, f)
    return record, sorted(exts)


def finished_shard(job: ShardJob) -> Optional[Tuple[Dict, List[str]]]:
    """The record and image extensions of the job's shard when an earlier run wrote it from the same inputs
    and its files are whole (see the module's note); None when it has to be written."""
    out_dir = Path(job.out_dir)
    try:
        done = json.loads((out_dir / f"{job.stem}{DONE_SUFFIX}").read_text())
        record = done["record"]
        if done["inputs"] != job.inputs() or done["keys"] != job.keys():
            return None
        if (out_dir / record["tar"]).stat().st_size != record["bytes"]:
            return None
        if sha256_file(out_dir / record["index"]) != record["index_sha256"]:
            return None
        return record, list(done["image_exts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, unreadable or of another layout: write the shard again


def _check_chunk(args: Tuple[Sequence[ImageData], str, int]) -> List[bool]:
    return unreadable(*args)


class ShardWorkers:
    """``workers`` processes (spawned: the caller may hold threads or a CUDA context, which a fork copies
    badly), or the calling process itself for one worker. A context manager; the pool ends with it."""

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool = None

    def __enter__(self) -> "ShardWorkers":
        if self.workers > 1:
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            if exc[0] is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()

    def write(self, jobs: Sequence[ShardJob]) -> Iterator[Tuple[ShardJob, Dict, List[str]]]:
        """(job, record, image extensions) for each job as its shard is finished, in the order they finish."""
        if self._pool is None:
            for job in jobs:
                yield (job,) + write_shard(job)
            return
        for i, (record, exts) in self._pool.imap_unordered(_write_numbered, list(enumerate(jobs)), chunksize=1):
            yield jobs[i], record, exts

    def unreadable(self, images: Sequence[ImageData], fmt: str, quality: int) -> List[bool]:
        """:func:`unreadable` over the workers, in chunks (``--skip-bad``'s pre-check)."""
        if self._pool is None or len(images) < 2:
            return unreadable(images, fmt, quality)
        size = max(1, min(500, -(-len(images) // (4 * self.workers))))
        chunks = [(images[i:i + size], fmt, quality) for i in range(0, len(images), size)]
        return [bad for part in self._pool.imap(_check_chunk, chunks) for bad in part]


def _write_numbered(item: Tuple[int, ShardJob]) -> Tuple[int, Tuple[Dict, List[str]]]:
    return item[0], write_shard(item[1])


def default_workers() -> int:
    """``--workers``'s default: the cores this process may use, at most 8 (the disk is the limit beyond)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))

