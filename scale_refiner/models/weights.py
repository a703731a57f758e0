"""Pre-trained ViT weights in (from local files, through explicit key tables) and timm-loadable weights out.

Each supported checkpoint layout is described by a ``CheckpointLayout``: regex rules that rename a source key
onto one of our parameter names, a table of source module paths that are known and deliberately dropped
(decoders, classifier heads, EMA teachers, text towers), and value converters for tensors whose shape differs
from ours. A source key that matches neither a rule nor the drop table is reported as unexpected: nothing is
ignored silently, and every problem of a file is listed in one ``WeightsError``.

Where the layouts come from (read in the public code; the tables below are written from these facts):

``mae`` -- facebookresearch/mae
    ``models_mae.py``: the pre-training model is a timm-named encoder (``cls_token``, ``pos_embed`` of shape
    (1, 1 + N, D) whose first row is the zero CLS slot, ``patch_embed.proj``, ``blocks.N`` built from timm's
    ``Block``, ``norm``) plus a decoder: ``mask_token``, ``decoder_embed``, ``decoder_pos_embed``,
    ``decoder_blocks.N``, ``decoder_norm``, ``decoder_pred``. ``util/misc.py`` saves ``{'model': state_dict,
    'optimizer', 'epoch', 'scaler', 'args'}``; the released encoder files keep the ``'model'`` entry only.
    ``models_vit.py``: fine-tuned models are timm's ``VisionTransformer`` with a ``head``; with global pooling
    an ``fc_norm`` replaces ``norm``.
``timm`` -- huggingface/pytorch-image-models ``timm/models/vision_transformer.py``
    Our names verbatim, a plain state dict (safetensors on the hub). The ``vit_*.mae`` tags are built with
    ``num_classes=0`` (no head); classifier tags carry ``head.*`` and, with ``global_pool='avg'``, ``fc_norm.*``.
``maws`` -- facebookresearch/maws ``maws/model_builder.py``, ``maws/model.py``
    Not torchvision naming: ``build_model`` constructs timm's ``VisionTransformer(patch_size, embed_dim,
    depth, num_heads, num_classes=0[, img_size])`` (ViT-2B/14: 14, 2560, 24, 32) and passes the downloaded
    ``.pt`` object straight to ``load_state_dict``, so the MAE and MAWS files are flat timm state dicts with no
    wrapper and no prefix -- key-for-key our pre-norm layout, which ``detect_format`` therefore reports as
    ``'native'`` (loading is identical). The ``*_ft_in1k`` files add ``head.*`` (1000 classes) at 512/518 px.
    The ``maws_clip`` files are the ``CLIP`` module of ``maws/model.py``: ``vision_encoder.*`` (the timm ViT),
    ``text_encoder.*``, ``vision_projection``, ``text_projection``, ``logit_scale``.
``d2v2`` -- facebookresearch/fairseq ``examples/data2vec/models/``: ``data2vec2.py`` (``Data2VecMultiModel``),
    ``modalities/base.py``, ``modalities/images.py``, ``modalities/modules.py``, ``mae_image_classification.py``
    Under ``modality_encoders.IMAGE.``: ``local_encoder.proj`` is timm's ``PatchEmbed`` conv (with bias);
    ``fixed_positional_encoder.positions`` is the fixed sin-cos table for the N patches only (no CLS slot);
    ``extra_tokens`` (1, num_extra_tokens=1, D) is the CLS token, prepended *after* the positions are added
    (so it carries none: our zero CLS row reproduces that); ``context_encoder`` is a ``BlockEncoder`` whose
    ``norm`` runs first (``layer_norm_first=False``) -> our ``norm_pre``, followed by ``prenet_depth`` blocks
    ``context_encoder.blocks.i`` (2 in the base config, 0 for large/huge); ``decoder`` is the conv decoder.
    Top level: ``blocks.j`` are ``AltBlock`` s with timm's submodule names (``norm1``, ``attn.qkv`` packed as
    (3, heads, head_dim) like timm, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) run post-norm
    (x = norm1(x + attn(x)); x = norm2(x + mlp(x))), so ours are ``blocks.(prenet_depth + j)``; there is no
    final norm. ``state_dict`` adds ``_ema``, a nested dict with the EMA teacher's parameters. The classifier
    (``mae_image_classification.py``) nests the model under ``model.`` and adds ``fc_norm``, ``head``.
    ml-jku/MIM-Refiner ``src/initializers/pretrained_initializer.py`` renames the same five embedding keys and
    drops the decoder and ``_ema``; ``src/models/vit/data2vec2_vit.py`` runs the same post-norm forward.
    Full fairseq checkpoints also pickle an omegaconf ``cfg``, which ``weights_only=True`` refuses: extract
    their ``'model'`` entry to safetensors (or a tensors-only ``.pt``) in a trusted environment first.
"""
from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from scale_refiner.atomic import atomic_path, atomic_write
from scale_refiner.precision import nonfinite_tensors

