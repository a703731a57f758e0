"""The training loop of one stage, top to bottom: schedule -> forward -> backward -> step -> EMA -> log.

This is the single-process engine (``engine.kind=single``); the sharded engines wrap the same refiner.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from scale_refiner.config import RefineConfig, StageConfig
from scale_refiner.engine.ema import EncoderEMA
from scale_refiner.engine.optim import param_groups, scaled_lr, warmup_cosine
from scale_refiner.refiner import MIMRefiner

log = logging.getLogger("scale_refiner")


@dataclass
class StagePlan:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float


def plan_stage(stage: StageConfig, samples_per_epoch: int, global_batch: int) -> StagePlan:
    steps_per_epoch = samples_per_epoch // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"an epoch of {samples_per_epoch} samples is smaller than one global batch "
                         f"({global_batch}); lower data.batch_size")
    return StagePlan(steps_per_epoch, max(1, math.ceil(stage.epochs * steps_per_epoch)),
                     int(stage.warmup_epochs * steps_per_epoch), scaled_lr(stage.base_lr, global_batch))


def build_optimizer(refiner: MIMRefiner, stage: StageConfig) -> torch.optim.Optimizer:
    groups = param_groups(refiner.encoder, refiner.heads, refiner.encoder.depth, stage.weight_decay,
                          stage.head_weight_decay, stage.layer_decay)
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(stage.betas))


def run_stage(refiner: MIMRefiner, cfg: RefineConfig, name: str, batches: Callable[[int], Iterator[Dict]],
              samples_per_epoch: int, writer: Optional[SummaryWriter], device: torch.device,
              global_step_offset: int = 0) -> Dict[str, float]:
    """Train one stage (``heads`` or ``refine``). ``batches(epoch)`` yields collated multi-crop batches.

    Returns the last logged metrics. The EMA (refine stage) is left on ``refiner.ema``.
    """
    stage: StageConfig = getattr(cfg.stages, name)
    refiner.set_stage(name, cfg.model.freeze_blocks)
    refiner.train()
    plan = plan_stage(stage, samples_per_epoch, cfg.data.batch_size)
    if cfg.run.max_steps:
        plan.total_steps = min(plan.total_steps, cfg.run.max_steps)
    optimizer = build_optimizer(refiner, stage)
    ema = EncoderEMA(refiner.encoder, stage.ema) if name == "refine" else None
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    log.info("stage %s: %d steps (%d per epoch, %d warm-up), peak lr %.3g, %d trainable tensors",
             name, plan.total_steps, plan.steps_per_epoch, plan.warmup_steps, plan.peak_lr, len(trainable))

    step, last, logged_at = 0, {}, 0
    progress = tqdm(total=plan.total_steps, desc=name, dynamic_ncols=True, disable=None)
    epoch = 0
    tick = time.perf_counter()
    while step < plan.total_steps:
        for batch in batches(epoch):
            if step >= plan.total_steps:
                break
            lr = warmup_cosine(step, plan.total_steps, plan.warmup_steps, plan.peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            loss, metrics = refiner(batch["global"].to(device, non_blocking=True),
                                    batch["local"].to(device, non_blocking=True),
                                    batch["index"].to(device), batch["label"].to(device),
                                    topk=stage.topk, step=global_step_offset + step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, stage.clip_grad or float("inf"))
            optimizer.step()
            if ema is not None:
                ema.update(refiner.encoder)
            step += 1
            progress.update(1)
            if step % cfg.run.log_every == 0 or step == plan.total_steps:
                elapsed = time.perf_counter() - tick
                last = {k: float(v) for k, v in metrics.items()}
                last.update(lr=lr, grad_norm=float(grad_norm),
                            images_per_s=(step - logged_at) * cfg.data.batch_size / max(elapsed, 1e-9))
                tick, logged_at = time.perf_counter(), step
                progress.set_postfix(loss=f"{last['loss']:.3f}", nn_acc=f"{last.get('final/nn_accuracy', 0):.2f}")
                log.info("%s step %d/%d loss %.4f final nn-acc %.3f lr %.3g %.1f img/s", name, step,
                         plan.total_steps, last["loss"], last.get("final/nn_accuracy", float("nan")), lr,
                         last["images_per_s"])
                if writer is not None:
                    for key, value in last.items():
                        writer.add_scalar(f"{name}/{key}", value, global_step_offset + step)
        epoch += 1
    progress.close()
    refiner.ema = ema
    last["steps"] = step
    return last
