"""Memory and throughput planner: for a recipe on N GPUs, every engine setting the trainer supports, its
predicted memory per GPU (broken down), the largest micro-batch that fits, the step time (compute, exposed
communication, optimiser, data), MFU, images/s per GPU and GPU-hours of both stages; the fastest plan that fits
is marked and its command line printed. Nothing is allocated: the model is built on the meta device.

    python launch/plan.py --config configs/mae_2b14.yaml --gpus 8 --gpu h100-80gb
    python launch/plan.py --config configs/mae_2b14.yaml --gpus 64 --gpu h200 --efficiency 0.35 --json
    python launch/plan.py --config configs/mae_l16.yaml --gpus 16 --gpu custom --gpu-memory-gb 48 --peak-tflops 362
    python launch/plan.py --config configs/mae_2b14.yaml --gpu h100-80gb --scaling 1,8,64,512
    python launch/plan.py --validate            # predicted against measured peak memory of real CPU steps
    python launch/plan.py --calibrate gpu_results/benchmarks.jsonl     # fit the compute efficiency to measured rows
    python launch/plan.py --config configs/mae_l16.yaml --efficiency runs/plan/efficiency.json   # plan with it

The compute efficiency is, unless --efficiency gives a number or a calibrated table, the measured defaults of
scale_refiner/plan/efficiency_defaults.json (per card, model, checkpointing mode, compile; 0.4 assumed where
nothing measured applies); every plan names where its value came from.

Model, assumptions and the validation: docs/planner.md.
"""
from __future__ import annotations

import argparse
import json
import sys

from scale_refiner.cli.args import parse_launched


def parse_args(argv):
    from scale_refiner.plan.hardware import GPUS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the recipe (YAML)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the job")
    p.add_argument("--gpu", default="h100-80gb", choices=[*GPUS, "custom"])
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="GPU memory (GB = 1e9 bytes)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak")
    p.add_argument("--nvlink-gbps", type=float, default=None, help="collective bus bandwidth inside a node, GB/s")
    p.add_argument("--internode-gbps", type=float, default=None, help="the same across nodes, GB/s per GPU")
    p.add_argument("--hbm-gbps", type=float, default=None, help="memory bandwidth, GB/s")
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--efficiency", default=None,
                   help="compute efficiency: a number (fraction of the bf16 peak the hardware FLOPs reach, for every "
                        "setting) or a table written by --calibrate (over the measured defaults); default: the "
                        "measured defaults")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--scaling", default="",
                   help="comma list of GPU counts (e.g. 1,8,64,512): the fastest fitting plan at each and its "
                        "scaling efficiency against the smallest, instead of one count's plans")
    p.add_argument("--validate", action="store_true",
                   help="measure peak memory of real CPU training steps and compare with the prediction")
    p.add_argument("--cases", default="", help="--validate: comma list of case names (default: all)")
    p.add_argument("--calibrate", nargs="+", metavar="FILE", default=None,
                   help="benchmark JSON lines (launch/benchmark.py, gpu_check.sh's benchmarks.jsonl): fit the compute "
                        "efficiency per card, model, checkpointing mode and compile, print each row's prediction "
                        "before and after, write the table to --write")
    p.add_argument("--write", default="runs/plan/efficiency.json",
                   help="--calibrate: where the calibrated table goes (with the --efficiency table's entries, when "
                        "one is given, under the fitted ones)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parse_launched(p, argv, intermixed=True)
    if not args.validate and not args.calibrate and not args.config:
        p.error("--config is required (or --validate, --calibrate)")
    if args.gpus < 1:
        p.error("--gpus must be >= 1")
    given = args.efficiency
    args.efficiency = efficiency_arg(p, given)
    # the calibrated table's path, where --efficiency names one (--calibrate carries its entries on)
    args.efficiency_file = given if given is not None and not isinstance(args.efficiency, float) else None
    return args


def efficiency_arg(parser, value):
    """--efficiency: None (the measured defaults), a number in (0, 1], or a calibrated table's path (over the
    defaults)."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        from scale_refiner.plan.efficiency import planner_table
        try:
            return planner_table(value)
        except ValueError as err:
            parser.error(f"--efficiency: {err}")
    if not 0 < number <= 1:
        parser.error("--efficiency must be in (0, 1] or a table written by --calibrate")
    return number


def calibrate_main(args) -> int:
    from scale_refiner.plan.calibrate import CalibrationError, calibrate, calibration_text, rows_as_json, write_table
    from scale_refiner.plan.efficiency import EfficiencyTable
    try:
        cal = calibrate(args.calibrate, args.efficiency)
    except (CalibrationError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    written = None
    if cal.table.entries:
        # a calibrated table given with --efficiency carries its entries on (not the defaults: loaded anyway)
        keep = EfficiencyTable.load(args.efficiency_file).entries.values() if args.efficiency_file else ()
        write_table(cal, args.write, keep)
        written = args.write
    if args.json:
        print(json.dumps({"rows": rows_as_json(cal), "fitted": cal.table.as_dict(), "written": written,
                          "notes": cal.notes}, indent=1))
    else:
        print(calibration_text(cal, written))
    return 0 if all(r.fitted is not None for r in cal.results) else 1


def validate_main(args) -> int:
    import torch
    from scale_refiner.plan.validate import CASES, run_validation, validation_table
    torch.set_num_threads(1)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = set(names) - {c.name for c in CASES}
    if unknown:
        print(f"error: unknown case(s) {sorted(unknown)}; known: {[c.name for c in CASES]}", file=sys.stderr)
        return 2
    rows = run_validation([c for c in CASES if not names or c.name in names])
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(validation_table(rows))
    return 0 if all(r["within"] for r in rows) else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.validate:
        return validate_main(args)
    if args.calibrate:
        return calibrate_main(args)
    from scale_refiner.config import ConfigError, load_config
    from scale_refiner.plan.counts import meta_refiner, model_counts
    from scale_refiner.plan.hardware import resolve_gpu
    from scale_refiner.plan.report import as_json, as_text
    from scale_refiner.plan.search import plan_all
    try:
        cfg = load_config(args.config, args.overrides)
        gpu = resolve_gpu(args.gpu, memory_gb=args.gpu_memory_gb, peak_tflops=args.peak_tflops,
                          nvlink_gbps=args.nvlink_gbps, internode_gbps=args.internode_gbps,
                          hbm_gbps=args.hbm_gbps, gpus_per_node=args.gpus_per_node)
        if args.scaling:
            from scale_refiner.plan.scaling import scaling_rows, scaling_text
            counts = [int(n) for n in args.scaling.split(",") if n.strip()]
            if not counts or min(counts) < 1:
                raise ValueError(f"--scaling wants GPU counts >= 1, got {args.scaling!r}")
            rows = scaling_rows(cfg, args.config, gpu, counts, args.efficiency)
            print(json.dumps(rows, indent=1) if args.json else scaling_text(cfg, args.config, gpu, args.efficiency, rows))
            return 0
        plans = plan_all(cfg, args.config, gpu, args.gpus, args.efficiency)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    refiner = meta_refiner(cfg)
    counts = {s: model_counts(cfg, s, refiner).as_dict() for s in cfg.stages.run}
    if args.json:
        print(json.dumps(as_json(cfg, args.config, gpu, args.gpus, args.efficiency, plans, counts), indent=1))
    else:
        print(as_text(cfg, args.config, gpu, args.gpus, args.efficiency, plans, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
