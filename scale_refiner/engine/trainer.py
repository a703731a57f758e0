"""One stage, top to bottom: build the engine -> (resume) -> schedule -> forward -> backward -> step -> EMA
-> log -> checkpoint. The same loop drives every engine (single process, DeepSpeed ZeRO, FSDP2) and both
models: the refiner's ``heads`` and ``refine`` stages and MAE pre-training's ``mae`` stage."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from torch import nn

from scale_refiner.config import RefineConfig, StageConfig, accumulation_steps
from scale_refiner.engine.base import Engine
from scale_refiner.engine.checkpoint import CheckpointDir, read_ema, rng_state, set_rng_state
from scale_refiner.engine.distributed import DistContext, resolve_precision
from scale_refiner.engine.divergence import NonFiniteGuard
from scale_refiner.engine.ema import EncoderEMA
from scale_refiner.engine.optim import param_groups, scaled_lr, warmup_cosine
from scale_refiner.engine.run_control import RunControl, describe_stop
from scale_refiner.engine.watchdog import Watchdog

log = logging.getLogger("scale_refiner")


@dataclass
class StagePlan:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float


def plan_stage(stage: StageConfig, samples_per_epoch: int, global_batch: int, max_steps: int = 0) -> StagePlan:
    steps_per_epoch = samples_per_epoch // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"an epoch of {samples_per_epoch} samples is smaller than one global batch "
                         f"({global_batch}); lower data.batch_size")
    total = max(1, math.ceil(stage.epochs * steps_per_epoch))
    if max_steps:
        total = min(total, max_steps)
    return StagePlan(steps_per_epoch, total, int(stage.warmup_epochs * steps_per_epoch),
                     scaled_lr(stage.base_lr, global_batch))


def build_engine(model: nn.Module, cfg: RefineConfig, name: str, ctx: DistContext) -> Engine:
    """Freeze for the stage, build the stage's parameter groups, wrap in the configured engine.
    ``model``: a ``MIMRefiner`` (stages heads, refine) or an ``MAEPretrainer`` (stage mae)."""
    stage: StageConfig = getattr(cfg.stages, name)
    model.set_stage(name, cfg.model.freeze_blocks)
    groups = param_groups(model.encoder, model.heads, model.encoder.depth, stage.weight_decay,
                          stage.head_weight_decay, stage.layer_decay, heads_prefix=model.heads_prefix)
    dtype = resolve_precision(cfg.engine.precision, ctx.device)
    reduce_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.engine.reduce_dtype]
    accumulation = accumulation_steps(cfg, ctx.world)
    if cfg.engine.kind == "single":
        from scale_refiner.engine.single import SingleEngine
        return SingleEngine(model.to(ctx.device), groups, stage.betas, ctx, dtype, accumulation,
                            optimizer_impl=cfg.engine.optimizer_impl)
    if cfg.engine.kind == "deepspeed":
        from scale_refiner.engine.zero import ZeroEngine, load_ds_config
        return ZeroEngine(model, groups, stage.betas, ctx, dtype, load_ds_config(cfg.engine.zero_config),
                          micro_batch=cfg.data.batch_size // ctx.world // accumulation, clip_grad=stage.clip_grad,
                          accumulation=accumulation, reduce_dtype=reduce_dtype,
                          optimizer_impl=cfg.engine.optimizer_impl)
    from scale_refiner.engine.fsdp import FSDPEngine
    return FSDPEngine(model, groups, stage.betas, ctx, dtype, accumulation, reduce_dtype,
                      replicate=cfg.engine.fsdp_replicate, replicate_frozen=cfg.engine.replicate_frozen,
                      optimizer_impl=cfg.engine.optimizer_impl)


def micro_batches(batch: Dict[str, torch.Tensor], parts: int):
    """A stream batch cut into ``parts`` equal micro-batches along the sample dimension (dim 1 of the view-major
    crops, dim 0 of everything else); the batch itself when ``parts`` is 1."""
    if parts == 1:
        return [batch]
    pieces = {key: value.chunk(parts, dim=1 if key in ("global", "local") else 0) for key, value in batch.items()}
    return [{key: pieces[key][i] for key in batch} for i in range(parts)]


@dataclass
class StageResult:
    """What ``run_stage`` gives back: the last logged metrics (averaged over ranks; with ``steps``,
    ``global_step``, ``stopped``, ``preempted``), the EMA of the refine stage (None otherwise), and the full model
    state when the stage ran to its end (None otherwise, and on ranks other than 0 under ZeRO-3 and FSDP2)."""
    metrics: Dict
    ema: Optional[EncoderEMA] = None
    end_state: Optional[Dict[str, torch.Tensor]] = None


class DataLossError(RuntimeError):
    """More of the data was lost to unreadable shards than ``data.max_skipped_fraction`` allows (the message names
    them)."""


def lost_shards(stream, ctx: DistContext) -> Dict[str, int]:
    """Shard -> samples lost on any rank so far (collective: each rank knows only the shards it reads)."""
    mine = dict(getattr(stream, "lost_by_shard", {}))
    if ctx.world == 1:
        return mine
    every: list = [None] * ctx.world
    dist.all_gather_object(every, mine, group=ctx.control_group)
    merged: Dict[str, int] = {}
    for part in every:
        for shard, count in (part or {}).items():
            merged[shard] = merged.get(shard, 0) + count
    return merged


def check_data_loss(skipped: int, consumed: int, limit: float, stream, ctx: DistContext) -> None:
    """``skipped`` samples lost (summed over ranks) against ``consumed`` trained on: past ``limit``
    (``data.max_skipped_fraction``) of what the run tried to read, every rank raises ``DataLossError`` naming the
    shards (collective only then: every rank sees the same reduced counts)."""
    tried = skipped + consumed
    if not tried or skipped / tried <= limit:
        return
    lost = lost_shards(stream, ctx)
    named = ", ".join(f"{shard} ({count})" for shard, count in sorted(lost.items(), key=lambda kv: -kv[1])[:8])
    more = " ..." if len(lost) > 8 else ""
    raise DataLossError(f"{skipped} of {tried} samples read so far were lost to unreadable data "
                        f"({skipped / tried:.1%}, more than data.max_skipped_fraction={limit}): "
                        f"{named or 'single bad samples'}{more}; rewrite those shards (make_shards) or raise "
                        f"data.max_skipped_fraction")


class ResumeError(ValueError):
    """A checkpoint that this configuration must not continue (the message names the key)."""


def run_signature(cfg: RefineConfig, engine: Engine, plan: StagePlan) -> Dict:
    """What a mid-stage resume must keep for the step counter to mean the same thing: the global batch, the
    stage's schedule and the engine whose files the checkpoint holds."""
    return {"data.batch_size": cfg.data.batch_size, "engine.kind": cfg.engine.kind,
            "schedule": {"total_steps": plan.total_steps, "warmup_steps": plan.warmup_steps,
                         "steps_per_epoch": plan.steps_per_epoch, "peak_lr": plan.peak_lr}}


