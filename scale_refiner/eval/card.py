"""What a refine run's exports say about the run: the preprocessing it trained with (their ``pretrained_cfg``) and
the contents of their model card (``models.weights.model_card``): the recipe, the data and the k-NN results."""
from __future__ import annotations

from pathlib import Path

from scale_refiner.config import RefineConfig


def run_data_config(cfg: RefineConfig) -> dict:
    """timm ``pretrained_cfg`` entries of the preprocessing the run's pipelines apply (``data.augment``): RGB
    ``augment.global_size`` crops (= ``model.img_size``), bicubic, evaluated as a resize to that size and a centre
    crop (crop_pct 1), ImageNet mean / std."""
    from scale_refiner.data.augment import IMAGENET_MEAN, IMAGENET_STD
    size = cfg.augment.global_size
    return {"input_size": [cfg.model.in_chans, size, size], "interpolation": "bicubic", "crop_pct": 1.0,
            "crop_mode": "center", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def _dataset_size(dataset: dict) -> dict:
    """The train / test split sizes of ``results["dataset"]``: the embedded Fashion-MNIST's, or its shard sets'
    manifests (read without re-checking the shards: the run checked them at its start)."""
    from scale_refiner.data.manifest import load_manifest
    sizes = {}
    for split in ("train", "test"):
        where = dataset.get(split)
        if where == "embedded":
            sizes[f"{split} images"] = {"train": 60000, "test": 10000}[split]  # Fashion-MNIST, 28x28 greyscale
        elif where:
            try:
                sizes[f"{split} images"] = load_manifest(where, verify="none").split(split).num_samples
            except Exception:  # noqa: BLE001 -- the card leaves out what it cannot read; the export still happens
                pass
    return sizes


def run_card(cfg: RefineConfig, name: str, results: dict) -> dict:
    """``model_card``'s ``card`` for export ``name`` (``online`` or ``ema``) of a refine run: its recipe (``cfg``, a
    ``RefineConfig``), its data and its k-NN results (``results``: what the run writes to results.json)."""
    stages = ", ".join(f"{stage} {getattr(cfg.stages, stage).epochs:g} epochs" for stage in cfg.stages.run)
    recipe = {"model": f"{cfg.model.name} ({cfg.model.arch}), {cfg.model.img_size} px",
              "starting weights": Path(cfg.model.weights).name if cfg.model.weights else "none (random init)",
              "stages": stages, "batch size": cfg.data.batch_size,
              "samples per epoch": cfg.data.samples_per_epoch or "the whole train split",
              "engine / precision": f"{cfg.engine.kind} / {cfg.engine.precision}", "seed": cfg.run.seed}
    if "refine" in cfg.stages.run:
        recipe["refine EMA"] = cfg.stages.refine.ema
    dataset = results.get("dataset") or {}
    data = {"data set": dataset.get("name", cfg.data.dataset), **_dataset_size(dataset)}
    knn = {label: results[key] for key, label in (("before", "before refinement"), ("online", "online"),
                                                   ("ema", "EMA")) if isinstance(results.get(key), dict)}
    note = ("Top-1 accuracy of the run's weighted k-NN (votes exp(cosine similarity / 0.07)) on the final CLS token, "
            "standardised with the bank's mean and std")
    if "n_train" in dataset:
        note += f"; {dataset['n_train']} train images are the bank, {dataset['n_test']} test images are scored"
    return {"title": f"MIM-Refiner {cfg.model.name}, {'EMA' if name == 'ema' else name} encoder",
            "encoder": "EMA encoder" if name == "ema" else f"{name} encoder",
            "recipe": recipe, "data": data, "knn": knn, "knn_note": note + "."}
