"""A synthetic ImageNet-style class folder, to measure make_shards on (docs/data.md, "Converting a large folder").

    python scripts/make_image_folder.py /tmp/folder-96 --images 10000 --classes 100 --size 96 96
    python scripts/make_image_folder.py /tmp/folder-400 --images 10000 --classes 100 --size 400 350

JPEGs (quality 90) of smooth colour fields with noise, so that they compress about as photos do; image i goes
to class i mod --classes. Written with the cores this process may use. Not for training: the labels mean
nothing.
"""
import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def _write(args) -> int:
    out, first, count, classes, width, height = args
    rng = np.random.default_rng(first)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(first, first + count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        freq = rng.uniform(0.005, 0.05, 3)
        field = np.stack([np.sin(freq[c] * (x + 2 * y) + phase[c]) for c in range(3)], axis=-1) * 90 + 128
        img = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(Path(out) / f"class{i % classes:03d}" / f"img{i:07d}.jpg", quality=90)
    return count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--size", type=int, nargs=2, default=(96, 96), metavar=("WIDTH", "HEIGHT"))
    a = p.parse_args(argv)
    for c in range(a.classes):
        (Path(a.out) / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    step = 500
    jobs = [(a.out, s, min(step, a.images - s), a.classes, *a.size) for s in range(0, a.images, step)]
    with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        written = sum(pool.map(_write, jobs))
    print(f"wrote {written} images in {a.classes} class folders under {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