def check_resume(saved: Optional[Dict], now: Dict, allowed, path) -> None:
    """Refuse to continue a stage whose checkpoint was written with another global batch, schedule or engine
    (``run.resume_allow_changes`` lists the ones to accept). A checkpoint from before this was recorded passes."""
    if saved is None:
        log.warning("checkpoint %s records no batch size, schedule or engine: resuming unchecked", path)
        return
    for key in ("data.batch_size", "schedule", "engine.kind"):
        if saved.get(key) != now[key]:
            if key in allowed:
                log.warning("resuming %s with %s changed (%s -> %s): allowed by run.resume_allow_changes", path,
                            key, saved.get(key), now[key])
                continue
            raise ResumeError(f"checkpoint {path} was written with {key} = {saved.get(key)}, this run has "
                              f"{now[key]}: resuming would change what its step counter means; restore the "
                              f"setting, or allow it deliberately with run.resume_allow_changes=[{key}]")


def client_state(model: nn.Module, stream=None) -> Dict:
    """What each rank keeps for itself: its buffers (BN statistics differ per rank with plain BN), the queues
    with their pick generators (the refiner's; MAE has none), every RNG state and its reader position."""
    queues = model.queues.state_dict() if model.queues is not None else {}
    return {"buffers": {n: b.detach().cpu().clone() for n, b in model.named_buffers()},
            "queues": {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in queues.items()},
            "rng": rng_state(), "data": json.dumps(stream.state_dict() if stream is not None else {})}


def restore_client(model: nn.Module, client: Dict, stream=None) -> None:
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(client["buffers"][n])
    if model.queues is not None:
        model.queues.load_state_dict(client["queues"])
    set_rng_state(client["rng"])
    if stream is not None:
        stream.load_state_dict(json.loads(client.get("data", "{}")))


def _mean_over_ranks(metrics: Dict[str, torch.Tensor], ctx: DistContext) -> Dict[str, float]:
    names = sorted(metrics)
    values = torch.stack([metrics[n].detach().float().reshape(()) for n in names])
    if ctx.world > 1:
        dist.all_reduce(values)
        values /= ctx.world
    return dict(zip(names, values.tolist()))


