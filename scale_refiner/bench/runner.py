"""Throughput / MFU benchmark of a recipe: the real refiner and engine, synthetic batches, timed steps.

The refiner and engine are built exactly as the main job builds them (``build_refiner`` +
``engine.trainer.build_engine``); batches are random tensors of the recipe's crop sizes, made once on the host
(pinned on a GPU machine) and copied to the device every step, so ``h2d`` is a real copy but there is no data
loading or augmentation (measure that with ``launch/bench_data.py``). Each step does what ``run_stage`` does:
set_lr, forward, backward, step, EMA (refine stage).

Breakdown regions (ms per step): ``h2d``, ``forward`` (which contains ``lookup``, the NN-queue lookups, and
``head_norm_comm``, the head-norm collectives), ``backward`` (contains the backward half of SyncBN's
all-reduces, counted in ``head_norm_comm`` too), ``step`` (clip + optimiser, ZeRO / FSDP communication of
the step included), ``ema``. ``head_norm_comm`` is the time inside ``dist.all_reduce`` calls made by the heads'
norms (SyncBN forward and backward, the async-BN flush / wait); with one rank it is 0.
"""
from __future__ import annotations

import copy
import gc
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from scale_refiner.bench.flops import step_flops
from scale_refiner.bench.timers import (StageTimer, allocated_memory_gb, available_memory_gb, current_rss_gb,
                                        device_peak_tflops, peak_memory, reset_peak_memory, sync)

log = logging.getLogger("scale_refiner.bench")

IMAGENET_TRAIN = 1_281_167
RESULT_KEYS = ("config", "engine", "stage", "variant", "world", "device", "device_name", "dtype",
               "per_rank_batch", "global_batch", "steps", "warmup", "step_time_s", "images_per_s_per_rank",
               "images_per_s", "crops_per_s_per_rank", "tokens_per_s_per_rank", "flops",
               "model_tflops_per_rank", "hardware_tflops_per_rank", "peak_tflops", "peak_source", "mfu",
               "peak_memory_gb", "memory_kind", "resting_memory_gb", "breakdown_ms", "gpu_hours", "data")


# --------------------------------------------------------------------------------------------- batches
def synthetic_batch(cfg, per_rank: int, device: torch.device, rank: int = 0) -> Dict[str, torch.Tensor]:
    """Random crops at the recipe's sizes on the host (pinned where a GPU is): global (2, B, 3, G, G),
    local (n, B, 3, l, l), label, index."""
    g, l, n = cfg.augment.global_size, cfg.augment.local_size, cfg.augment.num_local
    gen = torch.Generator().manual_seed(1234 + rank)
    batch = {"global": torch.randn(2, per_rank, cfg.model.in_chans, g, g, generator=gen),
             "local": torch.randn(n, per_rank, cfg.model.in_chans, l, l, generator=gen),
             "label": torch.randint(0, 1000, (per_rank,), generator=gen),
             "index": torch.arange(per_rank)}
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


