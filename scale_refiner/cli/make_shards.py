"""Write webdataset shards + DALI index files + a JSON manifest (format: shards/README.md).

    python launch/make_shards.py --source fashion-mnist              # into <shard root>/fashion-mnist
    python launch/make_shards.py --source fashion-mnist --shard-root /data/shards
    python launch/make_shards.py --source digits --out shards/digits --samples-per-shard 256
    python launch/make_shards.py --source folder:/data/imagenet --out shards/imagenet --name imagenet
    python launch/make_shards.py --source folder:/data/flowers --out shards/flowers --test-fraction 0.1
    python launch/make_shards.py --source 'tar:/data/other/*.tar' --out shards/reindexed
    python launch/make_shards.py --validate shards/fashion-mnist      # decode every sample, report bad ones

How splits are found:
    folder:PATH   PATH/train/<class>/* and PATH/val/<class>/* (or PATH/test/<class>/*) are the train and test
                  splits; without train/, PATH/<class>/* is all train, and --test-fraction F holds out F of
                  each class as test (without it the set has no test split, and a warning says so). A class is
                  one folder of images: images in sub-folders of a class folder, images outside any class
                  folder, and both val/ and test/ are refused, naming the folder, not merged or guessed.
                  Class ids follow the class-folder names: names of digits only by value (2 before 10) and
                  first, then the other names in text order.
    tar:GLOB      a file whose name contains "test" or "val" is test, every other file train.

Images: PNG and JPEG files are stored with their own bytes (--format keep); other formats and modes (CMYK,
16-bit, palette, alpha) are stored as 8-bit PNG. The manifest names the data set (--name), which a run's
data.dataset must equal.

Speed and resuming: --workers N processes (default: the usable cores, at most 8) each read, encode and write
whole shards; a progress bar shows files and shards done and files/s, and a closing line the rate. Killed or
interrupted, the same command run again keeps every shard already finished from the same source, seed,
--samples-per-shard, --format and --quality (each has a .done record) and writes the rest; shards whose inputs
changed are written again, so a changed command starts over by itself (docs/data.md, "Converting a large folder").

Where: --out DIR; without it, fashion-mnist and digits go to <shard root>/<source>, the shard root being
--shard-root, else $SCALE_REFINER_SHARD_ROOT, else shards/ of the source checkout the package runs from, else
~/.cache/scale-refiner/shards (an installed package writes nothing into site-packages).
"""
import argparse
import sys
import time
from pathlib import Path


from scale_refiner.data.shard_jobs import default_workers
from scale_refiner.data.shard_writer import check_source
from scale_refiner.data.shards import ShardError, load_manifest, make_shards, shard_root, validate_shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="fashion-mnist | digits | folder:PATH | tar:GLOB")
    p.add_argument("--out", help="output directory, e.g. shards/NAME (fashion-mnist, digits: default "
                                 "<shard root>/<source>)")
    p.add_argument("--shard-root", help="the shard root (default: $SCALE_REFINER_SHARD_ROOT, else shards/ of the "
                                        "source checkout, else ~/.cache/scale-refiner/shards)")
    p.add_argument("--samples-per-shard", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle written into the tars")
    p.add_argument("--format", default="keep", choices=["keep", "png", "jpg"],
                   help="keep (default): PNG and JPEG images keep their own bytes, others are stored as PNG "
                        "(lossless); png / jpg: every image stored in that format (re-encoded where it is not)")
    p.add_argument("--name", help="the data set's name in the manifest, which a run's data.dataset must equal "
                                  "(default: fashion-mnist / digits, the folder's name, the tars' directory's name)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--limit", type=int, default=0, help="keep the first N samples of each split (0 = all)")
    p.add_argument("--upscale", type=int, default=1, help="digits only: enlarge the 8x8 images by this factor")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="folder source without train/, val/ or test/: the fraction of each class held out as the "
                        "test split (a per-class draw seeded by --seed, recorded in the manifest)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip undecodable images, and keep what a truncated tar holds before its cut, listing "
                        "each in the manifest's 'skipped', instead of failing")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes that read, encode and write shards in parallel (default: the usable cores, "
                        "at most 8: %(default)s here)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (files, shards, files/s)")
    p.add_argument("--validate", metavar="SHARDS", help="validate an existing shard set and exit")
    a = p.parse_args(argv)
    try:
        if a.validate:
            shard_set = load_manifest(a.validate, verify="sha256")
            bad = 0
            for split in shard_set.manifest["splits"]:
                s = shard_set.split(split)
                report = validate_shards(s.tars, s.indexes, shard_set.num_classes)
                print(f"{split}: {report}")
                bad += len(report.bad)
            return 1 if bad else 0
        if not a.source:
            p.error("--source is required (or --validate SHARDS)")
        check_source(a.source)  # before --out: a bare path is told its folder: prefix
        if not a.out:
            if a.source not in ("fashion-mnist", "digits"):
                p.error(f"--out is required for --source {a.source}")
            a.out = str(shard_root(a.shard_root) / a.source)
        t0 = time.time()
        manifest = make_shards(a.source, a.out, a.samples_per_shard, a.seed, a.format, a.quality, a.limit,
                               a.skip_bad, a.upscale, a.test_fraction, log=print, name=a.name,
                               workers=a.workers, progress=not a.no_progress)
        print(f"wrote {manifest} in {time.time() - t0:.1f} s")
        return 0
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