PathLike = Union[str, os.PathLike]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".th")
SAFETENSORS_SUFFIX = ".safetensors"
# Wrappers a training script puts around the state dict: MAE / fairseq ('model'), Lightning and MLPlayground
# ('state_dict'), DeepSpeed ('module').
WRAPPER_KEYS = ("model", "state_dict", "module")
TIMM_ARCHITECTURE = "timm.models.vision_transformer:VisionTransformer"
# load_timm_export imports the callables a legacy export (<name>.json) names; only these packages may be named, so a
# config file cannot make it import arbitrary modules.
EXPORT_IMPORT_ROOTS = ("scale_refiner", "timm", "torch")


class WeightsError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and lists
    every offending key."""


# --------------------------------------------------------------------------------------- key tables
class KeyRule(NamedTuple):
    """``source``: regex on a source key (after the layout's wrapper prefix is removed); ``target``: our
    name, a ``str.format`` template over the match's named groups. ``shift_blocks``: add the number of
    data2vec 2.0 prenet blocks to the ``index`` group (top-level blocks follow the prenet blocks)."""

    source: str
    target: str
    shift_blocks: bool = False


def _prepend_zero_cls_position(positions: torch.Tensor) -> torch.Tensor:
    """data2vec 2.0 keeps positions for the patches only and adds none to the CLS token; our ``pos_embed``
    has a CLS slot, so a zero row there reproduces that."""
    if positions.ndim != 3 or positions.shape[0] != 1:
        raise WeightsError(f"expected data2vec 2.0 positions of shape (1, N, D), got {tuple(positions.shape)}")
    return torch.cat([positions.new_zeros(1, 1, positions.shape[-1]), positions], dim=1)


@dataclass(frozen=True)
class CheckpointLayout:
    name: str
    rules: Tuple[KeyRule, ...]
    # Source module paths that exist in such files and are deliberately not loaded: a key is dropped when it
    # equals an entry or starts with the entry plus a dot.
    dropped: Tuple[str, ...]
    # Prefixes removed from a source key before the rules and the drop table are consulted.
    strip_prefixes: Tuple[str, ...] = ()
    # Our name -> conversion of the renamed tensor.
    value_converters: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)


_WB = r"(?:weight|bias)"
_BLOCK_PARAM = rf"(?:norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.{_WB}"
# Our parameter names (timm's); layouts that already use them map each onto itself.
_OUR_NAMES = (r"cls_token", r"pos_embed", rf"patch_embed\.proj\.{_WB}", rf"blocks\.\d+\.{_BLOCK_PARAM}",
              rf"norm_pre\.{_WB}", rf"norm\.{_WB}")
_IDENTITY_RULES = tuple(KeyRule(rf"^(?P<name>{pattern})$", "{name}") for pattern in _OUR_NAMES)

_D2V2_IMAGE = r"modality_encoders\.IMAGE\."
_D2V2_RULES = (
    KeyRule(rf"^{_D2V2_IMAGE}local_encoder\.proj\.(?P<p>{_WB})$", "patch_embed.proj.{p}"),
    KeyRule(rf"^{_D2V2_IMAGE}fixed_positional_encoder\.positions$", "pos_embed"),
    KeyRule(rf"^{_D2V2_IMAGE}extra_tokens$", "cls_token"),
    KeyRule(rf"^{_D2V2_IMAGE}context_encoder\.norm\.(?P<p>{_WB})$", "norm_pre.{p}"),
    KeyRule(rf"^{_D2V2_IMAGE}context_encoder\.blocks\.(?P<index>\d+)\.(?P<p>{_BLOCK_PARAM})$", "blocks.{index}.{p}"),
    KeyRule(rf"^blocks\.(?P<index>\d+)\.(?P<p>{_BLOCK_PARAM})$", "blocks.{index}.{p}", shift_blocks=True),
)
_D2V2_PRENET_BLOCK = re.compile(rf"^{_D2V2_IMAGE}context_encoder\.blocks\.(\d+)\.")

LAYOUTS: Dict[str, CheckpointLayout] = {
    # Our own exports and every file already in our names (MAWS MAE / MAWS pre-training files included).
    "native": CheckpointLayout("native", _IDENTITY_RULES, dropped=()),
    "timm": CheckpointLayout("timm", _IDENTITY_RULES, dropped=("head", "fc_norm")),
    "mae": CheckpointLayout(
        "mae", _IDENTITY_RULES,
        dropped=("mask_token", "decoder_embed", "decoder_pos_embed", "decoder_blocks", "decoder_norm",
                 "decoder_pred", "head", "fc_norm")),
    "maws": CheckpointLayout(
        "maws", _IDENTITY_RULES, strip_prefixes=("vision_encoder.",),
        dropped=("head", "text_encoder", "text_projection", "vision_projection", "logit_scale")),
    "d2v2": CheckpointLayout(
        "d2v2", _D2V2_RULES, strip_prefixes=("model.",),
        dropped=("modality_encoders.IMAGE.decoder", "_ema", "shared_decoder", "recon_proj", "fc_norm", "head"),
        value_converters={"pos_embed": _prepend_zero_cls_position}),
}
FORMATS = tuple(LAYOUTS)


def _is_dropped(key: str, dropped: Tuple[str, ...]) -> bool:
    return any(key == entry or key.startswith(entry + ".") for entry in dropped)


def _strip_prefix(key: str, prefixes: Tuple[str, ...]) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


# ------------------------------------------------------------------------------------- reading files
def load_checkpoint_file(path: PathLike) -> Dict[str, torch.Tensor]:
    """Flat state dict of a local ``.safetensors`` or torch file (``.pth``, ``.pt``, ``.bin``, ``.th``).

    Torch files are read with ``weights_only=True`` only: a pickle may run code, and a weights file has no
    reason to. ``'model'`` / ``'state_dict'`` / ``'module'`` wrappers are removed; nested dicts of tensors
    (fairseq's ``_ema``) become dotted keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for a corrupt header
            raise WeightsError(f"cannot read safetensors file {path}: {exc}") from exc
    if suffix not in TORCH_SUFFIXES:
        raise WeightsError(f"unknown checkpoint type {path}: expected {SAFETENSORS_SUFFIX} or one of "
                           f"{', '.join(TORCH_SUFFIXES)}")
    try:
        try:
            # Memory-mapped: the 8 ranks of a node that all read a 2B checkpoint share one copy in the page cache
            # (and read the file once from a network file system) instead of holding 8; pages are
            # copy-on-write, so nothing done to these tensors reaches the file.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # the pre-1.6 format cannot be mapped
    except Exception as exc:
        raise WeightsError(
            f"cannot read {path} with torch.load(weights_only=True): {exc}. If it pickles objects other than "
            f"tensors (e.g. a fairseq 'cfg' or argparse 'args'), extract its state dict in a trusted "
            f"environment and save that as safetensors.") from exc
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
    while True:
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    flat: Dict[str, torch.Tensor] = {}
    not_tensors: List[str] = []

    def flatten(mapping: Mapping, prefix: str) -> None:
        for key, value in mapping.items():
            name = f"{prefix}{key}"
            if isinstance(value, torch.Tensor):
                flat[name] = value
            elif isinstance(value, Mapping):
                flatten(value, name + ".")
            else:
                not_tensors.append(f"{name} ({type(value).__name__})")

    flatten(obj, "")
    if not_tensors:
        raise WeightsError(f"{path}: state dict entries that are not tensors ({len(not_tensors)}): "
                           f"{', '.join(not_tensors)}")
    if not flat:
        raise WeightsError(f"{path} holds no tensors")
    return flat


# ------------------------------------------------------------------------------- reading tensors lazily
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class TensorSource:
    """One tensor of a checkpoint, read only as far as asked: ``flat(start, stop)`` gives elements
    ``[start, stop)`` of its row-major flattening (the file's dtype), ``rows(start, stop)`` a range along the first
    dimension, ``full()`` the whole tensor. A ZeRO-3 rank reads its partition of each parameter through ``flat``,
    an FSDP2 rank its dim-0 shard through ``rows``, and neither holds the rest."""

    shape: torch.Size
    dtype: torch.dtype

    def flat(self, start: int, stop: int) -> torch.Tensor:
        return self.full().reshape(-1)[start:stop]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along the first dimension (an FSDP2 shard)."""
        return self.full()[start:stop]

    def full(self) -> torch.Tensor:
        raise NotImplementedError


class TensorView(TensorSource):
    """A tensor in memory or memory-mapped (``torch.load(mmap=True)``): a slice of a contiguous one is a view, so
    only the pages of that slice are read."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape, self.dtype = tensor.shape, tensor.dtype

    def flat(self, start, stop):
        # a non-contiguous tensor (rare in a checkpoint) is copied whole here, one tensor at a time
        return self.tensor.reshape(-1)[start:stop]

    def rows(self, start, stop):
        return self.tensor[start:stop]

    def full(self):
        return self.tensor


class SafetensorsEntry(TensorSource):
    """A tensor of an open safetensors file: ``flat`` reads the rows that cover the range, nothing else."""

    def __init__(self, handle, key: str):
        self._handle, self._key = handle, key  # the handle keeps the file mapped
        self._slice = handle.get_slice(key)
        self.shape = torch.Size(self._slice.get_shape())
        dtype = self._slice.get_dtype()
        if dtype not in _SAFETENSORS_DTYPES:
            raise WeightsError(f"tensor {key!r} has the safetensors dtype {dtype}, which is not supported here")
        self.dtype = _SAFETENSORS_DTYPES[dtype]

    def flat(self, start, stop):
        if len(self.shape) == 0 or stop <= start:
            return self.full().reshape(-1)[start:stop]
        row = math.prod(self.shape[1:])
        first, last = start // row, -(-stop // row)
        rows = self._slice[first:last]
        return rows.reshape(-1)[start - first * row: stop - first * row]

    def rows(self, start, stop):
        return self._slice[start:stop] if len(self.shape) else self.full()

    def full(self):
        return self._handle.get_tensor(self._key)


class ComputedTensor(TensorSource):
    """A value a key mapping has to compute from whole source tensors (a concatenation, a resampled position
    embedding): computed when read, one at a time, and not kept."""

    def __init__(self, compute: Callable[[], torch.Tensor], shape, dtype):
        self._compute, self.shape, self.dtype = compute, torch.Size(shape), dtype

    def full(self):
        return self._compute()


def open_checkpoint(path: PathLike) -> Dict[str, TensorSource]:
    """``load_checkpoint_file``'s flat state dict, each tensor as a ``TensorSource`` that reads nothing until
    asked: torch files memory-mapped (the pre-1.6 format read whole), safetensors files opened, not read."""
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        return {key: TensorView(value) for key, value in load_checkpoint_file(path).items()}
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        from safetensors import safe_open
        handle = safe_open(str(path), framework="pt", device="cpu")
        entries = {key: SafetensorsEntry(handle, key) for key in handle.keys()}
    except WeightsError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise WeightsError(f"cannot read safetensors file {path}: {exc}") from exc
    return entries


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Layout of a flat (unwrapped) state dict, one of ``FORMATS``, from keys only one layout has.

    Files already in our names come out as ``'native'``: that includes the MAWS MAE / MAWS pre-training files,
    which are plain timm state dicts without a head (see the module docstring). A MAWS fine-tuned file (timm
    names plus ``head``) comes out as ``'timm'``; both load the same way as under ``'maws'``.
    """
    keys = list(state_dict)
    if any(_strip_prefix(k, ("model.",)).startswith("modality_encoders.") for k in keys):
        return "d2v2"
    if any(k.startswith("vision_encoder.") for k in keys):
        return "maws"  # the MAWS CLIP module: timm ViT under vision_encoder. next to a text tower
    if any(_is_dropped(k, ("mask_token", "decoder_embed", "decoder_pos_embed", "decoder_blocks", "decoder_norm",
                           "decoder_pred")) for k in keys):
        return "mae"
    if any(_is_dropped(k, ("head", "fc_norm")) for k in keys):
        return "timm"
    return "native"


# ------------------------------------------------------------------------------------------ converting
@dataclass
class Conversion:
    """``convert_state_dict``'s result: the renamed tensors and what happened to every source key."""

    state_dict: Dict[str, torch.Tensor]
    renamed: Dict[str, str]  # source key -> our name, where they differ
    dropped: List[str]  # source keys in the layout's drop table
    unknown: List[str]  # source keys no rule and no drop entry covers
    conflicts: List[str]  # our names that two source keys map onto
    notes: List[str]  # value conversions applied


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], fmt: str) -> Conversion:
    """Rename ``state_dict`` from layout ``fmt`` into our names through ``LAYOUTS[fmt]``; no checks against
    a model (``load_pretrained`` does those)."""
    if fmt not in LAYOUTS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
    layout = LAYOUTS[fmt]
    rules = [(re.compile(rule.source), rule) for rule in layout.rules]
    stripped = {key: _strip_prefix(key, layout.strip_prefixes) for key in state_dict}
    prenet_depth = 0
    if fmt == "d2v2":
        prenet = {int(m.group(1)) for m in map(_D2V2_PRENET_BLOCK.match, stripped.values()) if m}
        prenet_depth = max(prenet) + 1 if prenet else 0
    out: Dict[str, torch.Tensor] = {}
    source_of: Dict[str, str] = {}
    renamed: Dict[str, str] = {}
    dropped, unknown, conflicts, notes = [], [], [], []
    for key, value in state_dict.items():
        name = stripped[key]
        target = None
        for pattern, rule in rules:
            match = pattern.match(name)
            if match:
                groups = match.groupdict()
                if rule.shift_blocks:
                    groups["index"] = int(groups["index"]) + prenet_depth
                target = rule.target.format(**groups)
                break
        if target is None:
            (dropped if _is_dropped(name, layout.dropped) else unknown).append(key)
            continue
        if target in out:
            conflicts.append(f"{target} (from {source_of[target]} and {key})")
            continue
        converter = layout.value_converters.get(target)
        if converter is not None:
            before = tuple(value.shape)
            value = converter(value)
            notes.append(f"{key} -> {target}: {converter.__name__.strip('_')} {before} -> {tuple(value.shape)}")
        out[target] = value
        source_of[target] = key
        if target != key:
            renamed[key] = target
    if prenet_depth:
        notes.append(f"{prenet_depth} data2vec 2.0 prenet blocks become blocks 0..{prenet_depth - 1}; "
                     f"top-level blocks are shifted by {prenet_depth}")
    return Conversion(out, renamed, sorted(dropped), sorted(unknown), conflicts, notes)