# ------------------------------------------------------------------------------------- instrumentation
class Instruments:
    """Times the NN-queue lookups (instance wrappers) and the head-norm all-reduces (a wrapper on
    ``torch.distributed.all_reduce`` that attributes a call to the heads when it comes from
    ``scale_refiner/heads`` or from ``torch.distributed.nn`` (SyncBN's autograd all-reduce))."""

    def __init__(self, refiner, timer: StageTimer):
        self.timer = timer
        self.comm_calls = 0
        self._restore = []
        for queue in refiner.queues:
            original = queue.lookup

            def timed(*args, _original=original, **kwargs):
                with timer("lookup"):
                    return _original(*args, **kwargs)
            queue.lookup = timed
            self._restore.append((queue, "lookup"))
        self._orig_all_reduce = dist.all_reduce
        instruments = self

        def all_reduce(*args, **kwargs):
            if not instruments._from_heads():
                return instruments._orig_all_reduce(*args, **kwargs)
            instruments.comm_calls += 1
            if kwargs.get("async_op", False):  # launch cost only; the wait is timed by the coordinator wrap
                start = time.perf_counter()
                out = instruments._orig_all_reduce(*args, **kwargs)
                timer.add("head_norm_comm", time.perf_counter() - start)
                return out
            with timer("head_norm_comm"):
                return instruments._orig_all_reduce(*args, **kwargs)
        dist.all_reduce = all_reduce
        from scale_refiner.heads.async_bn import coordinator_of
        coordinator = coordinator_of(refiner)
        if coordinator is not None:
            original_sync = coordinator.sync

            def timed_sync(*args, _original=original_sync, **kwargs):
                with timer("head_norm_comm"):
                    return _original(*args, **kwargs)
            coordinator.sync = timed_sync
            self._restore.append((coordinator, "sync"))

    @staticmethod
    def _from_heads() -> bool:
        frame = sys._getframe(2)
        for _ in range(6):
            if frame is None:
                return False
            name = frame.f_code.co_filename.replace("\\", "/")
            if "scale_refiner/heads" in name or "torch/distributed/nn" in name:
                return True
            frame = frame.f_back
        return False

    def remove(self):
        dist.all_reduce = self._orig_all_reduce
        for obj, attr in self._restore:
            try:
                delattr(obj, attr)
            except AttributeError:
                pass


# ------------------------------------------------------------------------------------------- one run
@dataclass
class BenchOptions:
    stage: str = "refine"
    steps: int = 10
    warmup: int = 3
    dataset_size: int = IMAGENET_TRAIN
    gpus: int = 0                  # GPUs for the wall-clock extrapolation; 0 = this run's world size
    fine_timers: bool = True       # synchronised timers around lookups / head-norm collectives
    measure_cpu_peak: bool = True
    # Steps timed region by region after the throughput window. None: 2 where the region timers synchronise the
    # device (a GPU), 0 on the CPU, whose timers cost nothing, so one window gives both
    breakdown_steps: Optional[int] = None


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def build(cfg, ctx, stage: str):
    from scale_refiner.engine.trainer import build_engine
    from scale_refiner.refiner import build_refiner
    torch.manual_seed(cfg.run.seed)
    refiner = build_refiner(cfg, load_weights=bool(cfg.model.weights))
    engine = build_engine(refiner, cfg, stage, ctx)
    engine.module.train()
    return engine



def run_steps(engine, cfg, ctx, batch, steps: int, stage: str, timer: StageTimer, step0: int = 0,
              ema=None, losses: Optional[list] = None) -> float:
    """``steps`` training steps on ``batch``; returns wall seconds (synchronised at both ends). ``timer(name)``
    brackets each phase (h2d, forward, backward, step, ema); ``losses`` collects each step's detached loss."""
    stage_cfg = getattr(cfg.stages, stage)
    device = ctx.device
    per_rank = batch["global"].shape[1]
    global_batch = per_rank * ctx.world
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step = step0 + i
        with timer("h2d"):
            g = batch["global"].to(device, non_blocking=True)
            l = batch["local"].to(device, non_blocking=True)
            index = (batch["index"] + step * global_batch + ctx.rank * per_rank).to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
        engine.set_lr(1e-5)
        with timer("forward"):
            loss, _ = engine.forward(g, l, index, label, topk=stage_cfg.topk, step=step)
        if losses is not None:
            losses.append(loss.detach())
        with timer("backward"):
            engine.backward(loss)
        with timer("step"):
            engine.step(stage_cfg.clip_grad)
        if ema is not None:
            with timer("ema"):
                ema.update()
    sync(device)
    return time.perf_counter() - start


