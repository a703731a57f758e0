"""Sweep the demo chain (MAE -> MIM-Refiner -> evaluation) over refinement recipes and seeds, into one table.

A shim: the command is ``scale_refiner/cli/sweep_demo.py`` (also ``python -m scale_refiner.cli.sweep_demo``, ``scale-refiner
refine``); this path keeps working for the launchers (``deepspeed``, ``torchrun``) and scripts that name it.
"""
try:
    from scale_refiner.cli.sweep_demo import *  # noqa: F401,F403  (tests and tools load this file and call its main)
    from scale_refiner.cli.sweep_demo import main
except ModuleNotFoundError as err:
    if err.name != "scale_refiner":
        raise
    raise SystemExit("error: the scale_refiner package is not importable: install it (make env, or pip install -e "
                     "the repository) or run with PYTHONPATH=<the repository>") from None

if __name__ == "__main__":
    raise SystemExit(main())
