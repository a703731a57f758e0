"""NVIDIA DALI decoding of webdataset shards into BYOL multi-crop views (GPU "mixed" decoding, or all-CPU).

The same views as :class:`scale_refiner.data.augment.MultiCropAugment` (the BYOL multi-crop of docs/data.md), in DALI ops:

    op                       DALI                                           g1    g2    local
    decode                   decoders.image (mixed on GPU, cpu otherwise), RGB
    RandomResizedCrop        random_resized_crop (cubic, antialias)         global size/scale   local size/scale
    colour jitter p .8       color_twist; factors drawn per sample, identity where the coin says no
    greyscale p .2           the same color_twist with saturation 0 (Y = .299 R + .587 G + .114 B, 3 channels)
    Gaussian blur            gaussian_blur, sigma U(.1, 2) where the coin     1.0   0.1   0.5
                             says yes, else 1e-3 (a delta kernel: exact identity)
    solarize p .2            x + [x >= 128] * coin * (255 - 2x)              0     0.2   0
    flip p .5, normalise     crop_mirror_normalize(mirror=coin, ImageNet mean/std, float CHW)

DALI has no RandomApply, so every coin is a per-sample ``fn.random.coin_flip`` folded into the op's arguments
(identity factors, a delta blur kernel, a 0/1 solarize mask): no conditional execution, every sample takes
the same graph. Differences from the torchvision reference, none of which changes the distribution of the
method's views in a way that matters: the jitter's four sub-ops are one colour matrix in a fixed order
(torchvision permutes the order and clamps after each); DALI's contrast pivots on mid-grey, torchvision's on the
image mean; the flip comes last (it commutes with every other op); the blur kernel is the same size as the
reference's (:func:`blur_kernel_size`).

Sharding and epochs: the reader splits the samples of all tars into ``num_shards`` contiguous ranges
(``shard_id`` = rank) and, with ``stick_to_shard=False``, moves every rank to the next range each epoch.
``random_shuffle`` shuffles within a buffer of ``initial_fill`` samples, which is why make_shards writes the tars
already shuffled. In training mode (``drop_last``) every rank yields exactly ``steps_per_epoch`` =
``(num_samples // world) // batch_size`` batches, so ranks stay in lock-step and no sample appears twice in an
epoch; in exact mode (evaluation) every sample is yielded exactly once per epoch across ranks (the padded
samples of the last batch are trimmed).

Checkpointing: pipelines are built with ``enable_checkpointing=True``; :meth:`DaliMultiCropLoader.state_dict`
saves the reader position and every random op's RNG state, and a loader built with that state continues with
exactly the batches the original would have produced.

Bad input (what DALI does, measured with nvidia-dali 2.4 on CPU; see tests/test_dali.py): a corrupt image or a
sample missing its label makes DALI raise inside ``run()``; the error is re-raised here as :class:`DaliDataError`
naming the shard and key, which DALI reports in the sample's source info (``<tar>:<key>``) where it can.
DALI cannot skip such a sample and keep going, so make_shards writes only 8-bit RGB/L PNG/JPEG and
:func:`scale_refiner.data.shards.validate_shards` (``launch/make_shards.py --validate``) checks foreign shards
ahead of training. A truncated tar fails at pipeline build (its index points past the end of the file).
"""
from __future__ import annotations

import base64
import re
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from scale_refiner.data.augment import BLUR_SIGMA, IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size

try:  # DALI is optional: the torch reference pipeline (wds_pipeline) is the fallback
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    HAVE_DALI = True
except ImportError:  # pragma: no cover - exercised only where DALI is not installed
    HAVE_DALI = False

READER = "reader"
IMAGE_EXT = "png;jpg;jpeg"
NUM_PAD = 24  # ASCII digits of .cls / .idx are padded to this many bytes and parsed in torch
FLAG_NAMES = ("flip", "jitter", "grayscale", "blur", "solarize")
_MEAN255 = [m * 255.0 for m in IMAGENET_MEAN]
_STD255 = [s * 255.0 for s in IMAGENET_STD]
_NO_BLUR_SIGMA = 1e-3  # exp(-1 / (2 sigma^2)) underflows to 0: the kernel is a delta, the blur an identity


class DaliDataError(RuntimeError):
    """DALI failed on a sample; the message names the shard and key where DALI reports them."""


def dali_available() -> bool:
    return HAVE_DALI


def gpu_available() -> bool:
    return torch.cuda.is_available()


def _resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        raise RuntimeError("DALI device 'gpu' requested but torch sees no CUDA device")
    return device


