"""Webdataset shards: writing (from Fashion-MNIST, scikit-learn digits, class folders or other shards), DALI
index files, the JSON manifest, and validation. The format is documented in ``shards/README.md``.

Layout of a shard set (``shards/NAME``)::

    manifest.json                 written last; its presence means the set is complete
    train-00000.tar  train-00000.idx  train-00001.tar ...
    test-00000.tar   test-00000.idx   ...

A tar holds samples as consecutive members ``<key>.png`` (or ``.jpg``), ``<key>.cls`` (class id, ASCII decimal)
and ``<key>.idx`` (dataset index within the split, ASCII decimal). Samples are shuffled *before* they are written
(across the whole split), because DALI's reader shuffles only within a buffer of ``initial_fill`` samples.
Every image is written as 8-bit RGB or L (greyscale) PNG/JPEG, so the decoders never meet CMYK, 16-bit or
palette images from a set written here; :func:`validate_shards` checks shards written by other tools.

Every file is written to a temporary name in the same directory and renamed into place; the manifest is renamed
last, so an interrupted run leaves no manifest and :func:`load_manifest` refuses the directory.
"""
from __future__ import annotations

import contextlib
import glob as globlib
import io
import json
import os
import random
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from scale_refiner.atomic import atomic_path, atomic_write, sha256_file  # noqa: F401 (re-exported)

MANIFEST = "manifest.json"
FORMAT_NAME = "scale-refiner-wds"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
IMAGE_EXTS = ("png", "jpg", "jpeg")
LABEL_EXTS = ("cls", "class", "label", "target")  # accepted when reading foreign shards (tar: source)
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FMNIST_SHARDS = REPO_ROOT / "shards" / "fashion-mnist"
INDEX_VERSION = "v1.2"  # DALI's webdataset index format (nvidia.dali wds2idx)

PathLike = Union[str, Path]


class ShardError(ValueError):
    """A shard set or a sample that cannot be used; the message names the file (and the sample key)."""


# ----------------------------------------------------------------------------------------------------------
# small helpers


def split_key(name: str) -> Tuple[str, str]:
    """Webdataset's rule: the key is the member path up to the first dot of its file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


# ----------------------------------------------------------------------------------------------------------
# image normalisation: every image leaves here as 8-bit RGB or L PNG/JPEG bytes

def _pil_format(fmt: str) -> str:
    if fmt == "png":
        return "PNG"
    if fmt in ("jpg", "jpeg"):
        return "JPEG"
    raise ValueError(f"image format must be png or jpg, got {fmt!r}")


def encode_array(img: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """uint8 [H, W] (greyscale) or [H, W, 3] (RGB) as PNG or JPEG bytes."""
    img = np.ascontiguousarray(img)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"expected uint8 [H, W] or [H, W, 3], got {img.dtype} {img.shape}")
    buf = io.BytesIO()
    kwargs = dict(quality=quality) if _pil_format(fmt) == "JPEG" else dict(compress_level=6)
    Image.fromarray(img).save(buf, format=_pil_format(fmt), **kwargs)
    return buf.getvalue()


def normalize_image_bytes(data: bytes, fmt: str = "png", quality: int = 95, what: str = "image") -> bytes:
    """Image bytes of any PIL-readable format as 8-bit RGB/L ``fmt`` bytes; kept as they are when already so.

    Raises :class:`ShardError` naming ``what`` when PIL cannot decode the image (corrupt or truncated data).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes fully: a truncated or corrupt file fails here, not in the training loop
            if im.format == _pil_format(fmt) and im.mode in ("RGB", "L"):
                return data
            if im.mode in ("L", "I;16", "I;16B", "I;16L", "I") and "A" not in im.getbands():
                arr = np.asarray(im)
                if arr.dtype != np.uint8:  # 16-bit / 32-bit greyscale: rescale to 8 bits
                    arr = (arr.astype(np.float64) * (255.0 / max(1, (1 << (8 * arr.dtype.itemsize)) - 1)))
                    arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
                return encode_array(arr, fmt, quality)
            return encode_array(np.asarray(im.convert("RGB")), fmt, quality)
    except ShardError:
        raise
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ShardError(f"{what}: cannot decode image ({type(e).__name__}: {e})") from e


