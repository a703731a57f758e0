"""Images/s of the DALI pipeline and the torch reference pipeline on the same shards, cores and augmentation.

    python launch/bench_data.py                                  # demo settings on the Fashion-MNIST shards
    python launch/bench_data.py --preset paper --shards shards/digits256

Both pipelines get the same number of CPU workers (DALI num_threads = DataLoader workers = --workers). On a GPU
machine DALI decodes with "mixed" and augments on the GPU (--dali-device auto). Prints a markdown table.

Beside each pipeline's images/s: what one GPU's refine step consumes for a recipe (``--need CONFIG``, default
configs/mae_l16.yaml with ``--preset paper``; ``--need-gpu`` the card), the planner's images/s per GPU of the
fastest plan that fits one such GPU (plan/search.py; at the measured efficiency, docs/planner.md), the pipeline's
rate against it, and for a CPU pipeline the CPU cores per GPU that its measured rate per core implies.
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path


import torch

from scale_refiner.data.shards import ensure_fashion_mnist_shards, load_manifest, shard_root

PRESETS = {
    "demo": dict(global_size=32, local_size=16, num_local=4, batch=128),
    "paper": dict(global_size=224, local_size=96, num_local=10, batch=128),
}


def measure(make, seconds: float, warmup: int = 2):
    """(images/s, batches timed): builds the loader, skips ``warmup`` batches, then times up to ``seconds``."""
    loader = make()
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for batch in it:
        if batch["global"].is_cuda:
            torch.cuda.synchronize()
        n += batch["index"].shape[0]
        if time.perf_counter() - t0 > seconds:
            break
    dt = time.perf_counter() - t0
    del it, loader
    return n / dt, n


def gpu_need(config: str, gpu_name: str):
    """(images/s one GPU's refine step consumes, the plan's label): the planner's fastest plan of ``config`` on
    one ``gpu_name``."""
    from scale_refiner.config import load_config
    from scale_refiner.plan.hardware import resolve_gpu
    from scale_refiner.plan.search import fastest, plan_all
    cfg = load_config(config, [])
    best = fastest(plan_all(cfg, config, resolve_gpu(gpu_name), 1))
    if best is None:
        raise SystemExit(f"error: {config} fits no plan on one {gpu_name}: no step to feed")
    step = best.time["refine"]["step_s"]
    return cfg.data.batch_size / step, best.setting.label


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=None, help="shard directory or manifest (default: Fashion-MNIST, "
                                                   "written on first use)")
    p.add_argument("--shard-root", default=None,
                   help="where the embedded Fashion-MNIST shards are written and found, when --shards is not given "
                        "(default: $SCALE_REFINER_SHARD_ROOT, else shards/ of the checkout, else "
                        "~/.cache/scale-refiner/shards)")
    p.add_argument("--split", default="train")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--global-size", type=int)
    p.add_argument("--local-size", type=int)
    p.add_argument("--num-local", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="CPU workers/threads for both")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per pipeline")
    p.add_argument("--dali-device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--skip", choices=["dali", "wds"], action="append", default=[])
    p.add_argument("--need", default=None,
                   help="recipe whose GPU step the pipelines must feed (default: configs/mae_l16.yaml with --preset "
                        "paper, none with demo); 'none' for no such column")
    p.add_argument("--need-gpu", default="h100-80gb", help="the GPU of --need (plan/hardware.py's names)")
    a = p.parse_args(argv)
    cfg = dict(PRESETS[a.preset])
    for k in ("global_size", "local_size", "num_local", "batch"):
        if getattr(a, k) is not None:
            cfg[k] = getattr(a, k)
    shard_set = load_manifest(a.shards or ensure_fashion_mnist_shards(
        shard_root(a.shard_root) / "fashion-mnist" if a.shard_root else None), verify="size")
    sp = shard_set.split(a.split)
    aug = dict(global_size=cfg["global_size"], local_size=cfg["local_size"], num_local=cfg["num_local"])
    rows = []
    if "wds" not in a.skip:
        from scale_refiner.data.wds_pipeline import WdsMultiCropLoader
        ips, n = measure(lambda: WdsMultiCropLoader(sp.tars, sp.counts, cfg["batch"], num_workers=a.workers,
                                                    drop_last=False, **aug), a.seconds)
        rows.append(("reference (webdataset + torchvision, DataLoader)", "cpu", ips, n))
    if "dali" not in a.skip:
        from scale_refiner.data.dali_pipeline import DaliMultiCropLoader, _resolve_device, dali_available
        if dali_available():
            dev = _resolve_device(a.dali_device)
            ips, n = measure(lambda: DaliMultiCropLoader(sp.tars, sp.indexes, sp.num_samples, cfg["batch"],
                                                         num_threads=a.workers, device=dev, drop_last=False,
                                                         **aug), a.seconds)
            rows.append((f"DALI ({'mixed decode + GPU ops' if dev == 'gpu' else 'CPU'})", dev, ips, n))
    base = next((r[2] for r in rows if r[0].startswith("reference")), None)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"\nshards {sp.tars[0].rsplit('/', 1)[0]} ({a.split}, {sp.num_samples} samples), preset {a.preset}: "
          f"{cfg['global_size']} px x2 + {cfg['local_size']} px x{cfg['num_local']}, batch {cfg['batch']}, "
          f"{a.workers} workers; CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
          f"GPU {gpu}\n")
    need_config = a.need if a.need is not None else ("configs/mae_l16.yaml" if a.preset == "paper" else "none")
    need = None
    if need_config != "none":
        need, label = gpu_need(need_config, a.need_gpu)
        print(f"need: one {a.need_gpu}'s refine step of {need_config} consumes {need:.1f} images/s (the planner's "
              f"fastest plan: {label})\n")
    head = "| pipeline | device | images/s | images timed | vs reference |"
    rule = "|---|---|---:|---:|---:|"
    if need:
        head += " images/s per core | vs need | CPU cores per GPU for the need |"
        rule += "---:|---:|---:|"
    print(head)
    print(rule)
    for name, dev, ips, n in rows:
        ratio = f"{ips / base:.2f}x" if base else "-"
        line = f"| {name} | {dev} | {ips:.1f} | {n} | {ratio} |"
        if need:
            per_core = ips / a.workers
            cores = f"{need / per_core:.1f}" if dev == "cpu" else "- (decodes on the GPU)"
            line += f" {per_core:.1f} | {ips / need:.2f}x | {cores} |"
        print(line)


if __name__ == "__main__":
    main()
