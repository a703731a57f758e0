"""Atomic checkpoint writes and output-directory checks.

A save goes to a temporary file in the same directory and is moved into place with ``os.replace`` (atomic
on POSIX), so a save killed half-way never replaces the last good file.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from scale_refiner.atomic import atomic_write, sha256_file


def atomic_save(obj, path: Path) -> None:
    with atomic_write(path) as handle:
        torch.save(obj, handle)


def check_out_dir(path: Path) -> None:
    """Create ``path`` and prove it writable before any work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise SystemExit(f"error: output directory {path} (config key 'run.out_dir') is not writable: {err}")


# ----------------------------------------------------------------------------------------------------------
# Training checkpoints: one directory per tag under <out_dir>/checkpoints, written atomically.
#
#   checkpoints/<tag>/          the engine's files (sharded), plus
#       client_rank<r>.pt       this rank's queues, RNG states
#       ema.pt                  the EMA as full tensors (refine stage)
#       model_state.pt          at the end of a stage: the full refiner state, what the next stage starts from
#       state.json              stage, step, data position, and the SHA-256 of every other file in the
#                               directory ("files"); written last inside the directory
#   checkpoints/latest          the tag of the newest complete checkpoint; moved last
#
# Everything is written into checkpoints/.tmp-<tag>, which rank 0 renames to <tag> once every rank is done
# (os.replace of a directory is atomic), and only then is `latest` replaced. A save killed at any point
# leaves the previous checkpoint and pointer untouched.
#
# Resuming verifies the hashes before anything is loaded: a changed, missing or foreign file (one the save did
# not write) is refused, naming it. Several of the files are pickles that DeepSpeed loads with
# weights_only=False, so a file swapped in after the save could run code on load; the check stops that,
# and any silent corruption, before the first byte is unpickled. Each rank hashes an equal share of the files.
# ----------------------------------------------------------------------------------------------------------
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

import torch.distributed as dist  # noqa: E402

import numpy as np  # noqa: E402


def rng_state() -> Dict:
    """Every RNG this process uses, as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointError(RuntimeError):
    """A checkpoint that must not be resumed from (changed, missing or foreign files); the message names them."""


class OutOfSpaceError(CheckpointError):
    """A checkpoint that could not be written for a full disk or quota; the message gives the space needed."""


def refuse_unsafe_pickles(files, allowed=()) -> None:
    """Load each ``torch.save`` file with ``weights_only=True`` (memory-mapped: the pickle is parsed, the tensor
    data is not read), ``allowed`` the classes besides tensors and plain containers it may hold. An engine calls
    this before handing the same files to a library that loads them with ``weights_only=False`` (DeepSpeed):
    a file that passes holds nothing that can run code when unpickled. Raises ``CheckpointError`` naming the
    file and what it holds."""
    import pickle
    for path in files:
        try:
            with torch.serialization.safe_globals(list(allowed)):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
            reason = str(err).strip().splitlines()
            found = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0])
            raise CheckpointError(f"{path}: refused, it holds more than weights and plain values ({found.strip()});"
                                  f" loading it could run code. Resume only from checkpoints this project "
                                  f"wrote") from None


class _RestrictedUnpickler:
    """``pickle.load`` that only reconstructs what ``allowed(module, name)`` accepts (find_class)."""

    def __init__(self, allowed):
        import pickle

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if "." in name or not allowed(module, name):  # a dotted name walks attributes: never
                    raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")
                return super().find_class(module, name)
        self.unpickler = Unpickler

    def load(self, path):
        with open(path, "rb") as handle:
            return self.unpickler(handle).load()


def refuse_unsafe_pickle(path, allowed) -> None:
    """A plain pickle (not ``torch.save``: e.g. torch.distributed.checkpoint's ``.metadata``, which DCP reads
    with ``pickle.load``) unpickled with only ``allowed(module, name)`` reconstructible; ``CheckpointError``
    naming the file otherwise."""
    import pickle
    try:
        _RestrictedUnpickler(allowed).load(path)
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: refused ({err}); loading it could run code. Resume only from "
                              f"checkpoints this project wrote") from None


def _out_of_space(err: Exception, directory: Path) -> bool:
    """Whether a failed write is a full disk or quota: ENOSPC / EDQUOT, or -- torch.save reports it as a
    RuntimeError ("unexpected pos ...", "iostream error", "file write failed") -- less than 64 MB left."""
    import errno
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(directory).free < 64 * 2 ** 20
    except OSError:
        return False


def _tree_bytes(directory: Optional[Path]) -> int:
    """Bytes of the files under ``directory`` (0 if it is gone)."""
    if directory is None or not Path(directory).exists():
        return 0
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def _checkpoint_files(directory: Path) -> List[str]:
    """Every file under ``directory`` but state.json, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.relative_to(directory).as_posix() != "state.json")


