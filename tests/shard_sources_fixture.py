"""Source folders and tars whose bytes are the same on every machine, for the tests that compare a shard set
with one written by the earlier, in-memory writer (stored hashes).

The PNGs are written here byte by byte, their pixels in deflate's stored (uncompressed) blocks, so no zlib or
Pillow version changes them; ``--format keep`` stores them as they are, so the shard tars' bytes depend only on
the writer's order, names and members."""
import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np


def png_bytes(seed: int, size: int = 6, grey: bool = False) -> bytes:
    px = np.random.default_rng(seed).integers(0, 256, (size, size * (1 if grey else 3)), dtype=np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in px)  # filter type 0 per row
    stored = (b"\x78\x01\x01" + struct.pack("<HH", len(raw), len(raw) ^ 0xFFFF) + raw  # one final stored block
              + struct.pack(">I", zlib.adler32(raw)))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 0 if grey else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stored) + chunk(b"IEND", b"")


BAD = b"\x89PNG\r\n\x1a\n not an image"


def class_folder(root: Path, classes=("0", "2", "10", "cat", "Dog"), per_class: int = 11, seed: int = 0) -> Path:
    """``root/<class>/<n>.png``; one greyscale image and two undecodable ones among them."""
    for c_no, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / c / f"{i:03d}.png").write_bytes(png_bytes(seed + 100 * c_no + i, grey=(c_no, i) == (1, 3)))
    (root / classes[1] / "004.png").write_bytes(BAD)
    (root / classes[-1] / "bad.png").write_bytes(BAD[:12])
    return root


def split_folder(root: Path) -> Path:
    """``root/train/<class>`` and ``root/val/<class>``, an undecodable image among the first of val."""
    class_folder(root / "train", classes=("a", "b", "c"), per_class=9, seed=1)
    class_folder(root / "val", classes=("a", "b", "c"), per_class=3, seed=2)
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def webdataset_tars(root: Path) -> Path:
    """``root/in-train-0.tar`` (a sample without label, one undecodable), ``in-train-1.tar`` (cut short in its
    sixth sample) and ``in-test.tar``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("in-train-0", 14, 10), ("in-train-1", 9, 20), ("in-test", 6, 30)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(n):
                key = f"s{seed + i:04d}"
                _add(tar, f"{key}.png", BAD if (name, i) == ("in-train-0", 5) else png_bytes(seed + i))
                if (name, i) != ("in-train-0", 2):
                    _add(tar, f"{key}.cls", str((seed + i) % 4).encode())
        data = buf.getvalue()
        if name == "in-train-1":
            cut = data.find(f"s{seed + 5:04d}.png".encode()) + 700  # inside the sixth sample's image
            data = data[:cut]
        (root / f"{name}.tar").write_bytes(data)
    return root


def cases(tmp: Path):
    """(name, make_shards keyword arguments) of the compared conversions."""
    folder = f"folder:{class_folder(tmp / 'classes')}"
    split = f"folder:{split_folder(tmp / 'split')}"
    tars = f"tar:{webdataset_tars(tmp / 'tars')}/*.tar"
    return [
        ("folder-fraction", dict(source=folder, samples_per_shard=7, seed=3, skip_bad=True, test_fraction=0.25)),
        ("folder-png", dict(source=folder, samples_per_shard=16, seed=0, skip_bad=True, fmt="png")),
        ("split-limit", dict(source=split, samples_per_shard=4, seed=1, skip_bad=True, limit=5)),
        ("split", dict(source=split, samples_per_shard=5, seed=2, skip_bad=True)),
        ("tars", dict(source=tars, samples_per_shard=5, seed=4, skip_bad=True)),
        ("tars-limit", dict(source=tars, samples_per_shard=3, seed=5, skip_bad=True, limit=4)),
    ]
