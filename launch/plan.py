"""Memory and throughput planner: engine, checkpointing and micro-batch of a recipe on N GPUs, and its cost.

A shim: the command is ``scale_refiner/cli/plan.py`` (also ``python -m scale_refiner.cli.plan``, ``scale-refiner
plan``); this path keeps working for the scripts and docs that name it.
"""
try:
    from scale_refiner.cli.plan import *  # noqa: F401,F403  (tests and tools load this file and call its main)
    from scale_refiner.cli.plan import main
except ModuleNotFoundError as err:
    if err.name != "scale_refiner":
        raise
    raise SystemExit("error: the scale_refiner package is not importable: install it (make env, or pip install -e "
                     "the repository) or run with PYTHONPATH=<the repository>") from None

if __name__ == "__main__":
    raise SystemExit(main())
