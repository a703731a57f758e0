"""Refine a pre-trained MIM ViT with MIM-Refiner: the heads stage, then the refine stage.

    python launch/refine.py --config configs/demo.yaml [key=value ...]                      # one process
    deepspeed --num_gpus N launch/refine.py --config configs/mae_l16.yaml                  # ZeRO-3
    torchrun --nproc_per_node N launch/refine.py --config configs/mae_l16.yaml engine.kind=fsdp2

Without a GPU the ranks run on the CPU with gloo. See docs/training.md for multi-node launches, docs/configuration.md for the recipes.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path


import torch

from scale_refiner.cli.args import parse_launched, run_reporting_faults
from scale_refiner.config import ConfigError, load_config, to_dict
from scale_refiner.engine.checkpoint import (CheckpointDir, CheckpointError,
                                             encoder_state, read_ema, read_model_state)
from scale_refiner.engine.distributed import start_job
from scale_refiner.engine.run_control import EXIT_PREEMPTED, RunControl
from scale_refiner.engine.run_lock import claim_out_dir
from scale_refiner.engine.trainer import build_engine, lost_shards, restore_client, run_stage
from scale_refiner.eval.knn import knn_of_state
from scale_refiner.refiner import (build_refiner, is_partitioned_build, load_refiner_state,
                                   refiner_inputs, refiner_signature, starting_encoder_state)

log = logging.getLogger("scale_refiner")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML in configs/")
    parser.add_argument("--eval-samples", type=int, default=10000,
                        help="train / test images of the before/after k-NN (0 skips it)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. queue.size=4096")
    return parse_launched(parser, argv)


def export(state, cfg, out_dir: Path, name: str, results: dict):
    """``export/<name>/`` in timm's hub layout, with a model card of the recipe, the data and the run's k-NN."""
    from scale_refiner.models.vit import vit_from_state
    from scale_refiner.eval.card import run_card, run_data_config
    from scale_refiner.models.weights import export_timm
    export_timm(vit_from_state(cfg.model, state), out_dir / "export", name,
                extra_config={"encoder": name, "recipe": to_dict(cfg)}, data_config=run_data_config(cfg),
                card=run_card(cfg, name, results))


def refresh_card(cfg, out_dir: Path, name: str, results: dict) -> None:
    """Rewrite ``export/<name>/README.md`` with ``results`` (the final k-NN, measured after the export)."""
    from scale_refiner.atomic import atomic_write
    from scale_refiner.eval.card import run_card
    from scale_refiner.models.weights import HUB_CARD, HUB_CONFIG, model_card
    export_dir = out_dir / "export" / name
    config = json.loads((export_dir / HUB_CONFIG).read_text())
    with atomic_write(export_dir / HUB_CARD, "w") as f:
        f.write(model_card(config, run_card(cfg, name, results)))


def end_encoder_states(point: Path):
    """The online encoder's state and the EMA encoder's (None without ``ema.pt``: the heads stage keeps none) of a
    stage-end checkpoint, memory-mapped: full tensors that the ranks of a node share, and no copy per rank."""
    online = encoder_state(point, "online")
    return online, (encoder_state(point, "ema") if read_ema(point) is not None else None)


def main(argv=None) -> int:
    return run_reporting_faults(_run, argv)


def _run(argv) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        from scale_refiner.data.loaders import run_data
        # what the run trains on is what its k-NN reads and results.json names
        data = run_data(cfg, evaluate=bool(args.eval_samples))
        ctx = start_job(cfg)
        if cfg.model.weights and not Path(cfg.model.weights).is_file():
            raise ConfigError(f"config key 'model.weights': {cfg.model.weights} does not exist")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(cfg.run.out_dir)
    # one run per directory: rank 0 locks it before anything is written there, every rank learns the outcome
    status = claim_out_dir(out_dir, ctx, lock=cfg.run.lock)
    if status:
        return status
    if ctx.is_main:
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    ctx.barrier()

    checkpoints = CheckpointDir(out_dir, ctx, keep=cfg.run.keep_checkpoints, verify=cfg.run.verify_checkpoint)
    stages = list(cfg.stages.run)
    first, resume_from, global_step, finished_client = 0, None, 0, None
    try:
        point = checkpoints.resume_point(cfg.run.resume)
    except (FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    state = CheckpointDir.read_state(point) if point is not None else None
    if state is not None:
        if state.get("model") != refiner_signature(cfg):
            print(f"error: checkpoint {point} was written for model {state.get('model')}, but this config builds "
                  f"{refiner_signature(cfg)}", file=sys.stderr)
            return 2
        if state["stage"] not in stages:
            print(f"error: checkpoint {point} is of stage {state['stage']!r}, not in stages.run {stages}",
                  file=sys.stderr)
            return 2
    finished = state is not None and state["stage_done"]

    torch.manual_seed(cfg.run.seed)  # identical initial weights (heads, non-loaded parts) on every rank
    # Under ZeRO-3 and FSDP2 built partitioned: no rank holds the whole model (build_refiner); a finished stage's
    # end state replaces the pre-trained weights, which are then not read at all
    refiner = build_refiner(cfg, load_weights=not finished, partitioned=True)
    if state is not None:
        first = stages.index(state["stage"])
        if finished:  # start the next stage from this one's end state
            # mmap: the ranks of a node share one page-cache copy of the full state instead of one each, and a
            # partitioned refiner reads only its partitions (ZeRO-3) or shards (FSDP2) of it
            end_state = read_model_state(point)
            if cfg.queue.sharded:  # rank 0's shards: each rank's own come from its client file just below
                # (engine.load on resume may load rank 0's shard too: a warning, then restore_client fixes it)
                end_state = {k: v for k, v in end_state.items() if not k.startswith("queues.")}
            if is_partitioned_build(refiner):
                missing, unexpected = load_refiner_state(refiner, end_state, strict=False)
            else:
                missing, unexpected = refiner.load_state_dict(end_state, strict=not cfg.queue.sharded)
            if unexpected or any(not k.startswith("queues.") for k in missing):
                raise RuntimeError(f"model_state.pt does not match: missing {missing}, unexpected {unexpected}")
            del end_state
            finished_client = checkpoints.load_client(point)
            restore_client(refiner, finished_client)  # the reader position: once the stream exists, below
            first, global_step = first + 1, state["global_step"]
        else:
            resume_from = point
        log.info("resuming from %s (stage %s, step %d)", point, state["stage"], state["step"])

    writer, eval_data, results = None, None, {}
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out_dir / "tensorboard"))
    results["dataset"] = data.describe()
    if args.eval_samples:  # every rank: the k-NN is shared out over them
        from scale_refiner.data.loaders import eval_arrays
        with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed from the global generator
            eval_data = (eval_arrays(cfg, "train", args.eval_samples, uint8=True),
                         eval_arrays(cfg, "test", args.eval_samples, uint8=True))
        results["dataset"].update(n_train=len(eval_data[0][1]), n_test=len(eval_data[1][1]))
        log.info("k-NN evaluation on %s: %d train images (the bank), %d test images", data.dataset,
                 len(eval_data[0][1]), len(eval_data[1][1]))
        if point is None:
            results["before"] = knn_of_state(starting_encoder_state(refiner, cfg), cfg, ctx.device, eval_data)
            log.info("k-NN before refinement: %s", results["before"])

    from scale_refiner.data.loaders import train_stream
    stream = train_stream(cfg, ctx.rank, ctx.world)
    if finished_client is not None:
        stream.load_state_dict(json.loads(finished_client["data"]))
    def periodic_knn(engine, stage, step):
        """k-NN of the online encoder on the held-out (test) split, next to the NN accuracy in TensorBoard."""
        if eval_data is None:
            return
        accuracy = knn_of_state(engine.encoder_state(), cfg, ctx.device, eval_data)  # collective, like the gather
        if ctx.is_main:
            for k, value in accuracy.items():
                writer.add_scalar(f"{stage}/knn_top1_k{k}", value, step)
            log.info("%s, global step %d: k-NN %s", stage, step, accuracy)

    started = time.time()
    final_point = point  # the checkpoint whose end state the run ends with: the last stage's end
    for stage in stages[first:]:
        engine = build_engine(refiner, cfg, stage, ctx)
        result = run_stage(engine, cfg, stage, stream, ctx, writer, checkpoints, resume_from, global_step,
                         metrics_file=out_dir / "metrics.jsonl", evaluate=periodic_knn, inputs=refiner_inputs,
                         signature=refiner_signature(cfg))
        last = result.metrics
        resume_from, global_step = None, last["global_step"]
        results[f"{stage}_last"] = last
        if last["preempted"]:  # a stop signal: its checkpoint is written, every rank leaves now
            ctx.barrier()
            return EXIT_PREEMPTED
        if last["stopped"]:
            ctx.barrier()
            return 0
        final_point = checkpoints.root / f"{stage}-end"
        if stage == stages[-1]:
            break
        # A fresh, unwrapped refiner for the next stage: the engine's sharding is not undone in place.
        if engine.can_hand_off:
            # ZeRO-3 / FSDP2: built partitioned alike (zero.Init / a meta encoder) and given the engine's fp32
            # partitions or shards, rank by rank: no full copy. Rank 0's gathered end state is in model_state.pt
            # by now: dropped before the next build.
            result = None
            refiner = build_refiner(cfg, load_weights=False, partitioned=True)
            engine.hand_off(refiner)
        else:  # the full end state, which these engines hold on every rank
            refiner = build_refiner(cfg, load_weights=False)
            refiner.load_state_dict(result.end_state)
        # The old model and its partitions go before the next engine is set up: DeepSpeed holds on to a ZeRO-3
        # model (close), and its engine and optimiser hold it in reference cycles (collected now, not later)
        engine.close()
        del engine
        gc.collect()

    if cfg.data.on_error == "skip":  # the data the run could not read, by shard (collective)
        results["data_lost"] = lost_shards(stream, ctx)
        if ctx.is_main and results["data_lost"]:
            writer.add_text("data/lost_samples_by_shard", "\n".join(
                f"{shard}: {count}" for shard, count in sorted(results["data_lost"].items())), global_step)
    # What the run ends with, from the last stage's end checkpoint, memory-mapped: every rank reads the same
    # page-cache copy for its share of the k-NN, and rank 0 writes the exports from it. The exports come first:
    # they take seconds, the k-NN can take longer than a launcher's 30 s between SIGTERM and SIGKILL.
    online, ema_state = end_encoder_states(final_point)
    if ctx.is_main:
        export(online, cfg, out_dir, "online", results)
        if ema_state is not None:
            export(ema_state, cfg, out_dir, "ema", results)
    # A stop signal after training (agreed by the ranks before each k-NN) ends the run with status 75 and the
    # evaluations done so far in results.json; the same command with run.resume=auto evaluates again.
    control, stopped = RunControl(ctx), None
    for name, state in (("online", online), ("ema", ema_state)):
        if eval_data is None or state is None:
            continue
        if control.poll(0)[1]:
            stopped = control.signal
            break
        results[name] = knn_of_state(state, cfg, ctx.device, eval_data)
    if ctx.is_main:
        for name in ("online", "ema") if eval_data is not None else ():
            if (out_dir / "export" / name).is_dir():
                refresh_card(cfg, out_dir, name, results)  # the cards written before the k-NN, now with it
        results["minutes"] = (time.time() - started) / 60
        if stopped:
            results["stopped"] = (f"{stopped} during the final evaluation: training and exports are complete; "
                                  f"run the same command with run.resume=auto to evaluate again")
            log.info("%s", results["stopped"])
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        writer.close()
        print("\n| encoder | k-NN@10 | k-NN@20 |\n|---|---|---|")
        for name in ("before", "online", "ema"):
            if name in results:
                print(f"| {name} | {100 * results[name]['10']:.1f} | {100 * results[name]['20']:.1f} |")
        print(f"\nTensorBoard: tensorboard --logdir {out_dir / 'tensorboard'}   exports: {out_dir / 'export'}")
    ctx.barrier()
    return EXIT_PREEMPTED if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
