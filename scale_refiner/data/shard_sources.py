"""Where shard sets come from: Fashion-MNIST (Debian's package), scikit-learn's digits, class folders, and other
webdataset tars (``make_shards --source``). Each returns the samples of each split and the class names.

The embedded sources are small and hold their encoded images in memory; a folder or tar source lists its
images (:class:`FileImage`, :class:`TarImage`) and the writer's workers read each shard's images. With
``skip_bad`` a source must know which images do not decode before it numbers the samples (the numbering and the
seeded order count only the readable ones), so it asks ``check`` (:func:`unreadable`, or the writer's workers
running it in parallel): ``--skip-bad`` decodes every image twice."""
from __future__ import annotations

import contextlib
import json
import os
import random
import glob as globlib
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from scale_refiner.data.shard_format import (IMAGE_EXTS, LABEL_EXTS, MANIFEST, FileImage, ImageData, PathLike,
                                             SPLITS, Sample, ShardError, TruncatedTarError, encode_array,
                                             iter_tar_samples, unreadable)


SourceData = Tuple[Dict[str, List[Sample]], List[str]]


Checker = Callable[[Sequence[ImageData], str, int], List[bool]]  # images, format, quality -> unreadable?


def _from_arrays(images: np.ndarray, labels: np.ndarray, fmt: str, quality: int) -> List[Sample]:
    return [Sample(encode_array(img, fmt, quality), int(y), i) for i, (img, y) in enumerate(zip(images, labels))]


def source_fashion_mnist(fmt: str = "png", quality: int = 95, limit: int = 0, root: Optional[PathLike] = None
                         ) -> SourceData:
    from scale_refiner.data.fashion_mnist import CLASS_NAMES, DEFAULT_ROOT, load_fashion_mnist
    out = {}
    for split in SPLITS:
        images, labels = load_fashion_mnist(split, root or DEFAULT_ROOT)
        if limit:
            images, labels = images[:limit], labels[:limit]
        out[split] = _from_arrays(images, labels, fmt, quality)
    return out, list(CLASS_NAMES)


