"""Profile one training step of a recipe (default: the CPU demo) with torch.profiler.

    python launch/profile_step.py --threads 2 --warmup 3 --steps 5
    python launch/profile_step.py --threads 1 --json runs/profile/after_t1.json data.batch_size=64

The refiner, engine and step are the benchmark's (``scale_refiner.bench.runner``: ``build`` is the main job's
``build_refiner`` + ``build_engine``, ``synthetic_batch`` fixed random crops of the recipe's shapes, made once,
so data loading and augmentation are excluded, ``run_steps`` what ``run_stage`` does: set_lr, forward,
backward, step (clip + optimiser), EMA update in the refine stage). The dataset indices advance by the batch
every step, as a real stream's do, so the own-index exclusion of the queue lookups behaves as in training.

Order: ``--warmup`` untimed steps, then ``--timed`` steps (default ``--steps``) timed by the wall clock with
no profiler attached (mean step time and images/s come from these), then ``--steps`` steps under
``torch.profiler`` (CPU activity, record_shapes off). Printed: the wall-clock figures, the phase totals per
step (``record_function`` ranges h2d / forward / backward / step / ema, inclusive CPU time) and a markdown
table of the ``--top`` ops by self CPU time per step. ``--json`` writes the same as one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path


import torch
from torch.profiler import ProfilerActivity, profile, record_function

from scale_refiner.config import load_config

PHASES = ("h2d", "forward", "backward", "step", "ema")  # run_steps's phase names


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--stage", default="refine", choices=("refine", "heads"))
    p.add_argument("--steps", type=int, default=5, help="profiled steps (K)")
    p.add_argument("--timed", type=int, default=0, help="wall-clock timed steps without profiler (0: --steps)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", default="", help="write the results as one JSON object to this file")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


@contextlib.contextmanager
def profiler_range(name: str):
    """``run_steps``'s phase timer, as ``record_function`` ranges the profiler reports per phase."""
    with record_function(name):
        yield


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from scale_refiner.bench.runner import build, run_steps, synthetic_batch
    from scale_refiner.engine.distributed import init_distributed
    from scale_refiner.engine.ema import EncoderEMA

    cfg = load_config(args.config, args.overrides)
    ctx = init_distributed(use_deepspeed=False, need_group=False)
    engine = build(cfg, ctx, args.stage)
    stage = getattr(cfg.stages, args.stage)
    ema = EncoderEMA(engine, stage.ema) if args.stage == "refine" else None
    per_rank = cfg.data.batch_size // ctx.world
    batch = synthetic_batch(cfg, per_rank, ctx.device)
    losses = []

    def run(steps: int, step0: int) -> float:
        return run_steps(engine, cfg, ctx, batch, steps, args.stage, profiler_range, step0=step0, ema=ema,
                         losses=losses)

    run(args.warmup, 0)
    step = args.warmup
    timed = args.timed or args.steps
    times = []
    for _ in range(timed):
        times.append(run(1, step))
        step += 1
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        run(args.steps, step)
    k = args.steps

    events = prof.key_averages()
    total_self_us = sum(e.self_cpu_time_total for e in events)
    phases = {}
    for e in events:
        if e.key in PHASES:
            phases[e.key] = {"cpu_ms_per_step": e.cpu_time_total / 1e3 / k, "calls_per_step": e.count / k}
    ops = sorted((e for e in events if e.key not in PHASES), key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [{"name": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / k,
            "percent": 100.0 * e.self_cpu_time_total / max(total_self_us, 1e-9), "calls_per_step": e.count / k}
           for e in ops[:args.top]]
    times_sorted = sorted(times)
    mean_s = sum(times) / len(times)
    result = {"config": args.config, "overrides": args.overrides, "stage": args.stage,
              "threads": torch.get_num_threads(), "batch": per_rank, "warmup": args.warmup, "timed_steps": timed,
              "profiled_steps": k, "step_ms_mean": 1e3 * mean_s, "step_ms_median": 1e3 * times_sorted[len(times) // 2],
              "step_ms_min": 1e3 * times_sorted[0], "images_per_s": per_rank / mean_s,
              "profiled_cpu_ms_per_step": total_self_us / 1e3 / k, "ops_per_step": sum(e.count for e in ops) / k,
              "phases": phases, "top": top, "last_loss": float(losses[-1]),
              "loss_checksum": float(torch.stack(losses).double().sum())}

    print(f"# {args.config} {' '.join(args.overrides)} stage={args.stage} threads={result['threads']} "
          f"batch={per_rank} warmup={args.warmup} timed={timed} profiled={k}")
    print(f"step time (no profiler): mean {result['step_ms_mean']:.1f} ms, median {result['step_ms_median']:.1f} ms, "
          f"min {result['step_ms_min']:.1f} ms; {result['images_per_s']:.1f} img/s")
    print(f"profiled: {result['profiled_cpu_ms_per_step']:.1f} ms self CPU per step, "
          f"{result['ops_per_step']:.0f} profiler events per step; loss checksum {result['loss_checksum']:.8f}")
    print("\n| phase | CPU ms/step (inclusive) | % of profiled |")
    print("|---|---:|---:|")
    for name in PHASES:
        if name in phases:
            ms = phases[name]["cpu_ms_per_step"]
            print(f"| {name} | {ms:.2f} | {100 * ms / max(result['profiled_cpu_ms_per_step'], 1e-9):.1f} |")
    print(f"\n| op (top {args.top} by self CPU) | self CPU ms/step | % of total | calls/step |")
    print("|---|---:|---:|---:|")
    for row in top:
        print(f"| {row['name']} | {row['self_cpu_ms_per_step']:.2f} | {row['percent']:.1f} | "
              f"{row['calls_per_step']:g} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
