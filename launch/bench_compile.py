"""``model.compile`` benchmark: the refiner's step eager and with every block compiled, side by side.

A shim: the command is ``scale_refiner/cli/bench_compile.py`` (also ``python -m scale_refiner.cli.bench_compile``); this
path keeps working for the launchers (``deepspeed``, ``torchrun``) and scripts that name it.
"""
try:
    from scale_refiner.cli.bench_compile import *  # noqa: F401,F403  (tests and tools load this file and call its main)
    from scale_refiner.cli.bench_compile import main
except ModuleNotFoundError as err:
    if err.name != "scale_refiner":
        raise
    raise SystemExit("error: the scale_refiner package is not importable: install it (make env, or pip install -e "
                     "the repository) or run with PYTHONPATH=<the repository>") from None

if __name__ == "__main__":
    raise SystemExit(main())
