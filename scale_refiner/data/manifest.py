"""Reading a shard set: its manifest, checked against the files (SHA-256, size or existence), and the validation
of shards written by other tools (``validate_shards``)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from scale_refiner.atomic import sha256_file
from scale_refiner.data.shard_format import (FORMAT_NAME, FORMAT_VERSION, IMAGE_EXTS, MANIFEST, PathLike,
                                             ShardError, check_image_bytes, index_entries, iter_tar_samples,
                                             read_index_file)


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
    def dataset(self) -> str:
        """The data set's name: the manifest's ``dataset``; for a manifest written before it was recorded, the
        built-in source's name, the source folder's, else the shard directory's."""
        return dataset_name(self.manifest, self.root)

    def split(self, name: str) -> ShardSplit:
        splits = self.manifest["splits"]
        if name not in splits:
            raise ShardError(f"{self.root / MANIFEST}: no split {name!r} (has {sorted(splits)})")
        s = splits[name]
        return ShardSplit(name, [str(self.root / r["tar"]) for r in s["shards"]],
                          [str(self.root / r["index"]) for r in s["shards"]],
                          [int(r["num_samples"]) for r in s["shards"]], int(s["num_samples"]),
                          list(s.get("class_counts", [])))


def dataset_name(manifest: Dict, root: Path) -> str:
    if manifest.get("dataset"):
        return str(manifest["dataset"])
    source = str(manifest.get("source", ""))
    if source in ("fashion-mnist", "digits"):
        return source
    if source.startswith("folder:"):
        return Path(source[len("folder:"):]).name or Path(root).name
    return Path(root).resolve().name


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
