"""Pre-train a ViT as a masked autoencoder (MAE), on the same engines, data streams and checkpoints as refining.

A shim: the command is ``scale_refiner/cli/pretrain_mae.py`` (also ``python -m scale_refiner.cli.pretrain_mae``, ``scale-refiner pretrain-mae``); this path
keeps working for the launchers (``deepspeed``, ``torchrun``) and scripts that name it.
"""
from scale_refiner.cli.pretrain_mae import *  # noqa: F401,F403  (tests and tools load this file and call its main)
from scale_refiner.cli.pretrain_mae import main

if __name__ == "__main__":
    raise SystemExit(main())
