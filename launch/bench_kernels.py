"""Kernel benchmark: a block's matrix products and attention at the recipes' shapes, against the card's peak.

A shim: the command is ``scale_refiner/cli/bench_kernels.py`` (also ``python -m scale_refiner.cli.bench_kernels``); this
path keeps working for the launchers (``deepspeed``, ``torchrun``) and scripts that name it.
"""
try:
    from scale_refiner.cli.bench_kernels import *  # noqa: F401,F403  (tests and tools load this file and call its main)
    from scale_refiner.cli.bench_kernels import main
except ModuleNotFoundError as err:
    if err.name != "scale_refiner":
        raise
    raise SystemExit("error: the scale_refiner package is not importable: install it (make env, or pip install -e "
                     "the repository) or run with PYTHONPATH=<the repository>") from None

if __name__ == "__main__":
    raise SystemExit(main())