def source_digits(fmt: str = "png", quality: int = 95, limit: int = 0, upscale: int = 1) -> SourceData:
    """scikit-learn's bundled 8x8 digits (1797 images), split 80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    if upscale > 1:
        images = np.stack([np.asarray(Image.fromarray(im).resize((8 * upscale, 8 * upscale), Image.BICUBIC))
                           for im in images])
    idx = np.arange(len(images))
    tr, te = train_test_split(idx, test_size=0.2, stratify=d.target, random_state=0)
    out = {}
    for split, sel in (("train", np.sort(tr)), ("test", np.sort(te))):
        if limit:
            sel = sel[:limit]
        out[split] = _from_arrays(images[sel], d.target[sel], fmt, quality)
    return out, [str(i) for i in range(10)]


_FOLDER_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _class_order(name: str):
    """Natural order of class-folder names: numeric names (ASCII digits only) by value, before the others, which
    are sorted as text (code points: upper case before lower case)."""
    return (0, int(name), "") if name.isascii() and name.isdigit() else (1, 0, name)


def _images_in(d: Path) -> List[Path]:
    return sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in _FOLDER_EXTS)


def _listing(what: str, paths: List[Path]) -> str:
    return f"{len(paths)} {what} ({', '.join(str(p) for p in paths[:3])}{', ...' if len(paths) > 3 else ''})"


def source_folder(path: PathLike, fmt: str = "keep", quality: int = 95, limit: int = 0, skip_bad: bool = False,
                  test_fraction: float = 0.0, seed: int = 0, stats: Optional[Dict] = None,
                  check: Checker = unreadable) -> SourceData:
    """ImageNet-style ``PATH/<class>/<image>``; with ``PATH/train`` and ``PATH/val`` (or ``test``) subfolders
    they become the splits, else every image goes to train, and ``test_fraction`` of each class (a seeded,
    per-class draw) to test; with neither, a note in ``stats["notes"]`` says the set has no test split. Class
    ids follow the class-folder names of train in natural order (:func:`_class_order`: ``2`` before ``10``).

    Refused, naming the folder, rather than guessed: a class folder holding sub-folders of images (they would be
    merged into one class), images outside any class folder (they have no label), both ``val/`` and ``test/``,
    ``val/`` or ``test/`` without ``train/``, and a test class absent from train. Files that are not images by
    their extension are skipped and counted in a note."""
    root = Path(path)
    if not root.is_dir():
        raise ShardError(f"folder source {root}: no such directory")
    if not 0 <= test_fraction < 1:
        raise ShardError(f"--test-fraction {test_fraction} must be in [0, 1)")
    held_out = [root / n for n in ("val", "test") if (root / n).is_dir()]
    if len(held_out) > 1:
        raise ShardError(f"folder source {root} holds both val/ and test/: one of them is the test split; move or "
                         f"rename the other")
    if held_out and not (root / "train").is_dir():
        raise ShardError(f"folder source {root} holds {held_out[0].name}/ but no train/: put the training class "
                         f"folders under {root / 'train'}")
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", [])
    notes = stats.setdefault("notes", [])
    if (root / "train").is_dir():
        split_dirs = {"train": root / "train", **({"test": held_out[0]} if held_out else {})}
        if test_fraction:
            if held_out:
                raise ShardError(f"--test-fraction {test_fraction}: folder source {root} has its own test split "
                                 f"({held_out[0]}); leave --test-fraction at 0")
        ignored = [p for p in sorted(root.iterdir()) if p.name not in ("train", "val", "test")
                   and (p.is_dir() or p.suffix.lower() in _FOLDER_EXTS)]
        if ignored:
            notes.append(f"folder source {root}: not read, being neither train/, val/ nor test/: "
                         f"{', '.join(str(p) for p in ignored[:5])}{', ...' if len(ignored) > 5 else ''}")
    else:
        split_dirs = {"train": root}
    classes = sorted((p.name for p in split_dirs["train"].iterdir() if p.is_dir()), key=_class_order)
    if not classes:
        raise ShardError(f"folder source {split_dirs['train']}: no class sub-folders")
    class_id = {c: i for i, c in enumerate(classes)}
    not_images: List[Path] = []

    def files_of(d: Path) -> List[Tuple[Path, int]]:
        loose = _images_in(d)
        if loose:
            raise ShardError(f"{d}: {_listing('images outside any class folder', loose)}; each image goes in "
                             f"the folder of its class")
        out = []
        for c in sorted((p.name for p in d.iterdir() if p.is_dir()), key=_class_order):
            if c not in class_id:
                raise ShardError(f"{d / c}: class folder not present in {split_dirs['train']}")
            nested = sorted({f.parent for f in (d / c).rglob("*")
                             if f.is_file() and f.suffix.lower() in _FOLDER_EXTS and f.parent != d / c})
            if nested:
                raise ShardError(f"{d / c}: {_listing('sub-folders with images', nested)}; a class is one folder "
                                 f"of images: point folder: at the level whose sub-folders are the classes")
            not_images.extend(f for f in (d / c).iterdir() if f.is_file() and f.suffix.lower() not in _FOLDER_EXTS)
            out += [(f, class_id[c]) for f in _images_in(d / c)]
        return out

    listing = {s: files_of(d) for s, d in split_dirs.items()}
    stats["splits_from"] = {s: str(d) for s, d in split_dirs.items()}
    if "test" not in listing and test_fraction:
        stats["splits_from"]["test"] = f"{test_fraction:g} of each class of {root}, drawn with seed {seed}"
    if not_images:
        notes.append(f"folder source {root}: skipped "
                     f"{_listing('files that are not images by their extension', sorted(not_images))}")
    if "test" not in listing and not test_fraction:
        notes.append(
            f"folder source {root} has no test/ or val/ folder and --test-fraction is 0: the shard set has no "
            f"test split, which evaluation reads; pass --test-fraction 0.1 to hold out a tenth of each class")
    if "test" not in listing:
        rng = random.Random(seed)
        train, test = [], []
        for c in range(len(classes)):
            items = [x for x in listing["train"] if x[1] == c]
            rng.shuffle(items)
            n_test = int(round(len(items) * test_fraction))
            test += items[:n_test]
            train += items[n_test:]
        listing = {"train": sorted(train), "test": sorted(test)}
        if test_fraction and not test:
            notes.append(f"folder source {root}: --test-fraction {test_fraction} holds out no image (every class "
                         f"is too small for it), so the shard set has no test split, which evaluation reads")
    out = {}
    for split, items in listing.items():
        if limit:
            items = items[:limit]
        images = [FileImage(str(f)) for f, _ in items]
        bad = check(images, fmt, quality) if skip_bad else [False] * len(images)
        samples = []
        for image, (f, y), skip in zip(images, items, bad):
            if skip:
                stats["skipped"].append(str(f))
                continue
            samples.append(Sample(image, y, len(samples)))
        out[split] = samples
    stats["dataset"] = root.resolve().name
    return out, classes


_TAR_IMAGE_EXTS = IMAGE_EXTS + ("webp", "bmp", "tif", "tiff", "ppm", "pgm")


def _is_image(ext: str) -> bool:
    return ext.split(".")[-1] in _TAR_IMAGE_EXTS


def _whole_samples(tar_path: str, skip_bad: bool, skipped: List) -> Iterator[Tuple[str, Dict]]:
    """``iter_tar_samples``, images left in the tar (:class:`TarImage`); with ``skip_bad`` a truncated tar keeps
    the samples read whole and appends the truncation to ``skipped`` (the manifest's list), instead of failing."""
    try:
        yield from iter_tar_samples(tar_path, lazy=_is_image)
    except TruncatedTarError as e:
        if not skip_bad:
            raise ShardError(f"{e} (--skip-bad keeps the samples before it and records the loss)") from None
        skipped.append(f"{tar_path}: truncated after sample {e.last_key!r}; the rest of the file is lost")


def source_tar(pattern: str, fmt: str = "keep", quality: int = 95, limit: int = 0, skip_bad: bool = False,
               stats: Optional[Dict] = None, check: Checker = unreadable) -> SourceData:
    """Existing webdataset shards matching ``pattern`` (e.g. ``/data/in-*.tar``); a file name containing
    ``train``/``test``/``val`` assigns its split (default train). Images: png/jpg/jpeg/webp/...; labels: the
    first of cls/class/label/target. Class names are taken from a sibling manifest.json if there is one."""
    paths = sorted(globlib.glob(os.path.expanduser(pattern)))
    paths = [p for p in paths if p.endswith(".tar")]
    if not paths:
        raise ShardError(f"tar source {pattern!r}: no .tar files match")
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", [])
    # First the listing, in file order: per tar its samples (split, label, image) and what is skipped for its
    # structure (no image or label, a truncation); then, with skip_bad, which images do not decode; then the
    # samples numbered in that order as if each had been read in turn (``limit`` counts readable samples).
    listed: List[List] = []  # per tar: ("sample", split, label, image) | ("bad", what) | ("truncated", what)
    counts = {s: 0 for s in SPLITS}  # without skip_bad every listed sample is kept: ``limit`` can stop the listing
    for p in paths:
        name = Path(p).name.lower()
        split = "test" if ("test" in name or "val" in name) else "train"
        entries: List = []
        listed.append(entries)
        truncation: List[str] = []
        for key, parts in _whole_samples(p, skip_bad, truncation):
            if not skip_bad and limit and counts[split] >= limit:
                break
            what = f"{p}: sample {key!r}"
            img_ext = next((e for e in parts if _is_image(e)), None)
            lab_ext = next((e for e in LABEL_EXTS if e in parts), None)
            try:
                if img_ext is None or lab_ext is None:
                    missing = "an image" if img_ext is None else "a label (.cls)"
                    raise ShardError(f"{what} has no {missing}; components: {sorted(parts)}")
                try:
                    label = int(parts[lab_ext].decode().strip())
                except ValueError as e:
                    raise ShardError(f"{what}: label {parts[lab_ext][:20]!r} is not an integer") from e
            except ShardError:
                if not skip_bad:
                    raise
                entries.append(("bad", what))
                continue
            entries.append(("sample", split, label, parts[img_ext]))
            counts[split] += 1
        entries += [("truncated", t) for t in truncation]
    images = [e[3] for entries in listed for e in entries if e[0] == "sample"]
    bad = iter(check(images, fmt, quality) if skip_bad else [False] * len(images))
    listed = [[e + (next(bad),) if e[0] == "sample" else e for e in entries] for entries in listed]
    out: Dict[str, List[Sample]] = {s: [] for s in SPLITS}
    max_label = -1
    for p, entries in zip(paths, listed):
        split = "test" if any(w in Path(p).name.lower() for w in ("test", "val")) else "train"
        for entry in entries:
            if entry[0] == "truncated":  # reached only when the samples before it did not stop at the limit
                stats["skipped"].append(entry[1])
                continue
            if limit and len(out[split]) >= limit:
                break
            if entry[0] == "bad":
                stats["skipped"].append(entry[1])
                continue
            _, _, label, image, unreadable_image = entry
            if unreadable_image:
                stats["skipped"].append(image.what)
                continue
            max_label = max(max_label, label)
            out[split].append(Sample(image, label, len(out[split])))
    if not out["test"]:
        del out["test"]
        stats.setdefault("notes", []).append(
            f"tar source {pattern!r}: no file name contains 'test' or 'val', so the shard set has no test split, "
            f"which evaluation reads")
    names = None
    sibling = Path(paths[0]).parent / MANIFEST
    stats["dataset"] = Path(paths[0]).parent.resolve().name
    if sibling.is_file():
        with contextlib.suppress(Exception):
            written = json.loads(sibling.read_text())
            names = written["class_names"]
            stats["dataset"] = written.get("dataset") or stats["dataset"]
    if not names or len(names) <= max_label:
        names = [str(i) for i in range(max_label + 1)]
    return out, names