def _check_inputs(tars: Sequence[str], indexes: Sequence[str]) -> None:
    if not HAVE_DALI:
        raise ImportError("nvidia-dali is not installed (pip install nvidia-dali-cuda120); use the webdataset "
                          "reference pipeline (scale_refiner.data.wds_pipeline) instead")
    if not tars:
        raise ValueError("DALI pipeline: empty shard list")
    if len(tars) != len(indexes):
        raise ValueError(f"DALI pipeline: {len(tars)} tars but {len(indexes)} index files")


def parse_ascii_ints(padded: torch.Tensor) -> torch.Tensor:
    """[B, L] uint8 rows of ASCII decimal digits, zero padded on the right -> int64 [B].

    Raises ValueError for a row with a non-digit byte or no digit at all (an empty ``.cls``)."""
    x = padded.to(torch.int64)
    present = x != 0
    digits = x - 48
    if bool(((digits < 0) | (digits > 9))[present].any()) or bool((present.sum(1) == 0).any()):
        raise ValueError("a .cls/.idx component is empty or not an ASCII decimal number")
    n = present.sum(1, keepdim=True)
    pos = torch.arange(x.shape[1]).unsqueeze(0)
    exponent = (n - 1 - pos).clamp(min=0)
    return torch.where(present, digits * torch.pow(10, exponent), torch.zeros_like(x)).sum(1)


def _reader(tars, indexes, shard_id, num_shards, shuffle, initial_fill, seed, pad_last_batch):
    img, cls, idx = fn.readers.webdataset(
        paths=list(tars), index_paths=list(indexes), ext=[IMAGE_EXT, "cls", "idx"],
        missing_component_behavior="error", random_shuffle=shuffle, initial_fill=initial_fill,
        shard_id=shard_id, num_shards=num_shards, pad_last_batch=pad_last_batch, stick_to_shard=False,
        seed=seed, name=READER)
    cls = fn.pad(cls, axes=[0], shape=[NUM_PAD], fill_value=0)
    idx = fn.pad(idx, axes=[0], shape=[NUM_PAD], fill_value=0)
    return img, cls, idx


def _decode(img, device: str):
    return fn.decoders.image(img, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)


def _view(image, device: str, size: int, scale: Sequence[float], color: bool, blur_p: float, solarize_p: float,
          normalize: bool):
    """One augmented view of each decoded image (uint8 HWC) as float CHW; also the per-sample coins."""
    x = fn.random_resized_crop(image, size=[size, size], random_area=list(scale),
                               random_aspect_ratio=[3.0 / 4.0, 4.0 / 3.0], interp_type=types.INTERP_CUBIC,
                               antialias=True, num_attempts=10)
    flip = fn.random.coin_flip(probability=0.5, dtype=types.INT32)
    zero = fn.random.coin_flip(probability=0.0, dtype=types.INT32)
    jitter = grey = blur = solar = zero
    if color:
        jitter = fn.random.coin_flip(probability=0.8, dtype=types.INT32)
        grey = fn.random.coin_flip(probability=0.2, dtype=types.INT32)
        j = fn.cast(jitter, dtype=types.FLOAT)
        g = fn.cast(grey, dtype=types.FLOAT)
        brightness = 1.0 + j * fn.random.uniform(range=[-0.4, 0.4])
        contrast = 1.0 + j * fn.random.uniform(range=[-0.4, 0.4])
        saturation = (1.0 + j * fn.random.uniform(range=[-0.2, 0.2])) * (1.0 - g)
        hue = j * fn.random.uniform(range=[-0.1 * 360.0, 0.1 * 360.0])  # torchvision's 0.1 of a turn, degrees
        x = fn.color_twist(x, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        if blur_p > 0:
            blur = fn.random.coin_flip(probability=blur_p, dtype=types.INT32)
            b = fn.cast(blur, dtype=types.FLOAT)
            sigma = b * fn.random.uniform(range=list(BLUR_SIGMA)) + (1.0 - b) * _NO_BLUR_SIGMA
            x = fn.gaussian_blur(x, window_size=blur_kernel_size(size), sigma=sigma)
        if solarize_p > 0:
            solar = fn.random.coin_flip(probability=solarize_p, dtype=types.INT32)
            s = fn.cast(solar, dtype=types.FLOAT)
            xf = fn.cast(x, dtype=types.FLOAT)
            s = s.gpu() if device == "gpu" else s
            x = xf + (xf >= 128.0) * s * (255.0 - 2.0 * xf)  # = 255 - x where solarized and x >= 128
    mean, std = (_MEAN255, _STD255) if normalize else ([0.0, 0.0, 0.0], [255.0, 255.0, 255.0])
    x = fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std, mirror=flip)
    flags = fn.stack(flip, jitter, grey, blur, solar)
    return x, flags


