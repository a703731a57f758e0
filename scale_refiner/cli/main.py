"""``scale-refiner <command> [args]``: the user-facing commands behind one console script.

    scale-refiner refine --config configs/demo.yaml          # = python launch/refine.py ...
    scale-refiner pretrain-mae | evaluate | make-shards | benchmark | demo ...

Under a launcher, run the module itself, which works the same way on every rank:
``deepspeed --module scale_refiner.cli.refine ...`` or ``torchrun -m scale_refiner.cli.refine ...`` (or the
shim ``launch/refine.py``, as the README does).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "refine": ("refine", "refine a pre-trained ViT (heads stage, refine stage, k-NN before/after, exports)"),
    "pretrain-mae": ("pretrain_mae", "pre-train a ViT as a masked autoencoder"),
    "evaluate": ("evaluate", "k-NN, per-block k-NN, linear, low-shot and k-means of an encoder"),
    "make-shards": ("make_shards", "write webdataset shards (+ DALI indexes, manifest) from a data set"),
    "benchmark": ("benchmark", "throughput, MFU, memory and GPU-hours of a recipe"),
    "plan": ("plan", "predicted memory, step time and GPU-hours of a recipe on N GPUs; the fastest setting"),
    "demo": ("demo", "the embedded main job end to end (make demo)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: scale-refiner <command> [args]\n\ncommands:\n" + "\n".join(lines) + \
        "\n\n`scale-refiner <command> --help` for a command's arguments."


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"scale_refiner.cli.{COMMANDS[name][0]}")
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
