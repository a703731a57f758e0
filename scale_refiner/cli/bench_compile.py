"""``model.compile`` benchmark: the refiner's training step eager and with every block compiled, side by side.

    python launch/bench_compile.py                              # the CPU demo (configs/demo.yaml), 10 steps
    python launch/bench_compile.py --steps 10 --threads 2 model.checkpointing=2

Builds the same refiner twice from one seed (``bench.runner.build``: the main job's ``build_refiner`` +
``build_engine``), once with ``model.compile=false`` and once with ``true``, and runs refine-stage steps
(``bench.runner.run_steps``: set_lr, forward, backward, AdamW step, EMA) on the same fixed synthetic crops,
alternating between the two step by step (the machine may be shared and noisy: both see the same noise). The
first compiled step includes the compilation and is reported apart; the step time is the median of the
others. Printed: a markdown table of step times and one of the losses of every step, eager against compiled.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from scale_refiner.config import load_config


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (both variants)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from scale_refiner.bench.runner import build, run_steps, synthetic_batch
    from scale_refiner.bench.timers import StageTimer
    from scale_refiner.engine.distributed import DistContext
    from scale_refiner.engine.ema import EncoderEMA
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    variants = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        cfg = load_config(args.config, list(args.overrides) + [f"model.compile={flag}", "engine.kind=single"])
        engine = build(cfg, ctx, "refine")
        variants[name] = dict(cfg=cfg, engine=engine, ema=EncoderEMA(engine, cfg.stages.refine.ema), times=[],
                              losses=[])
    cfg = variants["eager"]["cfg"]
    batch = synthetic_batch(cfg, cfg.data.batch_size, ctx.device)
    timer = StageTimer(ctx.device, enabled=False)
    for step in range(args.steps):
        for v in variants.values():
            start = time.perf_counter()
            run_steps(v["engine"], v["cfg"], ctx, batch, 1, "refine", timer, step0=step, ema=v["ema"],
                      losses=v["losses"])
            v["times"].append(time.perf_counter() - start)
    eager, compiled = variants["eager"], variants["compiled"]
    median = {n: statistics.median(v["times"][1:]) for n, v in variants.items()}
    print(f"{args.config} {' '.join(args.overrides)}: refine-stage steps of {cfg.data.batch_size} samples, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| variant | first step s | step s (median of steps 2..) | images/s | vs eager |")
    print("|---|---:|---:|---:|---:|")
    for n, v in variants.items():
        print(f"| {n} | {v['times'][0]:.2f} | {median[n]:.3f} | {cfg.data.batch_size / median[n]:.0f} | "
              f"{median['eager'] / median[n]:.2f}x |")
    print("\n| step | eager loss | compiled loss | relative difference |")
    print("|---:|---:|---:|---:|")
    worst = 0.0
    for i, (a, b) in enumerate(zip(eager["losses"], compiled["losses"])):
        a, b = float(a), float(b)
        rel = abs(a - b) / abs(a)
        worst = max(worst, rel)
        print(f"| {i} | {a:.7f} | {b:.7f} | {rel:.1e} |")
    print(f"\nlargest relative loss difference: {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
