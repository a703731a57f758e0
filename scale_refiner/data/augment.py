"""Reference torch multi-crop augmentation (BYOL settings, multi-crop), collate and an in-memory dataset.

Views, in order ``[g1, g2, l1 .. lN]`` (BYOL's asymmetric global views plus DINO-style local crops):

    op                                  g1     g2     local
    RandomResizedCrop (bicubic, AA)     global size / scale  local size / scale
    horizontal flip                     0.5    0.5    0.5
    colour jitter (0.4, 0.4, 0.2, 0.1)  0.8    0.8    0.8
    greyscale (3 channels kept)         0.2    0.2    0.2
    Gaussian blur (sigma 0.1 .. 2.0)    1.0    0.1    0.5
    solarize (>= 0.5 inverted)          0      0.2    0

``color=False`` is the low-shot ablation: crop and flip only.

Pipeline: the crop runs on the uint8 image (bicubic with antialias; uint8 output rounds and clamps bicubic
overshoot, so every later value lies in [0, 1]); the image is then converted to float in [0, 1] and the colour
ops run in float, which avoids re-quantising to uint8 after each of the jitter's four sub-ops. Solarize in
float uses threshold 0.5, which inverts exactly the uint8 values >= 128. Finally ImageNet mean/std
normalisation (optional, so tests can inspect the [0, 1] views).

Randomness: every random choice comes from torch's global RNG, both the coin flips made here and the
parameters torchvision v2 draws (crop box, jitter factors and order, blur sigma). Nothing uses ``random`` or
numpy, so ``torch.manual_seed`` fixes the views, and in a DataLoader each worker is already distinct and
reproducible: the loader seeds torch in worker ``w`` with ``base_seed + w``, where ``base_seed`` is drawn from
the main process's RNG (or the loader's ``generator``). No ``worker_init_fn`` is needed; the stream does
depend on ``num_workers``.

The coin flips are made explicitly (not with ``v2.RandomApply``) so :meth:`MultiCropAugment.sample` can report
which ops each view received; training uses ``__call__``, which returns only the views.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# BYOL's colour settings.
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
JITTER_P = 0.8
GRAYSCALE_P = 0.2
FLIP_P = 0.5
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 0.5  # on [0, 1] floats; equals 128 on uint8

ImageLike = Union[Image.Image, torch.Tensor]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's views: a function of (run seed, epoch, dataset index) only, so the views do not
    depend on the process, worker, rank layout or resume point that draws them."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + int(index)


def blur_kernel_size(crop_size: int) -> int:
    """Gaussian kernel about 10% of the crop, odd, at least 3.

    At 224 this gives BYOL's 23 (96 -> 11, 98 -> 11). Tiny crops (the CPU demo's 32 and 16 px) get the floor
    of 3, the smallest odd kernel that blurs at all. Sigma keeps BYOL's 0.1..2.0 px, but the kernel truncates
    the Gaussian at +-(k // 2) px, so on a 3-tap kernel any sigma above about 1 acts like a 3-px near-box
    average. That is the intended reading of "10% of the crop": the kernel, not sigma, bounds the blur to a
    fixed fraction of the crop, so a 16-px crop is not smeared to a flat patch by sigma 2 (which alone would
    be 12% of its width against under 1% at 224).
    """
    return max(3, round(0.1 * crop_size)) | 1


def to_rgb_uint8(img: ImageLike) -> torch.Tensor:
    """A PIL image or uint8 tensor ([H, W] or [C, H, W], C in 1 or 3) as a uint8 [3, H, W] tensor."""
    if isinstance(img, Image.Image):
        return F.pil_to_tensor(img.convert("RGB"))
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"expected a PIL image or a uint8 tensor, got {type(img).__name__}")
    if img.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor, got {img.dtype}")
    if img.ndim == 2:
        img = img.unsqueeze(0)
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected a [H, W], [1, H, W] or [3, H, W] tensor, got shape {tuple(img.shape)}")
    # Greyscale inputs (Fashion-MNIST) become 3 equal channels so the colour ops and the RGB model see RGB.
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img


def _coin(p: float) -> bool:
    """True with probability p, drawn from torch's global RNG (no draw for p of 0 or 1)."""
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    return bool(torch.rand(()) < p)


@dataclass(frozen=True)
class ViewSpec:
    """What differs between the view kinds: which crop, and the blur and solarize probabilities."""
    kind: str  # "global" or "local"
    blur_p: float
    solarize_p: float


def _check_scale(name: str, scale: Sequence[float]) -> Tuple[float, float]:
    lo, hi = (float(s) for s in scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {list(scale)}")
    return lo, hi


class MultiCropAugment:
    """BYOL-style multi-crop views ``[g1, g2, l1 .. l{num_local}]`` of one image, as float [3, S, S] tensors.

    ``normalize=False`` returns the views in [0, 1] before the ImageNet normalisation (for inspection/tests).
    """

    def __init__(self, global_size: int = 224, global_scale: Sequence[float] = (0.25, 1.0),
                 local_size: int = 96, local_scale: Sequence[float] = (0.05, 0.25), num_local: int = 10,
                 color: bool = True, normalize: bool = True):
        if global_size < 1 or local_size < 1:
            raise ValueError(f"crop sizes must be positive, got global {global_size}, local {local_size}")
        if num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {num_local}")
        self.global_size, self.local_size, self.num_local = int(global_size), int(local_size), int(num_local)
        self.global_scale = _check_scale("global_scale", global_scale)
        self.local_scale = _check_scale("local_scale", local_scale)
        self.color, self.normalize = bool(color), bool(normalize)

        bicubic = v2.InterpolationMode.BICUBIC
        self._crop = {
            "global": v2.RandomResizedCrop(self.global_size, scale=self.global_scale, interpolation=bicubic,
                                           antialias=True),
            "local": v2.RandomResizedCrop(self.local_size, scale=self.local_scale, interpolation=bicubic,
                                          antialias=True),
        }
        self._blur = {
            "global": v2.GaussianBlur(blur_kernel_size(self.global_size), sigma=BLUR_SIGMA),
            "local": v2.GaussianBlur(blur_kernel_size(self.local_size), sigma=BLUR_SIGMA),
        }
        self._jitter = v2.ColorJitter(**JITTER)
        self.specs: List[ViewSpec] = [
            ViewSpec("global", blur_p=1.0, solarize_p=0.0),
            ViewSpec("global", blur_p=0.1, solarize_p=0.2),
        ] + [ViewSpec("local", blur_p=0.5, solarize_p=0.0)] * self.num_local

    @property
    def collate(self):
        """:func:`collate_multicrop` bound to this local size (needed for an empty "local" when num_local is 0)."""
        return functools.partial(collate_multicrop, local_size=self.local_size)

    def __call__(self, img: ImageLike) -> List[torch.Tensor]:
        return self.sample(img)[0]

    def sample(self, img: ImageLike) -> Tuple[List[torch.Tensor], List[Dict[str, bool]]]:
        """The views and, per view, which random ops were applied (keys: flip, jitter, grayscale, blur,
        solarize)."""
        rgb = to_rgb_uint8(img)
        views, flags = [], []
        for spec in self.specs:
            view, applied = self._view(rgb, spec)
            views.append(view)
            flags.append(applied)
        return views, flags

    def _view(self, rgb: torch.Tensor, spec: ViewSpec) -> Tuple[torch.Tensor, Dict[str, bool]]:
        x = self._crop[spec.kind](rgb)
        applied = dict(flip=_coin(FLIP_P), jitter=False, grayscale=False, blur=False, solarize=False)
        if applied["flip"]:
            x = F.horizontal_flip(x)
        x = F.to_dtype(x, torch.float32, scale=True)
        if self.color:
            if _coin(JITTER_P):
                applied["jitter"] = True
                x = self._jitter(x)
            if _coin(GRAYSCALE_P):
                applied["grayscale"] = True
                x = F.rgb_to_grayscale(x, num_output_channels=3)
            if _coin(spec.blur_p):
                applied["blur"] = True
                x = self._blur[spec.kind](x)
            if _coin(spec.solarize_p):
                applied["solarize"] = True
                x = F.solarize(x, SOLARIZE_THRESHOLD)
        if self.normalize:
            x = F.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        return x, applied


class EvalTransform:
    """Resize the shorter side to ``size`` (bicubic, antialias), centre-crop ``crop_size``, to float, normalise."""

    def __init__(self, size: int, crop_size: int, normalize: bool = True):
        if crop_size > size:
            # CenterCrop would pad with black borders instead of cropping.
            raise ValueError(f"crop_size {crop_size} is larger than the resize size {size}")
        self.size, self.crop_size, self.normalize = int(size), int(crop_size), bool(normalize)
        self._resize = v2.Resize(self.size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        self._crop = v2.CenterCrop(self.crop_size)

    def __call__(self, img: ImageLike) -> torch.Tensor:
        x = self._crop(self._resize(to_rgb_uint8(img)))
        x = F.to_dtype(x, torch.float32, scale=True)
        return F.normalize(x, IMAGENET_MEAN, IMAGENET_STD) if self.normalize else x


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W), on any device -> what :class:`EvalTransform` returns for them: float,
    scaled to [0, 1], ImageNet-normalised. Lets evaluation sets stay uint8 (4x smaller) until a batch runs."""
    return F.normalize(F.to_dtype(images, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)


def collate_multicrop(batch: Sequence[Tuple[Sequence[torch.Tensor], int, int]],
                      local_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Batch ``(views, label, index)`` samples view-major: ``out["global"][v]`` is the batch of view ``v``.

    Returns ``{"global": [2, B, C, Hg, Wg], "local": [N, B, C, Hl, Wl], "label": [B], "index": [B]}``.
    With no local views "local" is an empty ``[0, B, C, local_size, local_size]`` tensor, so ``local_size``
    must then be given (``MultiCropAugment.collate`` binds it).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    all_views = [sample[0] for sample in batch]
    n_views = len(all_views[0])
    if n_views < 2 or any(len(views) != n_views for views in all_views):
        raise ValueError(f"every sample needs the same number (>= 2) of views, got "
                         f"{sorted({len(views) for views in all_views})}")
    b = len(batch)

    def group(first: int, last: int) -> torch.Tensor:
        stacked = torch.stack([views[v] for v in range(first, last) for views in all_views])
        return stacked.unflatten(0, (last - first, b))

    glob = group(0, 2)
    if n_views > 2:
        local = group(2, n_views)
    elif local_size is None:
        raise ValueError("no local views in the batch: pass local_size (or use MultiCropAugment.collate) "
                         "so the empty 'local' tensor has the right shape")
    else:
        local = glob.new_empty((0, b, glob.shape[2], local_size, local_size))
    return {
        "global": glob,
        "local": local,
        "label": torch.as_tensor([int(sample[1]) for sample in batch], dtype=torch.long),
        "index": torch.as_tensor([int(sample[2]) for sample in batch], dtype=torch.long),
    }


class ArrayDataset(torch.utils.data.Dataset):
    """Map-style dataset over in-memory uint8 images ``[N, H, W]`` or ``[N, H, W, C]``.

    Item ``i`` is ``(transform(image_i), label_i, i)``; the image reaches the transform as a uint8 ``[C, H, W]``
    tensor. The dataset index is returned because the NN queue excludes entries of the query's own image.
    """

    def __init__(self, images_uint8, labels, transform=None):
        images = torch.as_tensor(np.ascontiguousarray(images_uint8))
        if images.dtype != torch.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 [N, H, W] or [N, H, W, C], got {images.dtype} "
                             f"{tuple(images.shape)}")
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        i = int(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i %= n  # report the non-negative dataset index
        img = self.images[i]
        img = img.unsqueeze(0) if img.ndim == 2 else img.permute(2, 0, 1)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i]), i