def build_multicrop_pipeline(tars: Sequence[str], indexes: Sequence[str], batch_size: int, *, shard_id: int = 0,
                             num_shards: int = 1, global_size: int = 224, global_scale=(0.25, 1.0),
                             local_size: int = 96, local_scale=(0.05, 0.25), num_local: int = 10,
                             color: bool = True, normalize: bool = True, shuffle: bool = True,
                             initial_fill: int = 1024, seed: int = 0, num_threads: int = 2, device: str = "auto",
                             prefetch: int = 2, checkpoint: Optional[str] = None, with_flags: bool = False):
    """The DALI training pipeline; outputs ``g1, g2, l1..lN, cls, idx`` (and one flags output per view)."""
    _check_inputs(tars, indexes)
    device = _resolve_device(device)
    specs = [("g", 1.0, 0.0), ("g", 0.1, 0.2)] + [("l", 0.5, 0.0)] * num_local

    @pipeline_def(enable_checkpointing=True)
    def multicrop():
        img, cls, idx = _reader(tars, indexes, shard_id, num_shards, shuffle, initial_fill, seed, True)
        image = _decode(img, device)
        views, flags = [], []
        for kind, blur_p, solarize_p in specs:
            size, scale = (global_size, global_scale) if kind == "g" else (local_size, local_scale)
            v, f = _view(image, device, size, scale, color, blur_p, solarize_p, normalize)
            views.append(v)
            flags.append(f)
        return (*views, cls, idx, *(flags if with_flags else []))

    kwargs = dict(batch_size=batch_size, num_threads=num_threads, seed=seed + 7919 * shard_id,
                  device_id=torch.cuda.current_device() if device == "gpu" else None,
                  prefetch_queue_depth=prefetch, exec_dynamic=True)
    if checkpoint is not None:
        kwargs["checkpoint"] = checkpoint
    pipe = multicrop(**kwargs)
    pipe.build()
    return pipe


def build_eval_pipeline(tars: Sequence[str], indexes: Sequence[str], batch_size: int, *, shard_id: int = 0,
                        num_shards: int = 1, resize: int = 224, crop: int = 224, normalize: bool = True,
                        num_threads: int = 2, device: str = "auto", prefetch: int = 2):
    """Evaluation: shorter side resized to ``resize`` (cubic, antialias), centre crop ``crop``, normalised CHW."""
    _check_inputs(tars, indexes)
    if crop > resize:
        raise ValueError(f"crop {crop} is larger than the resize size {resize}")
    device = _resolve_device(device)

    @pipeline_def(enable_checkpointing=True)
    def evaluation():
        img, cls, idx = _reader(tars, indexes, shard_id, num_shards, False, 1, 0, True)
        x = fn.resize(_decode(img, device), resize_shorter=resize, interp_type=types.INTERP_CUBIC, antialias=True)
        mean, std = (_MEAN255, _STD255) if normalize else ([0.0, 0.0, 0.0], [255.0, 255.0, 255.0])
        x = fn.crop_mirror_normalize(x, crop=[crop, crop], dtype=types.FLOAT, output_layout="CHW",
                                     mean=mean, std=std)
        return x, cls, idx

    pipe = evaluation(batch_size=batch_size, num_threads=num_threads, seed=0,
                      device_id=torch.cuda.current_device() if device == "gpu" else None,
                      prefetch_queue_depth=prefetch, exec_dynamic=True)
    pipe.build()
    return pipe


_INDEX_LINE_RE = re.compile(r'index file at "([^"]+)" line (\d+)')


def _key_at_index_line(index_path: str, line_no: int) -> Optional[str]:
    """The sample key DALI means by "line ``line_no``" of an index file: it counts lines from 0 (the header
    ``v1.2 N``), so line n is the n-th sample (checked against a sample missing its .cls and a truncated tar)."""
    try:
        with open(index_path) as f:
            for i, line in enumerate(f, 1):
                if i == line_no + 1:
                    toks = line.split()
                    return toks[3].split(".", 1)[0] if len(toks) >= 4 else None
    except OSError:
        return None
    return None


