"""Pre-train a ViT as a masked autoencoder (MAE), on the same engines, data streams and checkpoints as refining.

    python launch/pretrain_mae.py --config configs/demo_mae.yaml [key=value ...]             # one process
    deepspeed --num_gpus N launch/pretrain_mae.py --config configs/demo_mae.yaml engine.kind=deepspeed
    torchrun --nproc_per_node N launch/pretrain_mae.py --config configs/demo_mae.yaml engine.kind=fsdp2

Writes ``<run.out_dir>/mae_pretrained.pth`` in the official MAE layout (``{"model": ...}``, decoder included),
which ``launch/refine.py`` loads with ``model.weights=<that file>`` (format detected as ``mae``), and
``mae_pretrained.json`` with the recipe that produced it. When both exist and the recipe is the same, the run
is not repeated (``--force`` repeats it); ``run.resume=auto`` continues an interrupted one.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


import torch

from scale_refiner.cli.args import parse_launched, run_reporting_faults
from scale_refiner.atomic import atomic_path, atomic_write
from scale_refiner.config import ConfigError, PretrainConfig, load_config, to_dict
from scale_refiner.engine.checkpoint import (CheckpointDir, CheckpointError,
                                             read_model_state)
from scale_refiner.engine.distributed import start_job
from scale_refiner.engine.divergence import check_finite
from scale_refiner.engine.run_control import EXIT_PREEMPTED
from scale_refiner.engine.run_lock import claim_out_dir
from scale_refiner.engine.trainer import build_engine, run_stage
from scale_refiner.mae import build_mae, mae_state_dict
from scale_refiner.precision import to_device_async

log = logging.getLogger("scale_refiner")
WEIGHTS_NAME, RECIPE_NAME = "mae_pretrained.pth", "mae_pretrained.json"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pre-training recipe YAML, e.g. configs/demo_mae.yaml")
    parser.add_argument("--force", action="store_true", help="pre-train even if the same recipe's weights exist")
    parser.add_argument("--eval-samples", type=int, default=0,
                        help="train / test images of a k-NN of the encoder every run.knn_every steps and at the end "
                             "(0, the default, skips it: an MAE's k-NN is a progress signal, not its purpose)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.mae.epochs=10")
    return parse_launched(parser, argv, intermixed=True)  # --force may come after the overrides


def mae_signature(cfg: PretrainConfig) -> dict:
    """What a pre-training checkpoint must match to be resumed: the model and the whole recipe (a changed
    schedule must not pick up a finished run's weights)."""
    from scale_refiner.models.vit import resolve_model_dims
    return dict(resolve_model_dims(cfg.model), recipe=recipe_of(cfg))


def mae_inputs(batch, device, stage, step, micro=0):
    """Both global crops of every image are pre-training samples: (2, B, C, H, W)."""
    return (to_device_async(batch["global"], device),), {"step": step, "micro": micro}


# Keys added after weights files were recorded (the shipped MAE's included), with the value that does what every
# run before them did: at that value a key is left out of the recipe, so those files keep matching; any other
# value is part of the recipe. A key added later joins this list with its behaviour-preserving default.
RECIPE_KEYS_ADDED = {("model", "residual_dtype"): "compute", ("model", "float8"): False,
                     ("engine", "optimizer_impl"): "auto", ("data", "max_skipped_fraction"): 0.01}


def recipe_of(cfg: PretrainConfig) -> dict:
    """The recipe a weights file is reused for: everything but where and how often the run logs."""
    recipe = to_dict(cfg)
    for (group, key), unchanged in RECIPE_KEYS_ADDED.items():
        if recipe.get(group, {}).get(key, unchanged) == unchanged:
            recipe.get(group, {}).pop(key, None)
    for key in ("out_dir", "log_every", "save_every", "resume", "keep_checkpoints", "knn_every", "stop_after",
                "verify_checkpoint", "stop_signals", "control_every", "save_every_minutes", "timeout_minutes",
                "resume_allow_changes", "lock"):
        recipe["run"].pop(key)
    recipe["data"].pop("num_workers")
    recipe["data"].pop("shard_root")  # where the embedded shards are stored, not what they hold
    return recipe


def knn_monitor(cfg: PretrainConfig, ctx, writer, samples: int):
    """``run_stage``'s ``evaluate`` hook: k-NN@10/20 of the encoder on ``samples`` train / test images every
    ``run.knn_every`` steps, logged and written to TensorBoard as ``mae/knn_top1_k*``.
    None when ``samples`` is 0. Collective, like the refine job's: every rank extracts a share."""
    if not samples:
        return None
    from scale_refiner.data.loaders import eval_arrays
    from scale_refiner.eval.knn import knn_of_state
    with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed from the global generator
        eval_data = (eval_arrays(cfg, "train", samples, uint8=True), eval_arrays(cfg, "test", samples, uint8=True))

    def periodic_knn(engine, stage, step):
        accuracy = knn_of_state(engine.encoder_state(), cfg, ctx.device, eval_data)
        if ctx.is_main:
            for k, value in accuracy.items():
                writer.add_scalar(f"{stage}/knn_top1_k{k}", value, step)
            log.info("%s, step %d: k-NN %s (%d train / %d test images)", stage, step, accuracy,
                     len(eval_data[0][1]), len(eval_data[1][1]))
    return periodic_knn


def existing_weights(out_dir: Path, cfg: PretrainConfig):
    """The weights file of an earlier run of this very recipe, or None."""
    weights, recipe = out_dir / WEIGHTS_NAME, out_dir / RECIPE_NAME
    if weights.is_file() and recipe.is_file() and json.loads(recipe.read_text()) == recipe_of(cfg):
        return weights
    return None


def main(argv=None) -> int:
    return run_reporting_faults(_run, argv)


def _run(argv) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides, schema_class=PretrainConfig)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(cfg.run.out_dir)
    if not args.force and cfg.run.stop_after == 0 and existing_weights(out_dir, cfg) is not None:
        print(f"MAE weights of this recipe already exist: {out_dir / WEIGHTS_NAME} (reused; --force repeats)")
        return 0
    try:
        from scale_refiner.data.loaders import run_data
        run_data(cfg, evaluate=bool(args.eval_samples))  # data.dataset and the shards agree, checked first
        ctx = start_job(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # one run per directory: rank 0 locks it before anything is written there, every rank learns the outcome
    status = claim_out_dir(out_dir, ctx, lock=cfg.run.lock)
    if status:
        return status
    if ctx.is_main:
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    ctx.barrier()

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_mae(cfg)
    checkpoints = CheckpointDir(out_dir, ctx, keep=cfg.run.keep_checkpoints, verify=cfg.run.verify_checkpoint)
    if args.force:
        log.info("--force: pre-training from scratch, whatever checkpoints %s holds", out_dir)
    try:
        point = None if args.force else checkpoints.resume_point(cfg.run.resume)
    except (FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    signature = mae_signature(cfg)
    state = CheckpointDir.read_state(point) if point is not None else None
    if state is not None and state.get("model") != signature:
        print(f"error: checkpoint {point} was written for another model or recipe ({state.get('model')}), not "
              f"this one ({signature}); pre-train into a fresh run.out_dir, or pass --force to start over here",
              file=sys.stderr)
        return 2
    if ctx.is_main:  # the recipe file marks complete weights: gone until these are written
        (out_dir / RECIPE_NAME).unlink(missing_ok=True)
    ctx.barrier()

    started = time.time()
    if state is not None and state["stage_done"]:  # finished before the weights file was written: write it
        log.info("checkpoint %s ends the pre-training; writing its weights", point)
        full = read_model_state(point)
        last = {"steps": state["step"]}
    else:
        writer = None
        if ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out_dir / "tensorboard"))
        from scale_refiner.data.loaders import train_stream
        stream = train_stream(cfg, ctx.rank, ctx.world)
        engine = build_engine(model, cfg, "mae", ctx)
        periodic_knn = knn_monitor(cfg, ctx, writer, args.eval_samples)
        result = run_stage(engine, cfg, "mae", stream, ctx, writer, checkpoints, point,
                           metrics_file=out_dir / "metrics.jsonl", inputs=mae_inputs, signature=signature,
                           evaluate=periodic_knn)
        last = result.metrics
        if writer is not None:
            writer.close()
        if last["preempted"]:  # a stop signal: its checkpoint is written, every rank leaves now
            ctx.barrier()
            return EXIT_PREEMPTED
        if last["stopped"]:
            ctx.barrier()
            return 0
        full = result.end_state
    if ctx.is_main:
        check_finite(full, f"MAE weights {out_dir / WEIGHTS_NAME}")
        with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
            torch.save({"model": mae_state_dict(full)}, tmp)
        with atomic_write(out_dir / RECIPE_NAME, "w") as handle:  # written last: it marks the weights complete
            handle.write(json.dumps(recipe_of(cfg), indent=2))
        print(f"MAE pre-training: {last.get('steps', 0)} steps in {(time.time() - started) / 60:.1f} min, last loss "
              f"{last.get('loss', float('nan')):.4f}\nweights: {out_dir / WEIGHTS_NAME}   "
              f"TensorBoard: tensorboard --logdir {out_dir / 'tensorboard'}")
    ctx.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
