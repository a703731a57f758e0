"""The device's own rate on the recipes' shapes: a block's matrix products and attention, in the compute dtype.

    python launch/bench_kernels.py                                    # ViT-L/16 and ViT-2B/14 recipes
    python launch/bench_kernels.py --config configs/mae_l16.yaml --samples 64 --json kernels.jsonl

The ceiling a training step's MFU is read against (``bench/kernels.py``): a step far below it loses time outside
the products. bf16 on a GPU (against the card's dense bf16 peak), fp32 on the CPU (against a measured fp32
matmul rate; use ``--samples 1`` there). One markdown table; one JSON line per kernel to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from scale_refiner.config import load_config

DEFAULT_CONFIGS = ("configs/mae_l16.yaml", "configs/mae_2b14.yaml")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help="recipe (repeatable; default: ViT-L/16 and ViT-2B/14)")
    p.add_argument("--samples", type=int, default=64, help="global crops a product's rows come from")
    p.add_argument("--repeats", type=int, default=20, help="calls between two synchronisations")
    p.add_argument("--rounds", type=int, default=3, help="timings of --repeats calls; the best is kept")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on a GPU")
    p.add_argument("--json", help="append one JSON line per kernel here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from scale_refiner.bench.kernels import markdown, measure_recipe
    from scale_refiner.bench.timers import device_peak_tflops
    from scale_refiner.models.vit import resolve_model_dims
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    peak, source = device_peak_tflops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; peak {peak if peak else 'n/a'} TFLOP/s ({source}); {args.samples} samples a product")
    results = []
    for config in args.config or DEFAULT_CONFIGS:
        cfg = load_config(config, [])
        results += measure_recipe(Path(config).stem, resolve_model_dims(cfg.model), cfg.augment.global_size,
                                  cfg.augment.local_size, args.samples, device, dtype, peak, args.repeats,
                                  args.rounds)
    print(markdown(results))
    if args.json:
        with open(args.json, "a") as handle:
            for r in results:
                handle.write(json.dumps(dict(r.as_dict(), device_name=name, peak_source=source,
                                             torch=torch.__version__)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