def _find_bad_samples(tars: Sequence[str], limit: int = 5) -> List[str]:
    """Scan ``tars`` with PIL for the samples DALI cannot decode (DALI's decoder errors name no sample)."""
    from scale_refiner.data.shard_format import IMAGE_EXTS, ShardError, check_image_bytes, iter_tar_samples
    bad = []
    for t in tars:
        try:
            for key, parts in iter_tar_samples(t):
                img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                why = "no image component" if img is None else check_image_bytes(img)
                if why and not why.startswith("mode"):  # DALI decodes CMYK / 16-bit itself
                    bad.append(f"shard {t}, key {key!r}: {why}")
                    if len(bad) >= limit:
                        return bad
        except ShardError as e:
            bad.append(str(e))
    return bad


def _data_error(err: Exception, tars: Sequence[str], indexes: Sequence[str] = (),
                diagnose: bool = True) -> DaliDataError:
    """A DALI failure as DaliDataError naming the shard and key.

    DALI names the index file and line for reader errors (a sample missing a component, an index pointing past
    the end of a truncated tar): mapped here to the tar and the key on that line. Decoder errors name nothing
    (``nvImageCodec failure``), so with ``diagnose`` the shards are scanned with PIL to find the bad samples.
    """
    msg = str(err)
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    detail = next((line for line in lines if any(w in line for w in ("failure", "Assert", "detected",
                                                                     "rror:", "not found", "Malformed"))),
                  lines[-1] if lines else "")
    where = None
    m = _INDEX_LINE_RE.search(msg)
    if m:
        index_path, line_no = m.group(1), int(m.group(2))
        tar = dict(zip(indexes, tars)).get(index_path, index_path)
        key = _key_at_index_line(index_path, line_no)
        where = f"shard {tar}, key {key!r} (index {index_path} line {line_no})"
    elif "decoders" in msg and diagnose:
        bad = _find_bad_samples(tars)
        if bad:
            where = "; ".join(bad)
    if where is None:
        where = f"one of the shards {list(tars)[:4]}{' ...' if len(tars) > 4 else ''} (DALI named no sample)"
    return DaliDataError(f"DALI failed on {where}: {detail[:400]}\n(validate the shards with "
                         f"`python launch/make_shards.py --validate DIR`)")