def check_image_bytes(data: bytes) -> Optional[str]:
    """None if ``data`` decodes with PIL as an 8-bit RGB or L PNG/JPEG (what the DALI and torch pipelines are
    tested on), else a short reason."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
            im.load()
    except Exception as e:
        return f"cannot decode ({type(e).__name__}: {e})"
    if fmt not in ("PNG", "JPEG"):
        return f"format {fmt}, expected PNG or JPEG"
    if mode not in ("RGB", "L"):
        return f"mode {mode}, expected 8-bit RGB or L (CMYK, 16-bit, palette and alpha images are rewritten " \
               f"by make_shards)"
    return None


# ----------------------------------------------------------------------------------------------------------
# writing

@dataclass
class Sample:
    """One sample to write: encoded image bytes, class id, dataset index."""
    image: bytes
    label: int
    index: int


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def index_entries(tar_path: PathLike) -> List[List[Tuple[str, int, int, str]]]:
    """Samples of a tar as lists of (extension, data offset, size, member name), in file order."""
    samples: List[List[Tuple[str, int, int, str]]] = []
    last = None
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                if not key or key.endswith("/"):
                    continue
                if key != last:
                    samples.append([])
                    last = key
                samples[-1].append((ext, m.offset_data, m.size, m.name))
    except tarfile.TarError as e:
        raise ShardError(f"{tar_path}: not a readable tar file ({e})") from e
    return samples


def write_dali_index(tar_path: PathLike, index_path: PathLike) -> None:
    """Write DALI's webdataset index (format v1.2) for ``tar_path``, atomically.

    Uses DALI's own ``wds2idx`` (``IndexCreator``) when it is installed and GNU tar is on PATH, else writes the
    same format here: a line ``v1.2 <number of samples>``, then one line per sample listing, for each member,
    ``<ext> <data offset> <size> <member name>`` separated by spaces.
    """
    with atomic_path(index_path) as tmp:
        creator = None
        if shutil.which("tar") is not None:
            with contextlib.suppress(ImportError):
                from wds2idx import IndexCreator  # shipped with nvidia-dali
                creator = IndexCreator
        if creator is not None:
            with creator(str(Path(tar_path).resolve()), tmp, verbose=False) as ic:
                ic.create_index()
        else:
            write_index_file(index_entries(tar_path), tmp)


def write_index_file(entries: Sequence[Sequence[Tuple[str, int, int, str]]], path: PathLike) -> None:
    if not entries:
        raise ShardError(f"{path}: cannot index an empty tar")
    with open(path, "w") as f:
        f.write(f"{INDEX_VERSION} {len(entries)}\n")
        for sample in entries:
            f.write(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in sample) + "\n")


def write_split(samples: Sequence[Sample], out_dir: PathLike, split: str, samples_per_shard: int,
                image_ext: str, seed: int) -> List[Dict]:
    """Shuffle ``samples`` (seeded) and write them as ``{split}-{i:05d}.tar`` + ``.idx``; returns shard records."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not samples:
        raise ShardError(f"split {split!r} has no samples to write")
    out_dir = Path(out_dir)
    order = list(range(len(samples)))
    random.Random(f"{seed}-{split}").shuffle(order)
    records = []
    for shard_no, start in enumerate(range(0, len(order), samples_per_shard)):
        stem = f"{split}-{shard_no:05d}"
        tar_path = out_dir / f"{stem}.tar"
        with atomic_write(tar_path) as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for i in order[start:start + samples_per_shard]:
                    s = samples[i]
                    key = f"{split}{s.index:08d}"
                    _add_member(tar, f"{key}.{image_ext}", s.image)
                    _add_member(tar, f"{key}.cls", str(int(s.label)).encode())
                    _add_member(tar, f"{key}.idx", str(int(s.index)).encode())
        write_dali_index(tar_path, out_dir / f"{stem}.idx")
        records.append(dict(tar=tar_path.name, index=f"{stem}.idx",
                            num_samples=len(order[start:start + samples_per_shard]),
                            bytes=tar_path.stat().st_size, sha256=sha256_file(tar_path),
                            index_sha256=sha256_file(out_dir / f"{stem}.idx")))
    return records