class CheckpointDir:
    def __init__(self, out_dir: Path, ctx, keep: int = 2, verify: bool = True):
        self.root = Path(out_dir) / "checkpoints"
        self.ctx = ctx
        self.keep = keep
        self.verify = verify  # False: resume from a checkpoint without checking its files (run.verify_checkpoint)

    def latest(self) -> Optional[Path]:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"checkpoint pointer {pointer} names {path}, which is incomplete or missing")
        return path

    def resume_point(self, resume: str) -> Optional[Path]:
        """Where ``run.resume`` says to continue from: ``none`` -> None, ``auto`` -> the newest complete
        checkpoint (None if there is none), a path -> that checkpoint directory, which must be complete."""
        if resume == "none":
            return None
        if resume == "auto":
            path = self.latest()
        else:
            path = Path(resume)
            if not (path / "state.json").is_file():
                raise FileNotFoundError(f"config key 'run.resume': {path} is not a complete checkpoint directory")
        if path is not None and self.verify:
            self.check_files(path)
        return path

    # ------------------------------------------------------------------------------------------- hashes
    def _hash_share(self, directory: Path, names: List[str]) -> Dict[str, str]:
        """SHA-256 of this rank's share of ``names`` (every world-th file); all shares, on every rank."""
        mine = {n: sha256_file(directory / n) for n in names[self.ctx.rank::self.ctx.world]}
        if self.ctx.world == 1:
            return mine
        shares = [None] * self.ctx.world
        dist.all_gather_object(shares, mine)
        return {k: v for share in shares for k, v in share.items()}

    def check_files(self, path: Path) -> None:
        """Collective. Refuse ``path`` unless its files are exactly those its save hashed, with those hashes."""
        path = Path(path)
        recorded = self.read_state(path).get("files")
        if recorded is None:
            raise CheckpointError(f"checkpoint {path} records no file hashes (written by an older version): its "
                                  f"files cannot be checked before loading; if you trust it, resume with "
                                  f"run.verify_checkpoint=false")
        present = _checkpoint_files(path)
        problems = [f"{n}: not written by the save (foreign file)" for n in present if n not in recorded]
        problems += [f"{n}: missing" for n in recorded if n not in present]
        found = self._hash_share(path, [n for n in present if n in recorded])
        problems += [f"{n}: changed since the save (sha256 {found[n][:12]}..., recorded {recorded[n][:12]}...)"
                     for n in sorted(found) if found[n] != recorded[n]]
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise CheckpointError(f"checkpoint {path} does not match what was saved, refusing to load it: {shown}")

    def save(self, tag: str, engine, state: Dict, client: Dict, ema=None, model_state: Optional[Dict] = None) -> Path:
        """Collective. ``client`` is this rank's own state (queues, RNG); ``state`` is shared (JSON).
        A full disk (or quota) raises ``CheckpointError`` saying so, with the space a checkpoint needs, after
        removing the partial ``.tmp-<tag>``: the previous checkpoint and ``latest`` are untouched."""
        tmp = self.root / f".tmp-{tag}"
        try:
            return self._save(tmp, tag, engine, state, client, ema, model_state)
        except (OSError, RuntimeError) as err:
            if not _out_of_space(err, self.root):
                raise
            from scale_refiner.atomic import format_bytes
            written = _tree_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)  # the space it held, back (any rank: same directory)
            previous = self.latest() if (self.root / "latest").is_file() else None
            need = _tree_bytes(previous) if previous is not None else written
            free = shutil.disk_usage(self.root).free
            raise OutOfSpaceError(f"no space left on the device of {self.root} while writing checkpoint {tag} "
                                  f"(rank {self.ctx.rank}: {getattr(err, 'strerror', None) or err}); a checkpoint "
                                  f"of this run needs "
                                  f"about {format_bytes(need)}"
                                  f"{' (the size of ' + previous.name + ')' if previous is not None else ''}, "
                                  f"{format_bytes(free)} are free; the partial checkpoint was removed and "
                                  f"checkpoints/latest still names the last complete one") from None

    def _save(self, tmp: Path, tag: str, engine, state: Dict, client: Dict, ema, model_state) -> Path:
        if self.ctx.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)  # left over from a killed save
            tmp.mkdir(parents=True)
        self.ctx.barrier()
        engine.save(tmp)
        atomic_save(client, tmp / f"client_rank{self.ctx.rank}.pt")
        ema_state = ema.full_state() if ema is not None else None  # collective
        if self.ctx.is_main:
            if ema_state is not None:
                atomic_save(ema_state, tmp / "ema.pt")
            if model_state is not None:
                atomic_save(model_state, tmp / "model_state.pt")
        self.ctx.barrier()  # every file is written: hash them, each rank a share
        files = self._hash_share(tmp, _checkpoint_files(tmp))
        if self.ctx.is_main:
            (tmp / "state.json").write_text(json.dumps(dict(state, world_size=self.ctx.world, files=files),
                                                       indent=2))
        self.ctx.barrier()
        final = self.root / tag
        if self.ctx.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.root / ".latest.tmp"
            pointer_tmp.write_text(tag)
            os.replace(pointer_tmp, self.root / "latest")
            self._prune(keep_tag=tag)
        self.ctx.barrier()
        return final

    def _prune(self, keep_tag: str) -> None:
        """Drop periodic checkpoints beyond the newest ``keep``; stage ends (tags ending -end) stay."""
        periodic = sorted(p for p in self.root.iterdir()
                          if p.is_dir() and not p.name.startswith(".") and not p.name.endswith("-end"))
        for old in periodic[:-self.keep] if self.keep else []:
            if old.name != keep_tag:
                shutil.rmtree(old)

    @staticmethod
    def read_state(path: Path) -> Dict:
        return json.loads((Path(path) / "state.json").read_text())

    def load_client(self, path: Path) -> Dict:
        saved_world = self.read_state(path).get("world_size")
        if saved_world != self.ctx.world:
            raise ValueError(f"checkpoint {path} was written by {saved_world} ranks and this run has "
                             f"{self.ctx.world}: resuming at another world size is not supported (the data "
                             f"order and RNG streams are per rank); relaunch with {saved_world} ranks")
        return torch.load(Path(path) / f"client_rank{self.ctx.rank}.pt", map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------
# Reading what a checkpoint holds, for everything outside the engines: the next stage, the final k-NN and
# exports, MAE's weights file, evaluation. Weights-only always; memory-mapped by default, so the ranks of a node
# share one page-cache copy instead of holding one each.
# ----------------------------------------------------------------------------------------------------------
ENCODER_PREFIX = "encoder."


def _load_weights_only(path: Path, mmap: bool) -> Dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file gets one message naming it
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def read_model_state(point: Path, mmap: bool = True) -> Dict:
    """The full model state of a stage-end checkpoint (``model_state.pt``: the refiner's or the MAE's)."""
    path = Path(point) / "model_state.pt"
    if not path.is_file():
        raise CheckpointError(f"{point} holds no model_state.pt (only stage-end checkpoints hold the full state; "
                              f"pass a '*-end' checkpoint or the run directory)")
    return _load_weights_only(path, mmap)


def read_ema(point: Path, mmap: bool = True) -> Optional[Dict]:
    """The EMA of the trainable encoder parameters (``ema.pt``, refine stage on), or None where there is none."""
    path = Path(point) / "ema.pt"
    return _load_weights_only(path, mmap) if path.is_file() else None


def encoder_state(point: Path, which: str = "online", mmap: bool = True) -> Dict:
    """The encoder's full state dict (keys without ``encoder.``) of a stage-end checkpoint. ``which``: ``online``,
    or ``ema`` -- the EMA laid over the online encoder (frozen parameters and buffers do not change, so they come
    from the online state)."""
    if which not in ("online", "ema"):
        raise ValueError(f"which must be online or ema, got {which!r}")
    full = read_model_state(point, mmap)
    state = {k[len(ENCODER_PREFIX):]: v for k, v in full.items() if k.startswith(ENCODER_PREFIX)}
    if not state:
        raise CheckpointError(f"{Path(point) / 'model_state.pt'} has no '{ENCODER_PREFIX}*' keys (is it a "
                              f"refiner state?)")
    if which == "ema":
        ema = read_ema(point, mmap)
        if ema is None:
            raise CheckpointError(f"{point} has no ema.pt (the EMA exists from the refine stage on); "
                                  f"use --encoder online")
        unknown = sorted(k for k in ema if k not in state)
        if unknown:
            raise CheckpointError(f"{Path(point) / 'ema.pt'}: EMA keys not in the encoder of model_state.pt "
                                  f"({len(unknown)}): " + ", ".join(unknown))
        state.update(ema)
    return state