class DaliMultiCropLoader:
    """Iterates collated multi-crop batches from DALI for one rank.

    Each batch: ``{"global": [2, B, 3, Hg, Wg], "local": [N, B, 3, Hl, Wl], "label": [B], "index": [B]}`` (and
    ``"flags"``: [V, B, 5] int, columns :data:`FLAG_NAMES`, when ``with_flags``), float32 views (CUDA tensors
    when decoding on the GPU, CPU tensors otherwise), int64 labels and dataset indices on the CPU.

    ``num_samples`` is the split's sample count (manifest). ``drop_last=True`` (training): every rank yields
    ``steps_per_epoch = (num_samples // num_shards) // batch_size`` full batches per epoch. ``drop_last=False``:
    each sample exactly once per epoch across ranks, the last batch of a rank possibly short.
    """

    def __init__(self, tars: Sequence[str], indexes: Sequence[str], num_samples: int, batch_size: int, *,
                 rank: int = 0, world: int = 1, drop_last: bool = True, state: Optional[Dict] = None,
                 max_steps_per_epoch: int = 0, **pipeline_kwargs):
        if not tars:
            raise ValueError("DaliMultiCropLoader: empty shard list")
        self.tars, self.indexes = list(tars), list(indexes)
        self.batch_size, self.rank, self.world, self.drop_last = batch_size, rank, world, drop_last
        self.num_local = int(pipeline_kwargs.get("num_local", 10))
        self.local_size = int(pipeline_kwargs.get("local_size", 96))
        self.with_flags = bool(pipeline_kwargs.get("with_flags", False))
        self.num_samples = int(num_samples)
        if self.num_samples // world < 1:
            raise ValueError(f"{num_samples} samples cannot be split over {world} ranks")
        self.steps_per_epoch = (self.num_samples // world) // batch_size if drop_last else None
        if drop_last and self.steps_per_epoch == 0:
            raise ValueError(f"{num_samples} samples over {world} ranks do not fill one batch of {batch_size}")
        # A cap (tiny runs, data.samples_per_epoch): an "epoch" is then the next max_steps batches of the reader's
        # stream, which runs on across DALI's own epoch boundaries instead of reading to the end of the shard.
        self.capped = bool(max_steps_per_epoch) and (self.steps_per_epoch is None
                                                      or max_steps_per_epoch < self.steps_per_epoch)
        if self.capped:
            self.steps_per_epoch = int(max_steps_per_epoch)
        checkpoint = None
        self.epoch, self.step = 0, 0
        if state is not None:
            checkpoint = base64.b64decode(state["dali"])
            self.epoch, self.step = int(state["epoch"]), int(state["step"])
        try:
            self.pipe = build_multicrop_pipeline(self.tars, self.indexes, batch_size, shard_id=rank,
                                                 num_shards=world, checkpoint=checkpoint, **pipeline_kwargs)
        except RuntimeError as e:
            raise _data_error(e, self.tars, self.indexes) from e
        size = self.pipe.reader_meta(READER)["epoch_size"]
        if size != self.num_samples:
            raise ValueError(f"the DALI reader sees {size} samples in {len(self.tars)} shards, the manifest says "
                             f"{self.num_samples}: an index file is stale (rewrite it with wds2idx)")
        n_views = 2 + self.num_local
        self.output_map = [f"v{i}" for i in range(n_views)] + ["cls", "idx"]
        if self.with_flags:
            self.output_map += [f"f{i}" for i in range(n_views)]
        self._it = DALIGenericIterator(
            [self.pipe], self.output_map, reader_name=READER, auto_reset=False, prepare_first_batch=False,
            last_batch_padded=False,
            last_batch_policy=LastBatchPolicy.DROP if drop_last else LastBatchPolicy.PARTIAL)

    def __len__(self) -> int:
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        shard = self.pipe.reader_meta(READER)
        n = shard.get("epoch_size", self.num_samples)
        start, end = (self.rank * n) // self.world, ((self.rank + 1) * n) // self.world
        return -(-(end - start) // self.batch_size)

    def state_dict(self) -> Dict:
        """Reader position + RNG states (DALI checkpoint) and the epoch/step counters; JSON-serialisable."""
        cpt = self._it.checkpoints()[0]
        cpt = cpt.encode() if isinstance(cpt, str) else bytes(cpt)
        return {"dali": base64.b64encode(cpt).decode("ascii"), "epoch": self.epoch, "step": self.step}

    def _next(self) -> Optional[Dict[str, torch.Tensor]]:
        try:
            out = next(self._it)[0]
        except StopIteration:
            return None
        except RuntimeError as e:
            raise _data_error(e, self.tars, self.indexes) from e
        views = [out[f"v{i}"] for i in range(2 + self.num_local)]
        glob = torch.stack(views[:2])
        if self.num_local:
            local = torch.stack(views[2:])
        else:
            local = glob.new_empty((0, glob.shape[1], 3, self.local_size, self.local_size))
        batch = {"global": glob, "local": local, "label": parse_ascii_ints(out["cls"].cpu()),
                 "index": parse_ascii_ints(out["idx"].cpu())}
        if self.with_flags:
            batch["flags"] = torch.stack([out[f"f{i}"].cpu() for i in range(2 + self.num_local)])
        return batch

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        """One epoch (continuing the current one after a restore)."""
        while self.steps_per_epoch is None or self.step < self.steps_per_epoch:
            batch = self._next()
            if batch is None:
                if self.capped:
                    self._it.reset()
                    continue
                break
            self.step += 1
            yield batch
        if self.capped:
            self.epoch, self.step = self.epoch + 1, 0
            return
        # Drain what DALI still holds of this epoch (at most one batch in drop_last mode), then rewind.
        while self._next() is not None:
            pass
        self._it.reset()
        self.epoch, self.step = self.epoch + 1, 0


class DaliEvalLoader:
    """Evaluation batches ``(images [B, 3, S, S], labels [B], indices [B])``; every sample of the split exactly
    once across ranks, in shard order."""

    def __init__(self, tars: Sequence[str], indexes: Sequence[str], batch_size: int, *, rank: int = 0,
                 world: int = 1, **pipeline_kwargs):
        self.tars, self.indexes = list(tars), list(indexes)
        try:
            self.pipe = build_eval_pipeline(self.tars, indexes, batch_size, shard_id=rank, num_shards=world,
                                            **pipeline_kwargs)
        except RuntimeError as e:
            raise _data_error(e, self.tars, self.indexes) from e
        self._it = DALIGenericIterator([self.pipe], ["x", "cls", "idx"], reader_name=READER, auto_reset=True,
                                       last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=False)

    def __iter__(self):
        while True:
            try:
                out = next(self._it)[0]
            except StopIteration:
                return
            except RuntimeError as e:
                raise _data_error(e, self.tars, self.indexes) from e
            yield out["x"], parse_ascii_ints(out["cls"].cpu()), parse_ascii_ints(out["idx"].cpu())
