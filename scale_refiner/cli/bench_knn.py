"""Time the refine job's k-NN measurement (``scale_refiner.eval.knn.knn_of_state``) on 1 process and on N gloo CPU ranks,
side by side in one run, on the embedded Fashion-MNIST data and a config's encoder (random weights).

    .venv/bin/python launch/bench_knn.py [--config configs/demo.yaml] [--samples 10000] [--world 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository (configs/, shards/)

from scale_refiner.config import load_config
from scale_refiner.data.loaders import eval_arrays
from scale_refiner.engine.distributed import spawn_gloo
from scale_refiner.eval.knn import knn_of_state
from scale_refiner.models.vit import build_vit


def measure(rank: int, world: int, config: str, samples: int):
    cfg = load_config(config, ["data.num_workers=0"])
    torch.manual_seed(0)
    state = build_vit(cfg.model).state_dict()
    data = (eval_arrays(cfg, "train", samples, uint8=True), eval_arrays(cfg, "test", samples, uint8=True))
    started = time.perf_counter()
    accuracy = knn_of_state(state, cfg, torch.device("cpu"), data)
    return time.perf_counter() - started, accuracy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    ap.add_argument("--samples", type=int, default=10000, help="train and test images each")
    ap.add_argument("--world", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as each spawned rank: the comparison is 1 core against N
    one = measure(0, 1, args.config, args.samples)
    many = spawn_gloo(measure, args.world, args.config, args.samples, threads=1)
    print("| ranks | seconds | k-NN@10 | k-NN@20 |\n|---|---:|---:|---:|")
    for world, (seconds, acc) in ((1, one), (args.world, many)):
        print(f"| {world} | {seconds:.1f} | {100 * acc['10']:.2f} | {100 * acc['20']:.2f} |")
    print(f"\n{args.world} ranks: {one[0] / many[0]:.2f}x the speed of 1 process; "
          f"same accuracy: {one[1] == many[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