def run_stage(engine: Engine, cfg: RefineConfig, name: str, stream, ctx: DistContext, writer=None,
              checkpoints: Optional[CheckpointDir] = None,
              resume_from: Optional[Path] = None, global_offset: int = 0,
              metrics_file: Optional[Path] = None, evaluate=None, *, inputs, signature: Dict) -> "StageResult":
    """Train one stage (``heads``, ``refine`` or ``mae``) on ``stream`` (data/loaders.py:
    ``batches(epoch, start_batch)`` yields this rank's batches, ``samples_per_epoch`` is global).
    ``inputs(batch, device, stage_config, global_step, micro)`` turns a (micro-)batch into the model's forward
    arguments (``micro``: its index within the step, 0 without accumulation);
    ``signature`` is what a checkpoint must match to be resumed (``refiner.refiner_signature``, ``mae_signature``).
    What it trains may have ``finish_stage()``, called once after the last step, before the end state is taken.
    Rank 0 appends every logged step's metrics (averaged over ranks) to ``metrics_file`` as JSON lines.
    ``evaluate(engine, name, global_step)`` (collective) runs every ``run.knn_every`` steps.

    Returns a ``StageResult``: the last logged metrics (plus ``steps``, ``global_step``, ``stopped``,
    ``preempted``), the EMA (refine stage) and, when the stage ran to its end, the full model state (under ZeRO-3
    and FSDP2 gathered to rank 0 only: None on the other ranks).
    """
    watchdog = Watchdog(cfg.run.timeout_minutes)
    try:
        return _run_stage(engine, cfg, name, stream, ctx, writer, checkpoints, resume_from, global_offset,
                          metrics_file, evaluate, inputs, signature, watchdog)
    finally:
        watchdog.pause()  # whichever way the stage ends: an armed timer would end the process later


