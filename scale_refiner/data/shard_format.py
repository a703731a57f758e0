"""The shard format: constants, sample keys, image encoding and checks, reading a tar sample by sample, and
DALI's index files. The format is documented in ``shards/README.md``.

A tar holds samples as consecutive members ``<key>.png`` (or ``.jpg``), ``<key>.cls`` (class id, ASCII decimal)
and ``<key>.idx`` (dataset index within the split, ASCII decimal). Every image written here is 8-bit RGB or L
(greyscale) PNG/JPEG, so the decoders never meet CMYK, 16-bit or palette images from a set written here.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from scale_refiner.atomic import atomic_path


MANIFEST = "manifest.json"


FORMAT_NAME = "scale-refiner-wds"


FORMAT_VERSION = 1


SPLITS = ("train", "test")


IMAGE_EXTS = ("png", "jpg", "jpeg")


LABEL_EXTS = ("cls", "class", "label", "target")  # accepted when reading foreign shards (tar: source)


INDEX_VERSION = "v1.2"  # DALI's webdataset index format (nvidia.dali wds2idx)


PathLike = Union[str, Path]


class ShardError(ValueError):
    """A shard set or a sample that cannot be used; the message names the file (and the sample key)."""


def split_key(name: str) -> Tuple[str, str]:
    """Webdataset's rule: the key is the member path up to the first dot of its file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


IMAGE_FORMATS = ("keep", "png", "jpg")  # what make_shards stores: see normalize_image_bytes


def _pil_format(fmt: str) -> str:
    """PIL's name of the format images are (re-)encoded in; ``keep`` re-encodes losslessly, as PNG."""
    if fmt in ("png", "keep"):
        return "PNG"
    if fmt in ("jpg", "jpeg"):
        return "JPEG"
    raise ValueError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {fmt!r}")


def image_ext(data: bytes) -> str:
    """The member extension of encoded image bytes (``png`` or ``jpg``), from their signature."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    raise ShardError(f"image bytes starting {data[:8]!r} are neither PNG nor JPEG")


def encode_array(img: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """uint8 [H, W] (greyscale) or [H, W, 3] (RGB) as PNG (``png``, ``keep``) or JPEG (``jpg``) bytes."""
    img = np.ascontiguousarray(img)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"expected uint8 [H, W] or [H, W, 3], got {img.dtype} {img.shape}")
    buf = io.BytesIO()
    kwargs = dict(quality=quality) if _pil_format(fmt) == "JPEG" else dict(compress_level=6)
    Image.fromarray(img).save(buf, format=_pil_format(fmt), **kwargs)
    return buf.getvalue()


def normalize_image_bytes(data: bytes, fmt: str = "keep", quality: int = 95, what: str = "image") -> bytes:
    """Image bytes of any PIL-readable format as 8-bit RGB/L PNG or JPEG bytes.

    ``keep``: an 8-bit RGB/L PNG or JPEG keeps its own bytes (no lossy decode and re-encode of a JPEG); any other
    image (CMYK, 16-bit, palette, alpha, WebP, ...) is re-encoded as PNG, losslessly. ``png`` / ``jpg``: every image
    is stored in that format, kept as it is when it already is. Raises :class:`ShardError` naming ``what`` when
    PIL cannot decode the image (corrupt or truncated data).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes fully: a truncated or corrupt file fails here, not in the training loop
            wanted = ("PNG", "JPEG") if fmt == "keep" else (_pil_format(fmt),)
            if im.format in wanted and im.mode in ("RGB", "L"):
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


@dataclass(frozen=True)
class FileImage:
    """An image file of a folder source, read (and re-encoded where ``--format`` asks) only when the worker
    that writes its shard does: a source lists 1.28 M ImageNet files, it does not hold their 140 GB."""
    path: str

    @property
    def what(self) -> str:
        return self.path


@dataclass(frozen=True)
class TarImage:
    """An image member of a source tar: where its data lies, read when its shard is written."""
    tar: str
    offset: int
    size: int
    key: str

    @property
    def what(self) -> str:
        return f"{self.tar}: sample {self.key!r}"


ImageData = Union[bytes, FileImage, TarImage]


@dataclass
class Sample:
    """One sample to write: the image (encoded bytes, PNG or JPEG, the member's extension following them; or a
    file or tar member to read when its shard is written), class id, dataset index."""
    image: ImageData
    label: int
    index: int


def read_image(image: ImageData, fmt: str = "keep", quality: int = 95) -> bytes:
    """The bytes a shard stores for ``image``: encoded bytes as they are (the embedded sources encode their
    arrays themselves), a file or tar member read and passed through :func:`normalize_image_bytes`."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, FileImage):
        data = Path(image.path).read_bytes()
    else:
        with open(image.tar, "rb") as f:
            f.seek(image.offset)
            data = f.read(image.size)
    return normalize_image_bytes(data, fmt, quality, what=image.what)


def unreadable(images: Sequence[ImageData], fmt: str = "keep", quality: int = 95) -> List[bool]:
    """For each image: True where :func:`read_image` fails to decode it (what ``--skip-bad`` leaves out)."""
    out = []
    for image in images:
        try:
            read_image(image, fmt, quality)
            out.append(False)
        except ShardError:
            out.append(True)
    return out


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


class TruncatedTarError(ShardError):
    """A tar that ends before its end-of-archive marker: the samples after ``last_key`` are lost."""

    def __init__(self, message: str, last_key: Optional[str]):
        super().__init__(message)
        self.last_key = last_key


def iter_tar_samples(tar_path: PathLike, lazy: Callable[[str], bool] = lambda ext: False
                     ) -> Iterator[Tuple[str, Dict[str, Union[bytes, TarImage]]]]:
    """(key, {ext: bytes}) for each sample of a webdataset tar, grouping consecutive members by key.

    Python's ``tarfile`` ends its iteration quietly at a header cut short past the first member, so a
    truncated tar would look like a shorter one: every member's data is checked to be whole, and the archive
    to end with its end-of-archive marker (two zero blocks, which every tar writer appends); otherwise
    ``TruncatedTarError`` names the file and the last sample read (it is yielded first when its members were
    read whole; one cut off after them shows as a missing component).

    ``lazy(ext)`` true: that member is not read but given as a :class:`TarImage` (a source lists its images
    and their shards' workers read them); it is whole when the file holds all of its data."""
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
                if lazy(ext.lower()):
                    if m.offset_data + m.size > size:
                        raise tarfile.ReadError("unexpected end of data")  # what reading it would raise
                    parts[ext.lower()] = TarImage(str(tar_path), m.offset_data, m.size, k)
                    continue
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
