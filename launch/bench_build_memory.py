"""Host peak RSS per rank of building the model, through the public launchers only.

A shim: the command is ``scale_refiner/cli/bench_build_memory.py`` (also ``python -m
scale_refiner.cli.bench_build_memory``); this path keeps working for the launchers (``deepspeed``, ``torchrun``) and
scripts that name it.
"""
try:
    from scale_refiner.cli.bench_build_memory import *  # noqa: F401,F403  (tools call its main)
    from scale_refiner.cli.bench_build_memory import main
except ModuleNotFoundError as err:
    if err.name != "scale_refiner":
        raise
    raise SystemExit("error: the scale_refiner package is not importable: install it (make env, or pip install -e "
                     "the repository) or run with PYTHONPATH=<the repository>") from None

if __name__ == "__main__":
    raise SystemExit(main())
