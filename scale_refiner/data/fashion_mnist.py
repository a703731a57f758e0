"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, read with numpy alone.

The package installs the four original gzip'd IDX files under ``/usr/share/datasets/fashion-mnist``. The IDX
format is small enough to parse here (no torchvision download logic, no network): a big-endian header of
``0x00 0x00 <type> <ndim>`` followed by ``ndim`` uint32 sizes, then the raw data. Only unsigned bytes
(type 0x08) occur in these files, so a header is accepted only with that type and the expected rank, and the
payload must be exactly ``prod(dims)`` bytes: a truncated or padded file is an error, never a silently short
dataset.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Tuple, Union

import numpy as np

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_UBYTE = 0x08
_INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist`"


class IDXFormatError(ValueError):
    """An IDX file that cannot be read as what it claims to be; the message names the file."""


def read_idx_ubyte(path: Union[str, Path], ndim: int) -> np.ndarray:
    """Read one gzip'd IDX file of unsigned bytes with rank ``ndim``; returns a uint8 array of its dims."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the dataset package may be incomplete; {_INSTALL_HINT})")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    # BadGzipFile: not gzip at all; EOFError: truncated stream; zlib.error: corrupted deflate data.
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise IDXFormatError(f"{path}: not a readable gzip file ({e})") from e

    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IDXFormatError(f"{path}: {len(raw)} bytes, shorter than an IDX header of rank {ndim}")
    zero0, zero1, dtype_code, rank = raw[:4]
    if (zero0, zero1, dtype_code, rank) != (0, 0, _UBYTE, ndim):
        magic = int.from_bytes(raw[:4], "big")
        expected = (_UBYTE << 8) | ndim
        raise IDXFormatError(f"{path}: magic number 0x{magic:08x}, expected 0x{expected:08x} "
                             f"(unsigned bytes, rank {ndim})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected_bytes = int(np.prod(dims, dtype=np.int64))
    payload = len(raw) - header_len
    if payload != expected_bytes:
        raise IDXFormatError(f"{path}: header says dims {dims} = {expected_bytes} bytes of data, "
                             f"file holds {payload}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def load_fashion_mnist(split: str = "train",
                       root: Union[str, Path] = DEFAULT_ROOT) -> Tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``[N, 28, 28]`` and labels int64 ``[N]`` of ``split`` ('train': 60000, 'test': 10000)."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory {root} does not exist; {_INSTALL_HINT} "
                                f"or pass root= pointing at the *-ubyte.gz files")
    image_file, label_file = (root / name for name in _FILES[split])
    images = read_idx_ubyte(image_file, ndim=3)
    labels = read_idx_ubyte(label_file, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(f"{image_file} holds {images.shape[0]} images but {label_file} "
                             f"holds {labels.shape[0]} labels")
    if images.shape[1:] != (28, 28):
        raise IDXFormatError(f"{image_file}: images are {images.shape[1:]}, expected (28, 28)")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise IDXFormatError(f"{label_file}: label {int(labels.max())} outside 0..{len(CLASS_NAMES) - 1}")
    # frombuffer gives read-only views of the decompressed bytes; hand out ordinary writable arrays.
    return images.copy(), labels.astype(np.int64)