def _run_stage(engine, cfg, name, stream, ctx, writer, checkpoints, resume_from, global_offset, metrics_file,
               evaluate, inputs, signature, watchdog) -> "StageResult":
    stage: StageConfig = getattr(cfg.stages, name)
    model = engine.model
    engine.module.train()
    plan = plan_stage(stage, stream.samples_per_epoch, cfg.data.batch_size, cfg.run.max_steps)
    ema = EncoderEMA(engine, stage.ema) if name == "refine" else None
    end_state = None
    step = 0
    if resume_from is not None:
        state = CheckpointDir.read_state(resume_from)
        check_resume(state.get("schedule"), run_signature(cfg, engine, plan), cfg.run.resume_allow_changes,
                     resume_from)
        engine.load(resume_from)
        restore_client(model, checkpoints.load_client(resume_from), stream)
        if ema is not None:
            ema.load_full_state(read_ema(resume_from))  # every rank reads it: one page-cache copy
        step, global_offset = state["step"], state["global_step"] - state["step"]
        log.info("resumed stage %s at step %d from %s", name, step, resume_from)
    log.info("stage %s on %s (%d ranks, %s): %d steps (%d per epoch, %d warm-up), peak lr %.3g", name,
             engine.kind, ctx.world, engine.dtype, plan.total_steps, plan.steps_per_epoch, plan.warmup_steps,
             plan.peak_lr)

    control = RunControl(ctx, cfg.run.save_every_minutes, cfg.run.control_every)
    guard = NonFiniteGuard(ctx, name)

    def save(tag: str, model_state=None):
        guard.check()  # never a checkpoint (nor `latest`, nor the exports made from it) after a non-finite step
        watching = watchdog.armed
        watchdog.pause()  # a 2B checkpoint can take minutes; the collective timeout still covers it
        checkpoints.save(tag, engine, {"stage": name, "step": step, "global_step": global_offset + step,
                                       "stage_done": step >= plan.total_steps, "model": signature,
                                       "schedule": run_signature(cfg, engine, plan)},
                         client_state(model, stream), ema, model_state)
        control.saved()
        if watching:  # (the stage-end save comes after the loop: the watchdog stays off then)
            watchdog.beat()

    last: Dict[str, float] = {}
    progress = tqdm(total=plan.total_steps, initial=step, desc=name, dynamic_ncols=True,
                    disable=not ctx.is_main or None)
    tick, logged_at = time.perf_counter(), step
    device = ctx.device
    stop, skipped_logged = False, 0
    watchdog.beat()
    while step < plan.total_steps:
        epoch, start_batch = divmod(step, plan.steps_per_epoch)
        step_at_epoch_start = step
        for batch in stream.batches(epoch, start_batch):
            lr = warmup_cosine(step, plan.total_steps, plan.warmup_steps, plan.peak_lr)
            engine.set_lr(lr)
            metrics = {}
            for index, micro in enumerate(micro_batches(batch, engine.accumulation)):
                args, kwargs = inputs(micro, device, stage, global_offset + step, index)
                loss, micro_metrics = engine.forward(*args, **kwargs)
                engine.backward(loss)
                for key, value in micro_metrics.items():  # tensors: summed on the device, read when logged
                    metrics[key] = metrics[key] + value if key in metrics else value
            if engine.accumulation > 1:
                metrics = {key: value / engine.accumulation for key, value in metrics.items()}
            grad_norm = engine.step(stage.clip_grad)
            if ema is not None:
                ema.update()
            step += 1
            progress.update(1)
            guard.observe(step, dict(metrics, grad_norm=grad_norm))  # device operations: no sync
            if step % cfg.run.log_every == 0 or step == plan.total_steps:
                if cfg.data.on_error == "skip":  # summed over ranks: the mean times the world
                    metrics = dict(metrics, **{"data/skipped_samples": torch.tensor(
                        float(getattr(stream, "skipped_samples", 0)), device=metrics["loss"].device)})
                last = _mean_over_ranks(metrics, ctx)
                guard.check()  # the step synchronised above: reading the flags costs nothing more
                if "data/skipped_samples" in last:
                    last["data/skipped_samples"] = round(last["data/skipped_samples"] * ctx.world)
                    if last["data/skipped_samples"] > skipped_logged and ctx.is_main:
                        log.warning("%d samples lost so far to unreadable data (data.on_error=skip; each rank "
                                    "names the shards it reads)", last["data/skipped_samples"])
                    skipped_logged = last["data/skipped_samples"]
                    check_data_loss(skipped_logged, step * cfg.data.batch_size, cfg.data.max_skipped_fraction,
                                    stream, ctx)
                elapsed = time.perf_counter() - tick
                last.update(lr=lr, grad_norm=float(grad_norm), step_time_s=elapsed / (step - logged_at),
                            images_per_s=(step - logged_at) * cfg.data.batch_size / max(elapsed, 1e-9))
                tick, logged_at = time.perf_counter(), step
                if ctx.is_main:
                    # the NN accuracy only where the model reports one (the refiner's queue; not MAE)
                    nn_acc = last.get("final/nn_accuracy")
                    progress.set_postfix(loss=f"{last['loss']:.3f}",
                                         **({"nn_acc": f"{nn_acc:.2f}"} if nn_acc is not None else {}))
                    log.info("%s step %d/%d loss %.4f%s lr %.3g %.1f img/s", name, step, plan.total_steps,
                             last["loss"], f" final nn-acc {nn_acc:.3f}" if nn_acc is not None else "", lr,
                             last["images_per_s"])
                    if writer is not None:
                        for key, value in last.items():
                            writer.add_scalar(f"{name}/{key}", value, global_offset + step)
                    if metrics_file is not None:
                        with open(metrics_file, "a") as handle:
                            handle.write(json.dumps(dict(last, stage=name, step=step)) + "\n")
            if evaluate is not None and cfg.run.knn_every and step % cfg.run.knn_every == 0:
                watchdog.pause()
                evaluate(engine, name, global_offset + step)
                watchdog.beat()
            save_now, stop = control.poll(step)  # a stop signal on any rank, or save_every_minutes elapsed
            stopping = stop or (step == cfg.run.stop_after and step < plan.total_steps)
            if checkpoints is not None and step < plan.total_steps and (
                    stopping or save_now or (cfg.run.save_every and step % cfg.run.save_every == 0)):
                save(f"{name}-{step:07d}")
            watchdog.beat()
            if stopping or step >= plan.total_steps:
                break
        if step == step_at_epoch_start:
            raise RuntimeError(f"the {type(stream).__name__} yielded no batch in epoch {epoch} of stage {name}")
        if stop or (cfg.run.stop_after and step == cfg.run.stop_after):
            break
    watchdog.pause()
    progress.close()
    last["steps"] = step
    last["global_step"] = global_offset + step
    last["stopped"] = step < plan.total_steps
    last["preempted"] = control.signal  # None unless a stop signal ended the stage early or at its last step
    if last["stopped"]:
        why = describe_stop(control.signal) if stop else "run.stop_after"
        log.info("stopped after step %d of stage %s (%s)%s; resume with run.resume=auto", step, name, why,
                 ", checkpoint written" if checkpoints is not None else "")
    else:
        finish = getattr(model, "finish_stage", None)
        if finish is not None:
            finish()  # e.g. the refiner folds the last step's async-BN statistics into the running ones
        # gathered once: the stage-end checkpoint, the next stage and the exports all start from it. ZeRO-3 gathers
        # it to rank 0 only, one parameter at a time (None on the other ranks): the next stage takes its weights
        # partition by partition (ZeroEngine.hand_off), the exports read the checkpoint
        guard.check()  # before the gather: every rank agrees, none is left waiting in it
        end_state = engine.stage_end_state()
        if checkpoints is not None:
            save(f"{name}-end", model_state=end_state)
        if stop:
            log.info("%s at the last step of stage %s: its end checkpoint is written; resume with "
                     "run.resume=auto", describe_stop(control.signal), name)
    last["steps"] = step
    last["global_step"] = global_offset + step
    return StageResult(metrics=last, ema=ema, end_state=end_state)
