"""Encoders to evaluate: from a refine run (its config.json + a checkpoint or an export) or from a registered
ViT name + a weights file.

Run directories (``launch/refine.py``'s ``run.out_dir``)::

    config.json                         the run's full config (rebuilds the encoder)
    checkpoints/<tag>/model_state.pt    full refiner state (``encoder.*``), written at stage ends
    checkpoints/<tag>/ema.pt            EMA of the trainable encoder parameters (refine stage)
    export/{ema,online}/                the final encoders in timm's hub layout (config.json, model.safetensors,
                                        README.md): timm.create_model("local-dir:<dir>", pretrained=True)

``--encoder ema`` is ``ema.pt`` laid over ``model_state.pt``'s encoder (frozen parameters and buffers come
from the online state: they do not change); ``online`` is the encoder of ``model_state.pt``. For a run
directory the checkpoint is ``checkpoints/latest`` if it holds ``model_state.pt``, else the newest stage end
(``refine-end``, then ``heads-end``), else the run's exports.

Exports written before the hub layout (``export/<name>.safetensors`` + ``export/<name>.json``) are still read,
from a run directory and as ``--weights`` (``models.weights.find_export``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from scale_refiner.config import RefineConfig
from scale_refiner.engine.checkpoint import CheckpointError, encoder_state
from scale_refiner.models.vit import VisionTransformer, build_vit
from scale_refiner.models.weights import (HUB_WEIGHTS, WeightsError, check_state_dict, find_export,
                                          load_checkpoint_file, load_pretrained)

class EvalInputError(ValueError):
    """Bad evaluation input (paths, checkpoint layout); the message names the file."""


def config_from_json(path: Path) -> RefineConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EvalInputError(f"cannot read the run config {path}: {exc}") from exc
    schema = OmegaConf.structured(RefineConfig)
    OmegaConf.set_struct(schema, True)
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, data))
    except OmegaConfBaseException as exc:
        raise EvalInputError(f"{path} is not a config of this version of scale_refiner: "
                             f"{str(exc).splitlines()[0]}") from exc


def strict_load(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one ``WeightsError`` listing every missing, unexpected and
    mis-shaped key (the same report ``load_pretrained`` gives)."""
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)


def _pick_checkpoint(run_dir: Path) -> Optional[Path]:
    root = run_dir / "checkpoints"
    candidates = []
    pointer = root / "latest"
    if pointer.is_file():
        candidates.append(root / pointer.read_text().strip())
    candidates += [root / "refine-end", root / "heads-end"]
    for c in candidates:
        if (c / "model_state.pt").is_file():
            return c
    return None


def encoder_state_from_checkpoint(ckpt: Path, which: str) -> Dict[str, torch.Tensor]:
    """The encoder's full state dict from a checkpoint directory (``which``: ``ema`` or ``online``)."""
    try:
        return encoder_state(ckpt, which, mmap=False)
    except CheckpointError as exc:
        raise EvalInputError(str(exc)) from None


def load_from_run(path, which: str = "ema") -> Tuple[VisionTransformer, RefineConfig, dict]:
    """``path``: a run directory or one of its checkpoint directories. Returns (encoder in eval mode, the run's
    config, a description of what was loaded)."""
    if which not in ("ema", "online"):
        raise EvalInputError(f"--encoder must be ema or online, got {which!r}")
    path = Path(path)
    if not path.is_dir():
        raise EvalInputError(f"checkpoint path {path} is not a directory (pass a run directory or a "
                             f"checkpoints/<tag> directory)")
    if (path / "config.json").is_file():
        run_dir, ckpt = path, _pick_checkpoint(path)
    elif (path / "model_state.pt").is_file() or (path / "state.json").is_file():
        run_dir, ckpt = path.parent.parent, path
    else:
        raise EvalInputError(f"{path} is neither a run directory (no config.json) nor a checkpoint directory "
                             f"(no model_state.pt)")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise EvalInputError(f"no config.json in the run directory {run_dir} of checkpoint {path}")
    cfg = config_from_json(config_path)
    model = build_vit(cfg.model)
    if ckpt is not None:
        strict_load(model, encoder_state_from_checkpoint(ckpt, which), f"{ckpt} ({which})")
        source = {"kind": "checkpoint", "path": str(ckpt), "encoder": which}
    else:
        export = _run_export(run_dir, which)
        if export is None:
            raise EvalInputError(f"{run_dir} has no checkpoint with model_state.pt and no export "
                                 f"{run_dir / 'export' / which}")
        load_pretrained(model, export, "native")
        source = {"kind": "export", "path": str(export), "encoder": which}
    source["config"] = str(config_path)
    return model.eval(), cfg, source