def find_batch(cfg, ctx, stage: str, max_batch: int, mem_budget_gb: Optional[float], start: int = 1) -> int:
    """Largest power-of-two per-rank batch that runs a step, searched from ``start`` (a power of two: the
    planner's prediction, so the search takes a probe or two instead of log2(batch)): doubling while it runs,
    halving from a failure until one runs. GPU: an out-of-memory error is a failure (all ranks agree on the
    smallest). CPU: the doubling stops before the process's resident memory would pass ``mem_budget_gb``
    (extrapolating the growth of the last doubling), so it never swaps."""
    device = ctx.device
    good, b = 0, 1
    budget = mem_budget_gb if mem_budget_gb else 0.5 * (available_memory_gb() + current_rss_gb())
    probe_cfg = copy.deepcopy(cfg)
    probe_cfg.data.batch_size = max_batch * ctx.world  # DeepSpeed's micro-batch setting is not checked per call
    engine = build(probe_cfg, ctx, stage)
    ema = None
    if stage == "refine":  # the EMA's fp32 copy of the trainable encoder counts too
        from scale_refiner.engine.ema import EncoderEMA
        ema = EncoderEMA(engine, 0.999)
    timer = StageTimer(device, enabled=False)
    prev_rss = current_rss_gb()
    b = max(1, min(start, max_batch))
    failed = None  # the smallest batch that failed: the search never goes back up to it
    while b <= max_batch and (failed is None or b < failed):
        batch = synthetic_batch(cfg, b, device, ctx.rank)
        ok = True
        try:
            run_steps(engine, probe_cfg, ctx, batch, 1, stage, timer, ema=ema)
        except RuntimeError as err:
            if not _is_oom(err):
                raise
            ok = False
            del err
            engine.discard_gradients()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if ctx.world > 1:
            flag = torch.tensor([1 if ok else 0], device=device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = bool(flag.item())
        if not ok:
            failed = b
            if good or b == 1:
                break
            b //= 2
            continue
        good = b
        if failed is not None:  # came down from a failure: the largest that runs
            break
        if device.type == "cpu":
            rss = current_rss_gb()
            growth = max(rss - prev_rss, 0.0)
            prev_rss = rss
            if rss + 2 * growth > budget:  # the next doubling would likely pass the budget
                break
        b *= 2
    del engine, ema
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if good == 0:
        raise RuntimeError("not even a per-rank batch of 1 fits")
    return good


def gpu_hours(cfg, stage_ips: Dict[str, float], stage_note: Dict[str, str], dataset_size: int,
              gpus: int) -> Dict:
    """epochs x dataset / (images/s per GPU x GPUs) per stage in ``stages.run``: wall hours at ``gpus`` and
    GPU-hours (independent of the GPU count at constant per-GPU throughput)."""
    out, total_gpu_h, total_wall = {}, 0.0, 0.0
    for name in cfg.stages.run:
        epochs = getattr(cfg.stages, name).epochs
        ips = stage_ips.get(name)
        if not ips:
            continue
        gpu_h = epochs * dataset_size / ips / 3600
        wall = gpu_h / gpus
        out[name] = {"epochs": epochs, "images_per_s_per_gpu": ips, "gpu_hours": gpu_h, "wall_hours": wall,
                     "gpus": gpus, "source": stage_note.get(name, "measured")}
        total_gpu_h += gpu_h
        total_wall += wall
    out["total"] = {"gpu_hours": total_gpu_h, "wall_hours": total_wall, "gpus": gpus,
                    "dataset_size": dataset_size}
    return out


def benchmark(cfg, ctx, per_rank: int, opts: BenchOptions, config_name: str = "?", variant: str = "") -> Dict:
    """Build, warm up, time ``opts.steps`` steps; returns the result dict (RESULT_KEYS).

    On a GPU the throughput window runs with no timer inside it: a region timer synchronises the device at both
    ends, which drains the queue of launched kernels and loses the overlap of the host's launches with the
    device's work, lowering the very figure it reports. The per-region breakdown then comes from
    ``breakdown_steps`` more steps, timed region by region (``breakdown_step_time_s`` shows what that costs)."""
    device = ctx.device
    stage = opts.stage
    cfg = copy.deepcopy(cfg)
    cfg.data.batch_size = per_rank * ctx.world
    engine = build(cfg, ctx, stage)
    ema = None
    if stage == "refine":
        from scale_refiner.engine.ema import EncoderEMA
        ema = EncoderEMA(engine, getattr(cfg.stages, stage).ema)
    breakdown_steps = opts.breakdown_steps
    if breakdown_steps is None:
        breakdown_steps = 2 if device.type == "cuda" else 0
    timer = StageTimer(device)
    quiet = StageTimer(device, enabled=False)
    # one window (breakdown_steps 0): timed region by region while it measures the throughput
    instruments = Instruments(engine.model, timer) if opts.fine_timers and not breakdown_steps else None
    batch = synthetic_batch(cfg, per_rank, device, ctx.rank)
    breakdown_elapsed = None
    try:
        run_steps(engine, cfg, ctx, batch, opts.warmup, stage, quiet, ema=ema)
        reset_peak_memory(device)
        # what stays allocated between steps (weights, optimiser state, EMA, queues): the peak less this is what
        # a step adds, the split the planner's memory model is checked on (None on the CPU)
        resting_gb = allocated_memory_gb(device)
        if ctx.world > 1:
            dist.barrier()
        elapsed = run_steps(engine, cfg, ctx, batch, opts.steps, stage, quiet if breakdown_steps else timer,
                            step0=opts.warmup, ema=ema)
        if breakdown_steps:
            instruments = Instruments(engine.model, timer) if opts.fine_timers else None
            breakdown_elapsed = run_steps(engine, cfg, ctx, batch, breakdown_steps, stage, timer,
                                          step0=opts.warmup + opts.steps, ema=ema)
    finally:
        if instruments is not None:
            instruments.remove()
    mem_gb, mem_kind = peak_memory(device)
    comm_calls = instruments.comm_calls if instruments is not None else None
    engine_kind = engine.kind + (f"-zero{engine.stage}" if engine.kind == "deepspeed" else "")
    dtype = str(engine.dtype).replace("torch.", "")
    del engine, ema
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if ctx.world > 1:  # the slowest rank sets the pace
        t = torch.tensor([elapsed], dtype=torch.float64,
                         device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        elapsed = float(t.item())
    flops = step_flops(cfg, stage)
    step_time = elapsed / opts.steps
    ips = per_rank / step_time
    peak, peak_source = device_peak_tflops(device, opts.measure_cpu_peak)
    model_tflops = flops.model * ips / 1e12
    timed_steps = breakdown_steps or opts.steps
    timed_step_time = breakdown_elapsed / breakdown_steps if breakdown_steps else step_time
    breakdown = timer.per_step_ms(timed_steps)
    accounted = sum(v for k, v in breakdown.items() if k in ("h2d", "forward", "backward", "step", "ema"))
    breakdown["other"] = max(1000 * timed_step_time - accounted, 0.0)
    breakdown["total"] = 1000 * timed_step_time
    if comm_calls is not None:
        breakdown["head_norm_collectives_per_step"] = comm_calls / timed_steps

    stage_ips = {stage: ips}
    notes = {stage: "measured"}
    other = "heads" if stage == "refine" else "refine"
    other_flops = step_flops(cfg, other)
    stage_ips[other] = ips * flops.model / other_flops.model
    notes[other] = f"estimated: {stage} images/s scaled by the model-FLOPs ratio (not measured)"
    result = {
        "config": config_name, "engine": engine_kind, "stage": stage, "variant": variant, "world": ctx.world,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype, "per_rank_batch": per_rank, "global_batch": per_rank * ctx.world,
        "steps": opts.steps, "warmup": opts.warmup, "step_time_s": step_time,
        "breakdown_steps": breakdown_steps, "breakdown_step_time_s": timed_step_time,
        "images_per_s_per_rank": ips, "images_per_s": ips * ctx.world,
        "crops_per_s_per_rank": ips * flops.crops_per_sample, "tokens_per_s_per_rank": ips * flops.tokens,
        "flops": flops.as_dict(), "model_tflops_per_rank": model_tflops,
        "hardware_tflops_per_rank": flops.hardware * ips / 1e12,
        "peak_tflops": peak, "peak_source": peak_source,
        "mfu": (model_tflops / peak) if peak else None,
        "peak_memory_gb": mem_gb, "memory_kind": mem_kind, "resting_memory_gb": resting_gb,
        "breakdown_ms": breakdown,
        "gpu_hours": gpu_hours(cfg, stage_ips, notes, opts.dataset_size, opts.gpus or ctx.world),
        "data": "synthetic random crops at the recipe's sizes, copied host->device each step; no loading",
        "checkpointing": cfg.model.checkpointing, "compile": bool(cfg.model.compile),
        "optimizer_impl": cfg.engine.optimizer_impl, "heads_norm": cfg.heads.norm,
        "freeze_blocks": cfg.model.freeze_blocks, "frozen_prefix": "inside the engine (run under no_grad)",
        "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return result


# ----------------------------------------------------------------------------------------------- output
MD_HEADER = ("| config | engine | variant | stage | device | dtype | ranks | batch/rank | img/s/rank | crops/s/rank "
             "| tokens/s/rank | model TFLOP/s/rank | MFU | peak mem GiB | fwd ms | lookup ms | head-norm comm ms "
             "| bwd ms | step ms | ema ms | h2d ms | GPU-h (total) |\n"
             "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def markdown_row(r: Dict) -> str:
    b = r["breakdown_ms"]
    mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
    return (f"| {r['config']} | {r['engine']} | {r['variant'] or '-'} | {r['stage']} | {r['device_name']} "
            f"| {r['dtype']} | {r['world']} | {r['per_rank_batch']} | {r['images_per_s_per_rank']:.1f} "
            f"| {r['crops_per_s_per_rank']:.0f} | {r['tokens_per_s_per_rank']:.0f} "
            f"| {r['model_tflops_per_rank']:.3g} | {mfu} | {r['peak_memory_gb']:.2f} "
            f"| {b.get('forward', 0):.1f} | {b.get('lookup', 0):.1f} | {b.get('head_norm_comm', 0):.1f} "
            f"| {b.get('backward', 0):.1f} | {b.get('step', 0):.1f} | {b.get('ema', 0):.1f} "
            f"| {b.get('h2d', 0):.1f} | {r['gpu_hours']['total']['gpu_hours']:.4g} |")


def append_results(results: List[Dict], out: Path, json_path: Optional[Path] = None) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists() or out.stat().st_size == 0
    with open(out, "a") as handle:
        if new:
            handle.write(MD_HEADER + "\n")
        for r in results:
            handle.write(markdown_row(r) + "\n")
    json_path = Path(json_path) if json_path else out.with_suffix(".jsonl")
    with open(json_path, "a") as handle:
        for r in results:
            handle.write(json.dumps(r) + "\n")


def comparison_table(results: List[Dict]) -> str:
    """Side by side, with ratios to the first row of each group (the machine is shared: compare ratios)."""
    lines = ["| group | variant | engine | img/s/rank | ratio | step ms | fwd | lookup | head-norm comm | bwd "
             "| step | ema | peak mem GiB | MFU |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base: Dict[str, float] = {}
    for r in results:
        group = r.get("group", "")
        base.setdefault(group, r["images_per_s_per_rank"])
        b = r["breakdown_ms"]
        mfu = f"{100 * r['mfu']:.2f} %" if r["mfu"] is not None else "n/a"
        lines.append(f"| {group} | {r['variant']} | {r['engine']} | {r['images_per_s_per_rank']:.1f} "
                     f"| {r['images_per_s_per_rank'] / base[group]:.2f} | {b['total']:.0f} "
                     f"| {b.get('forward', 0):.0f} | {b.get('lookup', 0):.1f} | {b.get('head_norm_comm', 0):.1f} "
                     f"| {b.get('backward', 0):.0f} | {b.get('step', 0):.0f} | {b.get('ema', 0):.1f} "
                     f"| {r['peak_memory_gb']:.2f} | {mfu} |")
    return "\n".join(lines)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
