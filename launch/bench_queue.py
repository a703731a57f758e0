"""NN-queue benchmark: sharded faiss lookup vs the replicated queue vs a torch matmul on the shard.

A shim: the command is ``scale_refiner/cli/bench_queue.py`` (also ``python -m scale_refiner.cli.bench_queue``); this path
keeps working for the launchers (``deepspeed``, ``torchrun``) and scripts that name it.
"""
from scale_refiner.cli.bench_queue import *  # noqa: F401,F403  (tests and tools load this file and call its main)
from scale_refiner.cli.bench_queue import main

if __name__ == "__main__":
    raise SystemExit(main())