def _run_export(run_dir: Path, which: str) -> Optional[Path]:
    """The weights file of a run's ``which`` export: the hub layout's, else a legacy pair's, else None."""
    for weights in (run_dir / "export" / which / HUB_WEIGHTS, run_dir / "export" / f"{which}.safetensors"):
        if weights.is_file():
            return weights
    return None


def vit_from_timm(timm_model) -> VisionTransformer:
    """Our ``VisionTransformer`` with the weights of a timm ViT of the same layout (an ``export_timm``)."""
    from scale_refiner.models.vit import PostNormBlock

    blocks = timm_model.blocks
    arch = "postnorm" if isinstance(blocks[0], PostNormBlock) else "prenorm"
    pe = timm_model.patch_embed
    model = VisionTransformer(patch_size=pe.patch_size[0], embed_dim=timm_model.embed_dim, depth=len(blocks),
                              num_heads=blocks[0].attn.num_heads,
                              mlp_ratio=blocks[0].mlp.fc1.out_features / timm_model.embed_dim,
                              img_size=pe.img_size[0], in_chans=pe.proj.in_channels, arch=arch)
    strict_load(model, {k: v.float() for k, v in timm_model.state_dict().items()}, "timm export")
    return model


def _stored_img_size(path: Path, patch_size: int) -> Optional[int]:
    """Resolution whose grid the file's position embedding is stored at (None when it cannot tell)."""
    from scale_refiner.models.weights import convert_state_dict, detect_format
    try:
        source = load_checkpoint_file(path)
        pos = convert_state_dict(source, detect_format(source)).state_dict.get("pos_embed")
    except Exception:  # noqa: BLE001 -- the real load reports the problem
        return None
    if pos is None or pos.ndim != 3:
        return None
    side = int(round((pos.shape[1] - 1) ** 0.5))
    return side * patch_size if side * side == pos.shape[1] - 1 else None


def load_from_weights(name: Optional[str], weights, fmt: str = "auto",
                      img_size: Optional[int] = None) -> Tuple[VisionTransformer, RefineConfig, dict]:
    """``name`` (registered ViT) + ``weights`` (a checkpoint ``load_pretrained`` reads, or an export's weights),
    or ``name=None`` and an export (its directory or a file in it; a legacy pair's .json or .safetensors). The
    image size is ``img_size`` or the resolution the file's position embedding is stored at. Returns (encoder in
    eval mode, a config for the data, source)."""
    from scale_refiner.models.vit import resolve_model_dims
    from scale_refiner.models.weights import load_timm_export

    weights = Path(weights)
    cfg = RefineConfig()
    try:
        export = find_export(weights)
    except FileNotFoundError:
        export = None
    if name is None:
        if export is None:
            raise EvalInputError(f"--weights {weights} without --model must be an export (a directory with "
                                 f"config.json and model.safetensors, or a legacy .safetensors with its .json "
                                 f"beside it); otherwise name the model with --model")
        model = vit_from_timm(load_timm_export(weights))
        source = {"kind": "timm_export", "path": str(weights), "layout": export.layout}
        cfg.model.name = "export"
    else:
        if export is not None:
            weights = export.weights
        elif weights.is_dir():
            raise EvalInputError(f"weights {weights} is a directory but not an export (no config.json)")
        if not weights.is_file():
            raise EvalInputError(f"weights file {weights} does not exist")
        cfg.model.name = name
        cfg.model.weights, cfg.model.weights_format = str(weights), fmt
        try:
            patch = resolve_model_dims(cfg.model)["patch_size"]
        except KeyError as exc:
            raise EvalInputError(str(exc.args[0])) from exc
        cfg.model.img_size = img_size or _stored_img_size(weights, patch) or cfg.model.img_size
        model = build_vit(cfg.model)
        report = load_pretrained(model, weights, fmt)
        source = {"kind": "weights", "path": str(weights), "format": report["format"],
                  "resampled_pos_embed": report["resampled_pos_embed"]}
    size = img_size or model.img_size
    if size % model.patch_size:
        raise EvalInputError(f"--img-size {size} is not a multiple of the patch size {model.patch_size}")
    cfg.model.img_size = model.img_size
    cfg.augment.global_size = size
    return model.eval(), cfg, source