# ----------------------------------------------------------------------------------------------------------
# sources: each yields {split: [Sample]} and class names

SourceData = Tuple[Dict[str, List[Sample]], List[str]]


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
    """Natural order of class-folder names: numeric names by value, before the others (sorted as text)."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def source_folder(path: PathLike, fmt: str = "png", quality: int = 95, limit: int = 0, skip_bad: bool = False,
                  test_fraction: float = 0.0, seed: int = 0, stats: Optional[Dict] = None) -> SourceData:
    """ImageNet-style ``PATH/<class>/<image>``; with ``PATH/train`` and ``PATH/val`` (or ``test``) subfolders
    they become the splits, else every image goes to train (and ``test_fraction`` of each class to test; with
    none, a note in ``stats["notes"]`` says the set has no test split). Class ids follow the class-folder names
    of train in natural order (numeric names by value: ``2`` before ``10``). A class folder holding sub-folders
    of images is refused: its images would otherwise be merged into one class."""
    root = Path(path)
    if not root.is_dir():
        raise ShardError(f"folder source {root}: no such directory")
    split_dirs = {"train": root / "train"}
    for name in ("val", "test"):
        if (root / name).is_dir():
            split_dirs["test"] = root / name
            break
    if not split_dirs["train"].is_dir():
        split_dirs = {"train": root}
    classes = sorted((p.name for p in split_dirs["train"].iterdir() if p.is_dir()), key=_class_order)
    if not classes:
        raise ShardError(f"folder source {split_dirs['train']}: no class sub-folders")
    class_id = {c: i for i, c in enumerate(classes)}
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", [])

    def files_of(d: Path) -> List[Tuple[Path, int]]:
        out = []
        for c in sorted((p.name for p in d.iterdir() if p.is_dir()), key=_class_order):
            if c not in class_id:
                raise ShardError(f"{d / c}: class folder not present in {split_dirs['train']}")
            nested = sorted({f.parent for f in (d / c).rglob("*")
                             if f.is_file() and f.suffix.lower() in _FOLDER_EXTS and f.parent != d / c})
            if nested:
                raise ShardError(f"{d / c}: images in sub-folders ({', '.join(str(n) for n in nested[:3])}"
                                 f"{', ...' if len(nested) > 3 else ''}); a class is one folder of images: "
                                 f"point folder: at the level whose sub-folders are the classes")
            out += [(f, class_id[c]) for f in sorted((d / c).iterdir())
                    if f.is_file() and f.suffix.lower() in _FOLDER_EXTS]
        return out

    listing = {s: files_of(d) for s, d in split_dirs.items()}
    if "test" not in listing and not test_fraction:
        stats.setdefault("notes", []).append(
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
    out = {}
    for split, items in listing.items():
        if limit:
            items = items[:limit]
        samples = []
        for f, y in items:
            try:
                data = normalize_image_bytes(f.read_bytes(), fmt, quality, what=str(f))
            except ShardError:
                if not skip_bad:
                    raise
                stats["skipped"].append(str(f))
                continue
            samples.append(Sample(data, y, len(samples)))
        out[split] = samples
    return out, classes


class TruncatedTarError(ShardError):
    """A tar that ends before its end-of-archive marker: the samples after ``last_key`` are lost."""

    def __init__(self, message: str, last_key: Optional[str]):
        super().__init__(message)
        self.last_key = last_key


def iter_tar_samples(tar_path: PathLike) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of a webdataset tar, grouping consecutive members by key.

    Python's ``tarfile`` ends its iteration quietly at a header cut short past the first member, so a
    truncated tar would look like a shorter one: every member's data is checked to be whole, and the archive
    to end with its end-of-archive marker (two zero blocks, which every tar writer appends); otherwise
    ``TruncatedTarError`` names the file and the last sample read (it is yielded first when its members were
    read whole; one cut off after them shows as a missing component)."""
    key, parts, whole = None, {}, None  # whole: the last sample yielded
    try:
        size = os.path.getsize(tar_path)
        with tarfile.open(tar_path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k, ext = split_key(m.name)
                if not k or k.endswith("/") or not ext:
                    continue
                if k != key:
                    if key is not None:
                        yield key, parts
                        whole = key
                    key, parts = k, {}
                data = tar.extractfile(m).read()
                if len(data) != m.size:
                    raise TruncatedTarError(f"{tar_path}: truncated inside member {m.name!r} ({len(data)} of "
                                            f"{m.size} bytes); samples after {whole!r} are lost", whole)
                parts[ext.lower()] = data
            end = tar.offset  # just past the last member: the end-of-archive marker starts here
            tar.fileobj.seek(end)
            marker = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
    except TruncatedTarError:
        raise
    except tarfile.ReadError as e:
        if "unexpected end of data" in str(e):  # a member's data cut short by the end of the file
            raise TruncatedTarError(f"{tar_path}: truncated inside sample {key!r}; samples after {whole!r} "
                                    f"are lost", whole) from e
        raise ShardError(f"{tar_path}: unreadable tar after key {key!r} ({type(e).__name__}: {e})") from e
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{tar_path}: unreadable tar after key {key!r} ({type(e).__name__}: {e})") from e
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.count(0) != len(marker):
        if key is not None:  # its members were read whole; one cut off after them shows as a missing part
            yield key, parts
        raise TruncatedTarError(f"{tar_path}: no end-of-archive marker after byte {end} of {size} (the file is "
                                f"truncated or damaged); samples after {key!r} are lost", key)
    if key is not None:
        yield key, parts


def _whole_samples(tar_path: str, skip_bad: bool, stats: Dict) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """``iter_tar_samples``; with ``skip_bad`` a truncated tar keeps the samples read whole and records the
    truncation in ``stats["skipped"]`` (the manifest's list), instead of failing."""
    try:
        yield from iter_tar_samples(tar_path)
    except TruncatedTarError as e:
        if not skip_bad:
            raise ShardError(f"{e} (--skip-bad keeps the samples before it and records the loss)") from None
        stats["skipped"].append(f"{tar_path}: truncated after sample {e.last_key!r}; the rest of the file is lost")


def source_tar(pattern: str, fmt: str = "png", quality: int = 95, limit: int = 0, skip_bad: bool = False,
               stats: Optional[Dict] = None) -> SourceData:
    """Existing webdataset shards matching ``pattern`` (e.g. ``/data/in-*.tar``); a file name containing
    ``train``/``test``/``val`` assigns its split (default train). Images: png/jpg/jpeg/webp/...; labels: the
    first of cls/class/label/target. Class names are taken from a sibling manifest.json if there is one."""
    paths = sorted(globlib.glob(os.path.expanduser(pattern)))
    paths = [p for p in paths if p.endswith(".tar")]
    if not paths:
        raise ShardError(f"tar source {pattern!r}: no .tar files match")
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", [])
    out: Dict[str, List[Sample]] = {s: [] for s in SPLITS}
    max_label = -1
    for p in paths:
        name = Path(p).name.lower()
        split = "test" if ("test" in name or "val" in name) else "train"
        for key, parts in _whole_samples(p, skip_bad, stats):
            if limit and len(out[split]) >= limit:
                break
            what = f"{p}: sample {key!r}"
            img_ext = next((e for e in parts if e.split(".")[-1] in IMAGE_EXTS + ("webp", "bmp", "tif", "tiff",
                                                                                    "ppm", "pgm")), None)
            lab_ext = next((e for e in LABEL_EXTS if e in parts), None)
            try:
                if img_ext is None or lab_ext is None:
                    missing = "an image" if img_ext is None else "a label (.cls)"
                    raise ShardError(f"{what} has no {missing}; components: {sorted(parts)}")
                try:
                    label = int(parts[lab_ext].decode().strip())
                except ValueError as e:
                    raise ShardError(f"{what}: label {parts[lab_ext][:20]!r} is not an integer") from e
                data = normalize_image_bytes(parts[img_ext], fmt, quality, what=what)
            except ShardError:
                if not skip_bad:
                    raise
                stats["skipped"].append(what)
                continue
            max_label = max(max_label, label)
            out[split].append(Sample(data, label, len(out[split])))
    if not out["test"]:
        del out["test"]
        stats.setdefault("notes", []).append(
            f"tar source {pattern!r}: no file name contains 'test' or 'val', so the shard set has no test split, "
            f"which evaluation reads")
    names = None
    sibling = Path(paths[0]).parent / MANIFEST
    if sibling.is_file():
        with contextlib.suppress(Exception):
            names = json.loads(sibling.read_text())["class_names"]
    if not names or len(names) <= max_label:
        names = [str(i) for i in range(max_label + 1)]
    return out, names


# ----------------------------------------------------------------------------------------------------------
# make_shards

def make_shards(source: str, out: PathLike, samples_per_shard: int = 2000, seed: int = 0, fmt: str = "png",
                quality: int = 95, limit: int = 0, skip_bad: bool = False, upscale: int = 1,
                test_fraction: float = 0.0, log: Callable[[str], None] = lambda s: None) -> Path:
    """Write a shard set for ``source`` into ``out``; returns the manifest path (written last).

    source: ``fashion-mnist`` | ``digits`` | ``folder:PATH`` | ``tar:GLOB``. ``limit`` keeps the first N samples
    of each split (tests); ``skip_bad`` skips undecodable images (folder/tar sources) and records them in the
    manifest instead of failing; ``upscale`` enlarges the digits (benchmarks at larger resolution).
    """
    fmt = "jpg" if fmt == "jpeg" else fmt
    _pil_format(fmt)
    stats: Dict = {"skipped": []}
    if source == "fashion-mnist":
        data, names = source_fashion_mnist(fmt, quality, limit)
    elif source == "digits":
        data, names = source_digits(fmt, quality, limit, upscale)
    elif source.startswith("folder:"):
        data, names = source_folder(source[len("folder:"):], fmt, quality, limit, skip_bad, test_fraction, seed,
                                    stats)
    elif source.startswith("tar:"):
        data, names = source_tar(source[len("tar:"):], fmt, quality, limit, skip_bad, stats)
    else:
        raise ValueError(f"unknown source {source!r}: expected fashion-mnist, digits, folder:PATH or tar:GLOB")
    if not any(data.values()):
        skipped = f" ({len(stats['skipped'])} skipped as unreadable)" if stats["skipped"] else ""
        raise ShardError(f"source {source!r} holds no images{skipped}: nothing to write")
    if source.startswith(("folder:", "tar:")) and not data.get("train"):
        raise ShardError(f"source {source!r} holds no training images (splits found: "
                         f"{', '.join(f'{k}={len(v)}' for k, v in data.items())})")
    for note in stats.get("notes", ()):
        log(f"warning: {note}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    with contextlib.suppress(FileNotFoundError):
        manifest_path.unlink()  # the set is incomplete until the new manifest lands
    splits = {}
    for split, samples in data.items():
        if not samples:
            continue
        records = write_split(samples, out, split, samples_per_shard, fmt, seed)
        counts = np.bincount([s.label for s in samples], minlength=len(names)).tolist()
        splits[split] = dict(num_samples=len(samples), class_counts=counts, shards=records)
        log(f"{split}: {len(samples)} samples in {len(records)} shards")
    # Remove stale shards of an earlier, larger run into the same directory.
    listed = {r[k] for s in splits.values() for r in s["shards"] for k in ("tar", "index")}
    for split in splits:
        for stale in list(out.glob(f"{split}-*.tar")) + list(out.glob(f"{split}-*.idx")):
            if stale.name not in listed:
                stale.unlink()
    manifest = dict(format=FORMAT_NAME, version=FORMAT_VERSION, source=source, seed=seed, image_ext=fmt,
                    num_classes=len(names), class_names=list(names), keys=[fmt, "cls", "idx"],
                    index_format=f"DALI webdataset index {INDEX_VERSION}", splits=splits,
                    skipped=stats["skipped"])
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


def ensure_fashion_mnist_shards(root: PathLike = DEFAULT_FMNIST_SHARDS, samples_per_shard: int = 5000,
                                seed: int = 0) -> Path:
    """The embedded default: Fashion-MNIST shards under ``root``, written on first use; returns the manifest.

    Idempotent and safe when several ranks call it at once (a file lock; the others wait and reuse the set).
    An existing set is accepted when its manifest loads and every listed file has its recorded size.
    """
    root = Path(root)
    manifest = root / MANIFEST
    with _dir_lock(root):
        if manifest.is_file():
            try:
                load_manifest(manifest, verify="size")
                return manifest
            except ShardError:
                pass  # damaged or partial: rewrite
        return make_shards("fashion-mnist", root, samples_per_shard=samples_per_shard, seed=seed)


# ----------------------------------------------------------------------------------------------------------
# reading the manifest

@dataclass
class ShardSplit:
    """One split of a shard set, with absolute paths."""
    split: str
    tars: List[str]
    indexes: List[str]
    counts: List[int]
    num_samples: int
    class_counts: List[int] = field(default_factory=list)


@dataclass
class ShardSet:
    root: Path
    manifest: Dict

    @property
    def class_names(self) -> List[str]:
        return list(self.manifest["class_names"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def image_ext(self) -> str:
        return str(self.manifest.get("image_ext", "png"))

    def split(self, name: str) -> ShardSplit:
        splits = self.manifest["splits"]
        if name not in splits:
            raise ShardError(f"{self.root / MANIFEST}: no split {name!r} (has {sorted(splits)})")
        s = splits[name]
        return ShardSplit(name, [str(self.root / r["tar"]) for r in s["shards"]],
                          [str(self.root / r["index"]) for r in s["shards"]],
                          [int(r["num_samples"]) for r in s["shards"]], int(s["num_samples"]),
                          list(s.get("class_counts", [])))


def load_manifest(path: PathLike, verify: str = "sha256") -> ShardSet:
    """Load and validate a shard set's manifest (``path`` is the manifest or its directory).

    verify: ``sha256`` (re-hash every tar and index), ``size`` (existence + byte size), ``none`` (existence).
    Raises :class:`ShardError` naming the file for: a missing manifest, an unreadable/foreign manifest, a split
    with an empty shard list, a listed shard or index that is absent, a size or checksum mismatch, or per-shard
    counts that do not add up.
    """
    if verify not in ("sha256", "size", "none"):
        raise ValueError(f"verify must be sha256, size or none, got {verify!r}")
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: shard manifest not found (write the shards with "
                         f"`python launch/make_shards.py --source ... --out {path.parent}`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ShardError(f"{path}: not a {FORMAT_NAME} manifest (format={found!r})")
    if int(manifest.get("version", -1)) > FORMAT_VERSION:
        raise ShardError(f"{path}: manifest version {manifest['version']} is newer than this code ({FORMAT_VERSION})")
    for key in ("class_names", "num_classes", "splits"):
        if key not in manifest:
            raise ShardError(f"{path}: manifest lacks {key!r}")
    root = path.parent
    if not manifest["splits"]:
        raise ShardError(f"{path}: manifest lists no splits")
    for name, s in manifest["splits"].items():
        shards = s.get("shards") or []
        if not shards:
            raise ShardError(f"{path}: split {name!r} has an empty shard list")
        total = 0
        for r in shards:
            for kind in ("tar", "index"):
                f = root / r[kind]
                if not f.is_file():
                    raise ShardError(f"{f}: {kind} file listed in {path} (split {name!r}) is absent")
            tar = root / r["tar"]
            if verify in ("size", "sha256") and "bytes" in r and tar.stat().st_size != int(r["bytes"]):
                raise ShardError(f"{tar}: {tar.stat().st_size} bytes, manifest {path} says {r['bytes']} "
                                 f"(truncated or replaced shard)")
            if verify == "sha256":
                for kind, ck in (("tar", "sha256"), ("index", "index_sha256")):
                    if ck in r:
                        got = sha256_file(root / r[kind])
                        if got != r[ck]:
                            raise ShardError(f"{root / r[kind]}: sha256 {got[:16]}... does not match manifest "
                                             f"{path} ({r[ck][:16]}...)")
            if int(r["num_samples"]) < 1:
                raise ShardError(f"{tar}: manifest {path} lists it with {r['num_samples']} samples")
            total += int(r["num_samples"])
        if total != int(s["num_samples"]):
            raise ShardError(f"{path}: split {name!r} says {s['num_samples']} samples but its shards hold {total}")
    return ShardSet(root, manifest)


def resolve_shards(spec: PathLike, split: str, verify: str = "size") -> ShardSplit:
    """A split from a manifest path or shard directory."""
    return load_manifest(spec, verify=verify).split(split)


# ----------------------------------------------------------------------------------------------------------
# validation of shards (written here or by other tools)

@dataclass
class ValidationReport:
    samples: int = 0
    bad: List[Tuple[str, str, str]] = field(default_factory=list)  # (shard, key, reason)

    @property
    def ok(self) -> bool:
        return not self.bad

    def __str__(self) -> str:
        lines = [f"{self.samples} samples, {len(self.bad)} bad"]
        lines += [f"  {shard}: sample {key!r}: {reason}" for shard, key, reason in self.bad[:50]]
        if len(self.bad) > 50:
            lines.append(f"  ... {len(self.bad) - 50} more")
        return "\n".join(lines)


def validate_shards(tars: Iterable[PathLike], indexes: Optional[Iterable[PathLike]] = None,
                    num_classes: Optional[int] = None) -> ValidationReport:
    """Decode every sample with PIL and check what the DALI pipeline cannot skip at run time.

    Reports (shard, key, reason) for: an unreadable/truncated tar, a sample without image, ``.cls`` or ``.idx``,
    a non-integer or out-of-range label, an image that is not 8-bit RGB/L PNG/JPEG or does not decode, and an
    index file that disagrees with the tar (``indexes`` given).
    """
    report = ValidationReport()
    tars = [str(t) for t in tars]
    if not tars:
        raise ShardError("validate_shards: empty shard list")
    for t in tars:
        try:
            for key, parts in iter_tar_samples(t):
                report.samples += 1
                img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                problems = []
                if img is None:
                    problems.append(f"no image component (has {sorted(parts)})")
                else:
                    why = check_image_bytes(img)
                    if why:
                        problems.append(why)
                for comp in ("cls", "idx"):
                    if comp not in parts:
                        problems.append(f"no .{comp} component")
                        continue
                    try:
                        v = int(parts[comp].decode().strip())
                        if comp == "cls" and num_classes is not None and not 0 <= v < num_classes:
                            problems.append(f"label {v} outside 0..{num_classes - 1}")
                    except ValueError:
                        problems.append(f".{comp} {parts[comp][:20]!r} is not an integer")
                for p in problems:
                    report.bad.append((t, key, p))
        except ShardError as e:
            report.bad.append((t, "", str(e)))
    if indexes is not None:
        for t, ix in zip(tars, indexes):
            try:
                expect = index_entries(t)
                got = read_index_file(ix)
            except (ShardError, OSError, ValueError) as e:
                report.bad.append((t, "", f"index {ix}: {e}"))
                continue
            if got != expect:
                report.bad.append((t, "", f"index {ix} does not match the tar (rebuild it with wds2idx)"))
    return report


def read_index_file(path: PathLike) -> List[List[Tuple[str, int, int, str]]]:
    lines = Path(path).read_text().splitlines()
    if not lines:
        raise ShardError(f"{path}: empty index file")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise ShardError(f"{path}: index header {lines[0]!r}, expected '{INDEX_VERSION} <count>'")
    out = []
    for line in lines[1:]:
        toks = line.split(" ")
        if len(toks) % 4:
            raise ShardError(f"{path}: malformed index line {line[:80]!r}")
        out.append([(toks[i], int(toks[i + 1]), int(toks[i + 2]), toks[i + 3]) for i in range(0, len(toks), 4)])
    if len(out) != int(head[1]):
        raise ShardError(f"{path}: header says {head[1]} samples, file lists {len(out)}")
    return out