def _square_grid(num_patches: int) -> Optional[int]:
    side = math.isqrt(num_patches)
    return side if side * side == num_patches else None


def check_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], source: str,
                     source_name: Optional[Dict[str, str]] = None, unknown: Sequence[str] = (),
                     conflicts: Sequence[str] = ()) -> None:
    """Raise one ``WeightsError`` naming ``source`` and listing every missing, unexpected and mis-shaped key
    (and what the conversion could not place), before anything is loaded."""
    expected = model.state_dict()
    source_name = source_name or {}
    missing = sorted(k for k in expected if k not in state)
    unexpected = list(unknown) + [f"{k}" + (f" (from {source_name[k]})" if k in source_name else "")
                                  for k in sorted(state) if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(state) if k in expected and state[k].shape != expected[k].shape]
    problems = [(title, items) for title, items in (
        ("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched),
        ("two source keys for one parameter", list(conflicts))) if items]
    if problems:
        lines = [f"cannot load {source} into {_describe(model)}:"]
        for title, items in problems:
            lines.append(f"  {title} ({len(items)}):")
            lines.extend(f"    {item}" for item in items)
        raise WeightsError("\n".join(lines))


def _describe(model: nn.Module) -> str:
    arch = getattr(model, "arch", None)
    dims = [f"{k} {getattr(model, k)}" for k in ("embed_dim", "depth", "img_size") if hasattr(model, k)]
    return f"{type(model).__name__}({', '.join(([arch] if arch else []) + dims)})"


@dataclass
class PretrainedPlan:
    """What ``load_pretrained`` loads, checked against the model and not yet read: our parameter names ->
    ``TensorSource`` (a mapped or open file tensor, or a value computed from one), and the report."""

    tensors: Dict[str, TensorSource]
    report: dict

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Every tensor whole: mapped file tensors as they are (no copy), computed ones computed."""
        return {name: source.full() for name, source in self.tensors.items()}


def plan_pretrained(model: nn.Module, path: PathLike, fmt: str = "auto") -> PretrainedPlan:
    """Read the keys, shapes and dtypes of a local checkpoint, map them through ``LAYOUTS[fmt]`` and check them
    against ``model`` (any device: a meta-built model will do; only its ``state_dict`` keys and shapes are used),
    raising ``load_pretrained``'s errors, without reading a tensor. Mapped values (data2vec 2.0 positions, a
    resampled ``pos_embed``) are computed from their whole source tensor when read, one at a time."""
    path = Path(path)
    source = open_checkpoint(path)
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt not in LAYOUTS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    layout = LAYOUTS[fmt]
    # the conversion runs on meta stand-ins: every name, shape and note, and no data
    conv = convert_state_dict({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in source.items()},
                              fmt)
    state = conv.state_dict
    expected = model.state_dict()
    source_name = {target: src for src, target in conv.renamed.items()}
    tensors: Dict[str, TensorSource] = {}
    for target, value in state.items():
        origin = source[source_name.get(target, target)]
        converter = layout.value_converters.get(target)
        tensors[target] = (origin if converter is None else
                           ComputedTensor(lambda o=origin, c=converter: c(o.full()), value.shape, value.dtype))

    resampled = None
    pos, target_pos = state.get("pos_embed"), expected.get("pos_embed")
    if (pos is not None and target_pos is not None and pos.shape != target_pos.shape and pos.ndim == 3
            and pos.shape[0] == 1 and pos.shape[-1] == target_pos.shape[-1]):
        old_grid, new_grid = _square_grid(pos.shape[1] - 1), _square_grid(target_pos.shape[1] - 1)
        if old_grid and new_grid:
            # Bicubic without antialiasing, as MAE's interpolate_pos_embed (and our crop resampling) do it;
            # timm keeps the CLS slot as is and the dtype of the checkpoint.
            original = tensors["pos_embed"]

            def resample(original=original, old=old_grid, new=new_grid):
                return resample_abs_pos_embed(original.full(), new_size=[new, new], old_size=[old, old],
                                              num_prefix_tokens=1, interpolation="bicubic", antialias=False)

            shape = (1, 1 + new_grid * new_grid, pos.shape[-1])
            tensors["pos_embed"] = ComputedTensor(resample, shape, pos.dtype)
            state["pos_embed"] = torch.empty(shape, dtype=pos.dtype, device="meta")
            resampled = {"from": [old_grid, old_grid], "to": [new_grid, new_grid]}

    check_state_dict(model, state, f"{path} (format {fmt!r})", source_name=source_name,
                     unknown=[f"{k} (no rule in the {fmt!r} table)" for k in conv.unknown],
                     conflicts=conv.conflicts)
    report = {
        "file": str(path),
        "format": fmt,
        "loaded": len(state),
        "renamed": conv.renamed,
        "dropped": conv.dropped,
        "conversions": conv.notes,
        "resampled_pos_embed": resampled,
    }
    return PretrainedPlan(tensors, report)


def load_pretrained(model: nn.Module, path: PathLike, fmt: str = "auto") -> dict:
    """Load a local checkpoint into ``model`` (CPU tensors) and return a report of what was done.

    ``fmt``: one of ``FORMATS`` or ``'auto'`` (``detect_format``). The converted tensors must match
    ``model.state_dict()`` exactly -- missing keys, unexpected keys, shape mismatches and name conflicts raise
    one ``WeightsError`` listing all of them, before the model is touched. A ``pos_embed`` for another square
    grid (a checkpoint at another resolution) is resampled bicubically and the report says so.

    Report keys: ``file``, ``format``, ``loaded`` (number of tensors), ``renamed`` (source -> ours),
    ``dropped`` (source keys from the drop table), ``conversions`` (notes), ``resampled_pos_embed``
    (``None`` or ``{'from': [h, w], 'to': [h, w]}``).

    A model partitioned by ``deepspeed.zero.Init`` is loaded partition by partition instead
    (``plan_pretrained`` checked against a meta-built twin, then ``engine.zero.load_state_partitioned``).
    """
    plan = plan_pretrained(model, path, fmt)
    model.load_state_dict(plan.state_dict(), strict=True)
    return plan.report


# -------------------------------------------------------------------------------------------- export
# An export is a directory in timm's hub layout, loadable with timm.create_model("local-dir:" + path,
# pretrained=True): timm builds config.json's "architecture" with its "model_args", keeps its "pretrained_cfg"
# (what timm.data.resolve_data_config returns) and loads model.safetensors strictly:
#   config.json        architecture (a timm registry name), num_classes 0, num_features, global_pool, model_args
#                      (every keyword that builds our layout), pretrained_cfg (the trained input size, mean, std,
#                      interpolation, crop_pct) and, outside timm's keys, "scale_refiner" (what the caller adds)
#   model.safetensors  the state dict, timm's key names (ours)
#   README.md          the model card
# The layout before it -- <name>.safetensors + <name>.json ({architecture, timm_kwargs, callable_kwargs,
# extra_config}) side by side -- is still read by load_timm_export and eval/loading.py.
HUB_CONFIG, HUB_WEIGHTS, HUB_CARD = "config.json", "model.safetensors", "README.md"
# timm's registry has no data2vec 2.0 ViT: its post-norm block (x = norm1(x + attn(x))) is not timm's Block nor
# ResPostBlock, and timm's VisionTransformer drops the patch-embedding bias under pre_norm=True. A block class
# cannot be written into model_args (JSON), so the post-norm layout is registered with timm under this name when
# this module is imported: plain timm refuses such an export ("Unknown model"), it never builds a wrong one.
POSTNORM_ARCHITECTURE = "vit_data2vec2_postnorm"
# timm names for the registered widths; model_args carries every dimension, so the name only picks timm's
# VisionTransformer entry point and is chosen to read right where it can.
_TIMM_WIDTH_NAMES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
_TIMM_FALLBACK = "vit_base_patch16_224"


def _postnorm_vit(pretrained: bool = False, **kwargs):
    """timm entry point of our post-norm (data2vec 2.0) ViT: timm's ``VisionTransformer`` with an embedding
    LayerNorm, no final norm, ``PostNormBlock`` blocks and a patch embedding that keeps its bias."""
    from timm.models import build_model_with_cfg
    from timm.models.vision_transformer import VisionTransformer as TimmViT, checkpoint_filter_fn

    from scale_refiner.models.vit import BiasedPatchEmbed, PostNormBlock
    kwargs.update(pre_norm=True, final_norm=False, block_fn=PostNormBlock, embed_layer=BiasedPatchEmbed)
    return build_model_with_cfg(TimmViT, POSTNORM_ARCHITECTURE, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _register_postnorm() -> None:
    from timm.models import is_model, register_model
    if not is_model(POSTNORM_ARCHITECTURE):
        _postnorm_vit.__name__ = POSTNORM_ARCHITECTURE  # register_model keys the registry by the function name
        register_model(_postnorm_vit)


_register_postnorm()


def timm_architecture(model: nn.Module) -> str:
    """The timm registry name a ``config.json`` gives for ``model``: ``POSTNORM_ARCHITECTURE`` for the post-norm
    layout, else timm's ``vit_<width>_patch<p>_224`` where timm has one for this width and patch size (its
    ``model_args`` are overridden by ours in full), else ``vit_base_patch16_224``."""
    from timm.models import is_model
    if getattr(model, "arch", "prenorm") == "postnorm":
        return POSTNORM_ARCHITECTURE
    width = _TIMM_WIDTH_NAMES.get(model.embed_dim)
    name = f"vit_{width}_patch{model.patch_size}_224" if width else _TIMM_FALLBACK
    return name if is_model(name) else _TIMM_FALLBACK


def default_data_config(model: nn.Module) -> dict:
    """The preprocessing of an export whose caller names none: RGB at the model's resolution, shorter side resized
    bicubically to it and centre-cropped (crop_pct 1), ImageNet mean / std -- what every training and evaluation
    pipeline of this repository applies (``scale_refiner.data.augment``; models may not import data, so the values
    are timm's ImageNet constants here, and a test holds the two equal). A refine run passes its own
    (``scale_refiner.eval.card.run_data_config``)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    size = int(model.img_size)
    return {"input_size": [model.patch_embed.proj.in_channels, size, size], "interpolation": "bicubic",
            "crop_pct": 1.0, "crop_mode": "center", "mean": list(IMAGENET_DEFAULT_MEAN),
            "std": list(IMAGENET_DEFAULT_STD)}


def hub_config(model: nn.Module, data_config: Optional[dict] = None, extra_config: Optional[dict] = None) -> dict:
    """The ``config.json`` of ``model`` in timm's hub layout (see the section comment). ``data_config``: keys of
    timm's ``PretrainedCfg`` (input_size, mean, std, interpolation, crop_pct, crop_mode) over
    ``default_data_config(model)``; ``extra_config`` goes under ``"scale_refiner"``."""
    from timm.models import PretrainedCfg

    kwargs = model.timm_kwargs()
    model_args = {k: v for k, v in kwargs.items() if not (inspect.isclass(v) or inspect.isfunction(v))}
    if model.arch == "postnorm":  # the registered entry point sets these itself
        for key in ("pre_norm", "final_norm"):
            model_args.pop(key, None)
    left = sorted(set(kwargs) - set(model_args) - {"pre_norm", "final_norm", "block_fn", "embed_layer"})
    if left:
        raise ValueError(f"timm keyword arguments that config.json cannot carry: {left}")
    data = default_data_config(model)
    data.update(data_config or {})
    unknown = sorted(set(data) - set(PretrainedCfg.__dataclass_fields__))
    if unknown:
        raise ValueError(f"data_config keys that timm's pretrained_cfg does not know: {unknown}")
    architecture = timm_architecture(model)
    pretrained_cfg = dict(architecture=architecture, fixed_input_size=True, num_classes=0,
                          first_conv="patch_embed.proj", classifier="head", **data)
    pretrained_cfg["input_size"] = list(pretrained_cfg["input_size"])
    if pretrained_cfg["input_size"][1:] != [model.img_size, model.img_size]:
        raise ValueError(f"input_size {pretrained_cfg['input_size']} is not the model's resolution "
                         f"{model.img_size}: timm's ViT takes its stored resolution only")
    config = {"architecture": architecture, "num_classes": 0, "num_features": model.embed_dim,
              "global_pool": kwargs.get("global_pool", "token"), "model_args": model_args,
              "pretrained_cfg": pretrained_cfg}
    if extra_config:
        config["scale_refiner"] = dict(extra_config)
    return config


def _fmt_accuracy(value) -> str:
    return f"{100 * value:.1f} %" if isinstance(value, (int, float)) else str(value)


def model_card(config: dict, card: Optional[dict] = None) -> str:
    """The ``README.md`` of an export, generated from its ``config.json`` and ``card``: ``title``, ``encoder``
    (which encoder of the run, e.g. ``EMA encoder``), ``recipe`` ({label: value}), ``data`` ({label: value}, the
    data set's name and size), ``knn`` ({encoder: {k: accuracy}}, accuracies in [0, 1]) and ``knn_note`` (how it
    was measured), ``notes`` (lines)."""
    card = dict(card or {})
    args, data = config["model_args"], config["pretrained_cfg"]
    post = config["architecture"] == POSTNORM_ARCHITECTURE
    title = card.get("title", "MIM-Refiner ViT encoder")
    lines = ["---", "library_name: timm", "tags:", "- image-feature-extraction", "- timm", "- mim-refiner", "---",
             "", f"# {title}", ""]
    what = (f"A Vision Transformer ({'post-norm, data2vec 2.0' if post else 'pre-norm, MAE'} layout) refined with "
            f"MIM-Refiner by scale_refiner")
    encoder = card.get("encoder")
    lines.append(what + (f": the {encoder} of the run." if encoder else "."))
    lines += ["It is a feature extractor (no classifier, `num_classes=0`); the output is the CLS token after the "
              + ("last block." if post else "final norm."), ""]
    lines += ["| | |", "|---|---|",
              f"| timm architecture | `{config['architecture']}` |",
              f"| patch size / width / depth / heads | {args['patch_size']} / {args['embed_dim']} / "
              f"{args['depth']} / {args['num_heads']} |",
              f"| MLP ratio | {args['mlp_ratio']:g} |",
              f"| resolution | {args['img_size']} px, {args['in_chans']} channels |", ""]
    recipe = card.get("recipe")
    if recipe:
        lines += ["## Recipe", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in recipe.items()]
        lines.append("")
    dataset = card.get("data")
    if dataset:
        lines += ["## Data", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in dataset.items()]
        lines.append("")
    knn = card.get("knn")
    lines += ["## k-NN accuracy", ""]
    if knn:
        ks = sorted({k for acc in knn.values() for k in acc}, key=lambda k: int(k) if str(k).isdigit() else k)
        lines += ["| encoder | " + " | ".join(f"k-NN@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(_fmt_accuracy(acc.get(k, "")) for k in ks) + " |"
                  for name, acc in knn.items()]
        lines += ["", card.get("knn_note", "Top-1 accuracy of a k-NN classifier on the CLS token.")]
    else:
        lines.append("Not measured for this export.")
    lines += ["", "## Loading", "", "```python", "import timm"]
    if post:
        lines.append("import scale_refiner.models.weights  # registers the post-norm architecture with timm")
    lines += ['model = timm.create_model("local-dir:PATH/TO/THIS/DIRECTORY", pretrained=True).eval()',
              "data_config = timm.data.resolve_data_config({}, model=model)",
              "transform = timm.data.create_transform(**data_config)",
              "features = model(transform(image).unsqueeze(0))  # (1, width): the CLS token", "```", ""]
    if post:
        lines += ["timm alone has no data2vec 2.0 post-norm block; without the import above it refuses the "
                  "architecture name.", ""]
    lines += ["## Preprocessing", "",
              f"RGB, {data['input_size'][1]}x{data['input_size'][2]} px: shorter side resized to "
              f"{round(data['input_size'][1] / data['crop_pct'])} px ({data['interpolation']}), centre crop "
              f"(crop_pct {data['crop_pct']:g}), scaled to [0, 1], normalised with mean "
              f"{tuple(round(m, 4) for m in data['mean'])} and std {tuple(round(s, 4) for s in data['std'])}. "
              "`resolve_data_config` returns exactly this.", ""]
    for note in card.get("notes", ()):
        lines.append(note)
    return "\n".join(lines).rstrip("\n") + "\n"


def export_timm(model: nn.Module, out_dir: PathLike, name: str, extra_config: Optional[dict] = None, *,
                data_config: Optional[dict] = None, card: Optional[dict] = None) -> Tuple[Path, Path]:
    """Write the export ``<out_dir>/<name>/`` in timm's hub layout: ``model.safetensors`` (the state dict,
    contiguous CPU tensors), ``README.md`` (``model_card(config, card)``) and ``config.json``
    (``hub_config(model, data_config, extra_config)``). Each file is written atomically; config.json goes last,
    so its presence means the export is complete. Returns (weights path, config path)."""
    export_dir = Path(out_dir) / name
    # a diverged run's weights are not a result: refuse them before anything is written
    bad = nonfinite_tensors(model.state_dict())
    if bad:
        raise ValueError(f"export {name}: non-finite values in {bad}; nothing written")
    config = hub_config(model, data_config, extra_config)
    text = json.dumps(config, indent=2)  # fails here, before any file is written
    readme = model_card(config, card)
    export_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights_path, config_path = export_dir / HUB_WEIGHTS, export_dir / HUB_CONFIG
    with atomic_path(weights_path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_write(export_dir / HUB_CARD, "w") as f:
        f.write(readme)
    with atomic_write(config_path, "w") as f:
        f.write(text + "\n")
    return weights_path, config_path


def _resolve_callable(path: str):
    """A legacy export's ``"module:qualname"`` kwarg, imported only from ``EXPORT_IMPORT_ROOTS``."""
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise WeightsError(f"{path!r} is not a 'module:qualname' import path")
    if module_name.split(".")[0] not in EXPORT_IMPORT_ROOTS:
        raise WeightsError(f"refusing to import {module_name!r} for {path!r}: exports may only name callables "
                           f"from {', '.join(EXPORT_IMPORT_ROOTS)}")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise WeightsError(f"cannot resolve {path!r}: {exc}") from exc
    return obj


class ExportFiles(NamedTuple):
    """Where an export's files are: ``layout`` ``'hub'`` (a directory) or ``'legacy'`` (a file pair)."""

    layout: str
    config: Path
    weights: Path


def find_export(path: PathLike) -> ExportFiles:
    """The export ``path`` names: a hub-layout directory or any file in it, or one file of a legacy
    ``<name>.safetensors`` + ``<name>.json`` pair. Raises ``FileNotFoundError`` when it is neither."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if (path.is_dir() or path.name in (HUB_CONFIG, HUB_WEIGHTS, HUB_CARD)) and (directory / HUB_CONFIG).is_file():
        weights = directory / HUB_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"export file not found: {weights}")
        return ExportFiles("hub", directory / HUB_CONFIG, weights)
    if path.is_dir():
        raise FileNotFoundError(f"export file not found: {path / HUB_CONFIG} ({path} is not an export directory)")
    config_path, weights_path = path.with_suffix(".json"), path.with_suffix(SAFETENSORS_SUFFIX)
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"export file not found: {p}")
    return ExportFiles("legacy", config_path, weights_path)


def _load_exported_state(model: nn.Module, weights_path: Path, config_path: Path) -> nn.Module:
    state = load_checkpoint_file(weights_path)
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(float_dtypes) == 1:
        # Keep the exported precision: loading float64 (or bf16) weights into timm's float32 model would round.
        model.to(float_dtypes.pop())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{weights_path} does not fit the model of {config_path}: {exc}") from exc
    return model


def load_timm_export(path: PathLike) -> nn.Module:
    """Rebuild the timm ``VisionTransformer`` of an export (``path``: its directory or a file in it, or either
    file of a legacy pair) and load the weights with ``strict=True``; the model takes the weights' dtype when they
    share one. A hub-layout export is built by ``timm.create_model("local-dir:...")`` (so it carries timm's
    ``pretrained_cfg``: the trained preprocessing) and given the weights here."""
    files = find_export(path)
    if files.layout == "hub":
        import timm
        try:
            config = json.loads(files.config.read_text(encoding="utf-8"))
            architecture = config["architecture"]
        except (ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"{files.config} is not a timm hub config: {exc!r}") from exc
        if not timm.is_model(architecture):
            raise WeightsError(f"{files.config}: timm has no architecture {architecture!r}")
        model = timm.create_model(f"local-dir:{files.config.parent}", pretrained=False)
        return _load_exported_state(model, files.weights, files.config)
    try:
        config = json.loads(files.config.read_text(encoding="utf-8"))
        architecture, kwargs = config["architecture"], dict(config["timm_kwargs"])
        callables = config.get("callable_kwargs", [])
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{files.config} is not an export_timm config: {exc!r}") from exc
    if architecture != TIMM_ARCHITECTURE:
        raise WeightsError(f"{files.config}: architecture {architecture!r}, expected {TIMM_ARCHITECTURE!r}")
    for key in callables:
        kwargs[key] = _resolve_callable(kwargs[key])
    model = _resolve_callable(architecture)(**kwargs)
    return _load_exported_state(model, files.weights, files.config)
