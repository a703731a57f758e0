"""Sweep the demo's chain (MAE -> MIM-Refiner -> evaluation) over refinement recipes and seeds, into one table.

    python launch/sweep_demo.py --out runs/sweep --seeds 0,1,2                          # the demo's recipe, 3 seeds
    python launch/sweep_demo.py --out runs/sweep --axis stages.refine.base_lr=1e-3,2e-3,4e-3 \\
        --axis stages.refine.layer_decay=0.65,1.0 --axis mae:mae.decoder_depth=1,2       # one factor at a time
    python launch/sweep_demo.py --out runs/sweep --cell "stages.refine.base_lr=2e-3 queue.size=4096"
    python launch/sweep_demo.py --grid fidelity --seeds 0                                # the preset grid

A cell is a recipe: the demo's configs (--mae-config, --refine-config) with overrides; ``mae:KEY=VALUE`` goes to
the MAE pre-training, any other ``KEY=VALUE`` to the refinement. ``--axis KEY=V1,V2,...`` adds one cell per value,
each differing from the base (``--base``) in that key alone; ``--cell`` adds a cell of several overrides.

Each (cell, seed) is one run of ``launch/demo.py`` (printed, re-runnable alone) into ``<out>/cells/<cell>/s<seed>``;
the MAE of a (MAE recipe, seed) is pre-trained and evaluated once in ``<out>/mae/<recipe>/s<seed>`` and shared by
every cell that refines it. Finished runs are reused, so an interrupted sweep continues where it stopped.

Two reference rows put the numbers on a scale: k-NN and k-means on the raw pixels (the evaluation's own
preprocessing: resized, normalised, flattened) and on a random-init encoder (the MAE's initial weights, the
same seeds). Writes ``<out>/sweep.md``, ``sweep.csv`` and ``sweep.json`` (every seed's numbers).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from scale_refiner.cli.demo import mean_std

ROOT = Path(__file__).resolve().parents[2]

# The grid docs/fidelity.md reports: one factor at a time around the demo's recipe (configs/demo.yaml,
# configs/demo_mae.yaml), each axis a setting the miniature may need sized differently from the paper's ViT-L.
PRESET_GRIDS = {
    "fidelity": [
        "stages.refine.base_lr=1.0e-3,4.0e-3",
        "stages.refine.layer_decay=0.65",
        "stages.refine.warmup_epochs=0.25",
        "stages.refine.epochs=6,12",
        "stages.refine.ema=0.99,0.999",
        "heads.temperature=0.1",
        "stages.refine.topk=5",
        "queue.size=2048",
        "augment.num_local=4",
        "mae:mae.decoder_depth=2",
        "mae:mae.decoder_dim=96",
    ],
}
REFINE_STEP = "MIM-Refiner refined (heads, then refine)"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--mae-root", default=None,
                   help="where the shared MAEs live (default <out>/mae): sweeps of other cells or seeds may share them")
    p.add_argument("--seeds", default="0", help="comma-separated run.seed values (MAE and refinement alike)")
    p.add_argument("--mae-seed", type=int, default=None,
                   help="one MAE seed for every run (the seeds then vary the refinement alone); with 0 and the "
                        "demo's MAE recipe every run starts from the shipped MAE, as the demo does")
    p.add_argument("--base", action="append", default=[], metavar="[mae:]KEY=VALUE",
                   help="overrides of every cell (the point the axes vary around)")
    p.add_argument("--axis", action="append", default=[], metavar="[mae:]KEY=V1,V2",
                   help="one cell per value, the base otherwise")
    p.add_argument("--cell", action="append", default=[], metavar="'[mae:]K=V [mae:]K=V'",
                   help="one cell of several overrides (space-separated)")
    p.add_argument("--grid", choices=sorted(PRESET_GRIDS), help="add a preset grid's axes")
    p.add_argument("--no-base-cell", action="store_true", help="leave the base recipe itself out of the cells")
    p.add_argument("--grid-seeds", type=int, default=0,
                   help="run the cells other than the base with the first N seeds only (0: all seeds)")
    p.add_argument("--mae-config", default="configs/demo_mae.yaml")
    p.add_argument("--refine-config", default="configs/demo.yaml")
    p.add_argument("--shard-root", default=None, help="passed to launch/demo.py")
    p.add_argument("--eval-limit", type=int, default=10000, help="passed to launch/demo.py")
    p.add_argument("--kmeans-runs", type=int, default=3, help="passed to launch/demo.py")
    p.add_argument("--no-references", action="store_true", help="skip the raw-pixel and random-init rows")
    p.add_argument("--reference-seeds", type=int, default=0,
                   help="the random-init row with the first N seeds only (0: all seeds); the raw-pixel row has "
                        "no training seed and is computed once")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each with cores / jobs threads and its output in <cell>/s<seed>.log")
    p.add_argument("--dry-run", action="store_true", help="print the runs, run nothing")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing but the references: the table of the runs that finished (their summary.json)")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.seeds:
        p.error("--seeds needs at least one seed")
    args.out = Path(args.out).resolve()
    args.mae_root = Path(args.mae_root).resolve() if args.mae_root else args.out / "mae"
    return args


# --------------------------------------------------------------------------------------------------- the cells
def split_overrides(items) -> tuple:
    """``[mae:]KEY=VALUE`` items -> (MAE overrides, refinement overrides)."""
    mae, refine = [], []
    for item in items:
        if "=" not in item:
            raise SystemExit(f"error: override {item!r} is not KEY=VALUE")
        (mae if item.startswith("mae:") else refine).append(item[4:] if item.startswith("mae:") else item)
    return mae, refine


def merged(base: list, extra: list) -> list:
    """``extra`` replaces the base's value of a key it sets (later overrides win in load_config too, but a recipe
    written without the shadowed value reads and hashes as what it is)."""
    keys = {o.split("=", 1)[0] for o in extra}
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(extra)


def build_cells(args) -> list:
    """[{name, mae, refine}], the base first (unless --no-base-cell), then every axis value, then every --cell."""
    base = list(args.base)
    axes = [*(PRESET_GRIDS[args.grid] if args.grid else []), *args.axis]
    specs = [] if args.no_base_cell else [("base", [])]
    for axis in axes:
        key, _, values = axis.partition("=")
        if not values:
            raise SystemExit(f"error: --axis {axis!r} is not KEY=V1,V2,...")
        specs += [(f"{key}={v}", [f"{key}={v}"]) for v in values.split(",")]
    specs += [(cell, cell.split()) for cell in args.cell]
    cells, seen = [], set()
    for name, extra in specs:
        mae, refine = split_overrides(merged(base, extra))
        key = json.dumps([mae, refine])
        if key in seen:  # an axis value equal to the base: one run serves both
            continue
        seen.add(key)
        cells.append({"name": name, "mae": mae, "refine": refine})
    return cells


def slug(overrides: list, empty: str = "base") -> str:
    """A directory name for a recipe: readable, and unique by a hash of the full overrides."""
    if not overrides:
        return empty
    text = "_".join(o.replace("stages.", "").replace("augment.", "") for o in overrides)
    text = re.sub(r"[^A-Za-z0-9=._-]+", "-", text)[:60]
    return f"{text}-{hashlib.sha1(json.dumps(overrides).encode()).hexdigest()[:6]}"


def stage_steps(args, cell) -> dict:
    """Optimiser steps of each stage of the cell's recipe (what the trainer plans for it)."""
    from scale_refiner.config import PretrainConfig, load_config
    from scale_refiner.engine.trainer import plan_stage
    mae_cfg = load_config(ROOT / args.mae_config, cell["mae"], schema_class=PretrainConfig)
    cfg = load_config(ROOT / args.refine_config, cell["refine"])
    steps = {"mae": plan_stage(mae_cfg.stages.mae, mae_cfg.data.samples_per_epoch, mae_cfg.data.batch_size,
                               mae_cfg.run.max_steps).total_steps}
    for name in ("heads", "refine"):
        steps[name] = plan_stage(getattr(cfg.stages, name), cfg.data.samples_per_epoch, cfg.data.batch_size,
                                 cfg.run.max_steps).total_steps
    return steps


# ---------------------------------------------------------------------------------------------------- running
def call(command: list, dry_run: bool, env=None, log=None) -> None:
    print(f"\n$ {shlex.join(['python', *command[1:]])}" + (f"   (output: {log})" if log else ""), flush=True)
    if dry_run:
        return
    if log is None:
        status = subprocess.call(command, cwd=ROOT, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            status = subprocess.call(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if status:
        raise SystemExit(f"error: exit status {status}: {shlex.join(command)}" + (f" (see {log})" if log else ""))


def run_all(jobs: list, parallel: int, dry_run: bool) -> None:
    """``jobs``: [(command, log)]. One at a time in the foreground, or ``parallel`` at a time, each with its
    share of the cores (threads beyond the cores only slow every run down) and its output in its log."""
    if parallel <= 1:
        for command, _ in jobs:
            call(command, dry_run)
        return
    from concurrent.futures import ThreadPoolExecutor
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // parallel)))
    with ThreadPoolExecutor(parallel) as pool:
        for future in [pool.submit(call, command, dry_run, env, log) for command, log in jobs]:
            future.result()


def demo_command(args, cell, seed: int) -> tuple:
    run_dir = args.out / "cells" / slug(cell["mae"] + cell["refine"]) / f"s{seed}"
    mae_seed = seed if args.mae_seed is None else args.mae_seed
    mae_dir = args.mae_root / slug(cell["mae"]) / f"s{mae_seed}"
    command = [sys.executable, "launch/demo.py", "--out", str(run_dir), "--mae-dir", str(mae_dir),
               "--mae-config", args.mae_config, "--refine-config", args.refine_config,
               "--eval-limit", str(args.eval_limit), "--kmeans-runs", str(args.kmeans_runs),
               "--protocols", "knn,blocks,kmeans", "--no-references",
               f"--mae=run.seed={mae_seed}", f"--refine=run.seed={seed}",
               *(f"--mae={o}" for o in cell["mae"]), *(f"--refine={o}" for o in cell["refine"])]
    if args.shard_root:
        command += ["--shard-root", args.shard_root]
    return command, run_dir, mae_dir


def recipe_matches(args, cell, seed: int, run_dir: Path) -> bool:
    """Whether a finished run was made with the cell's recipe as it resolves now: a cell's directory is named
    by its overrides, so an edited configs/demo.yaml leaves runs of the old recipe under the same name."""
    from scale_refiner.config import load_config, to_dict
    recorded = run_dir / "refined" / "config.json"
    if not recorded.is_file():
        return False
    want = to_dict(load_config(ROOT / args.refine_config, [*cell["refine"], f"run.seed={seed}"]))
    have = json.loads(recorded.read_text())

    def recipe(c):
        model = {k: v for k, v in c["model"].items() if k != "weights"}  # the MAE's path, not its recipe
        data = {k: c["data"].get(k) for k in ("dataset", "batch_size", "samples_per_epoch")}
        return [model, c["heads"], c["queue"], c["augment"], c["stages"], data, c["run"]["seed"]]
    return recipe(want) == recipe(have)


def seed_result(summary: dict) -> dict:
    """One (cell, seed) run's numbers from its demo summary.json (accuracies in [0, 1])."""
    enc = summary["encoders"]
    mae, online, ema = enc["MAE"], enc["refined (online)"], enc.get("refined (EMA)")
    out = {"mae_knn20": mae["knn"]["20"], "mae_best_block_knn20": max(mae["blocks"]["knn20"]),
           "mae_nmi": mae["kmeans"]["nmi"], "online_knn20": online["knn"]["20"], "online_nmi": online["kmeans"]["nmi"],
           "refine_minutes": summary["step_seconds"].get(REFINE_STEP, float("nan")) / 60,
           "mae_minutes": summary["step_seconds"].get("MAE pre-training", float("nan")) / 60,
           "blocks": {name: m["blocks"]["knn20"] for name, m in enc.items()}}
    if ema is not None:
        out.update(ema_knn20=ema["knn"]["20"], ema_nmi=ema["kmeans"]["nmi"])
    return out


def raw_pixel_metrics(args) -> dict:
    """k-NN@20 and k-means NMI on flattened pixels, with the protocols' own preprocessing and data: the demo's
    reference row, kept in ``<out>/raw_pixels`` and reused while the data, image count and restarts are the same.
    Keyed by seed 0 (no training seed applies to pixels)."""
    from scale_refiner.cli.demo import raw_pixel_metrics as demo_raw_pixels
    from scale_refiner.data.shards import EMBEDDED_DATASET
    data = {"name": EMBEDDED_DATASET, "shards": None,
            "overrides": [f"data.shard_root={args.shard_root}"] if args.shard_root else []}
    m = demo_raw_pixels(args, data, args.out / "raw_pixels")
    return {0: {"knn20": m["knn"]["20"], "nmi": m["kmeans"]["nmi"]}}


def random_init_metrics(args, dry_run: bool) -> dict:
    """The demo encoder at the MAE's initial weights (the same seeds): what pre-training starts from."""
    from scale_refiner.cli.demo import random_init_weights
    results = {}
    for seed in args.seeds[:args.reference_seeds or None]:
        where = args.out / "random_init" / f"s{seed}"
        if not (where / "metrics.json").is_file():
            cfg, weights = random_init_weights(args.mae_config, [f"run.seed={seed}"], where)
            command = [sys.executable, "launch/evaluate.py", "--model", cfg.model.name, "--weights", str(weights),
                       "--out", str(where), "--protocols", "knn,blocks,kmeans", "--limit", str(args.eval_limit),
                       "--kmeans-runs", str(args.kmeans_runs), "--seed", str(seed)]
            if args.shard_root:  # evaluate.py finds the embedded shards through the environment's shard root
                command = ["env", f"SCALE_REFINER_SHARD_ROOT={Path(args.shard_root).resolve()}", *command]
                print(f"\n$ {shlex.join(command)}", flush=True)
                if not dry_run and subprocess.call(command, cwd=ROOT):
                    raise SystemExit(f"error: {shlex.join(command)} failed")
            else:
                call(command, dry_run)
        if dry_run:
            continue
        m = json.loads((where / "metrics.json").read_text())
        results[seed] = {"knn20": m["knn"]["20"], "nmi": m["kmeans"]["nmi"],
                         "best_block_knn20": max(m["blocks"]["knn20"])}
    return results


# ------------------------------------------------------------------------------------------------------ table
def fmt(values, scale: float = 100.0, digits: int = 1) -> str:
    mean, spread = mean_std(values)
    if math.isnan(mean):
        return "-"
    if len([v for v in values if v is not None]) == 1:
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * spread:.{digits}f}"


COLUMNS = ["recipe", "steps (MAE / heads + refine)", "refine min / seed", "MAE k-NN@20 (best block)",
           "online k-NN@20", "EMA k-NN@20", "EMA - MAE best block", "MAE NMI", "EMA NMI", "EMA - MAE NMI", "seeds"]


def table_rows(rows: list, references: dict) -> list:
    """Rows of the table as lists of strings, references first (raw pixels, random init), then the cells."""
    out = []
    if "raw_pixels" in references:
        r = list(references["raw_pixels"].values())
        out.append(["raw pixels (no encoder)", "-", "-", fmt([x["knn20"] for x in r]), "-", "-", "-",
                    fmt([x["nmi"] for x in r]), "-", "-", str(len(r))])
    if "random_init" in references:
        r = list(references["random_init"].values())
        out.append(["random-init encoder", "0", "-", f"{fmt([x['knn20'] for x in r])} "
                    f"({fmt([x['best_block_knn20'] for x in r])})", "-", "-", "-",
                    fmt([x["nmi"] for x in r]), "-", "-", str(len(r))])
    for row in rows:
        seeds = list(row["seeds"].values())
        if not seeds:
            continue

        def col(key):
            return [s.get(key) for s in seeds]
        gain = [s["ema_knn20"] - s["mae_best_block_knn20"] for s in seeds if "ema_knn20" in s]
        nmi_gain = [s["ema_nmi"] - s["mae_nmi"] for s in seeds if "ema_nmi" in s]
        st = row["steps"]
        out.append([row["name"], f"{st['mae']} / {st['heads']} + {st['refine']}", fmt(col("refine_minutes"), 1.0),
                    f"{fmt(col('mae_knn20'))} ({fmt(col('mae_best_block_knn20'))})", fmt(col("online_knn20")),
                    fmt(col("ema_knn20")), fmt(gain), fmt(col("mae_nmi")), fmt(col("ema_nmi")), fmt(nmi_gain),
                    ",".join(str(s) for s in row["seeds"])])
    return out


def markdown(rows: list) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_seeds(args, row: dict, run_dirs: dict) -> list:
    """One per-block plot of a cell over its seeds: each encoder's mean curve with a +- 1 std band, and the
    random-init encoder's for scale. Written as ``<out>/plots/<cell>.{svg,png}``; returns the paths."""
    from scale_refiner.cli.demo import REFERENCE_NAMES, mean_curves, plot_per_block
    curves, grouped = {}, {}
    random_init = args.out / "random_init" / f"s{args.seeds[0]}" / "metrics.json"
    if random_init.is_file():
        blocks = json.loads(random_init.read_text()).get("blocks")
        if blocks:
            curves["random init"] = (blocks["labels"], blocks["knn20"], [0.0] * len(blocks["knn20"]))
    for seed, run_dir in run_dirs.items():
        for name, m in json.loads((run_dir / "summary.json").read_text())["encoders"].items():
            if m.get("blocks") and name not in REFERENCE_NAMES:
                grouped.setdefault(name, []).append(m["blocks"])
    curves.update(mean_curves(grouped, shared={"MAE"} if args.mae_seed is not None else ()))  # --mae-seed: one MAE
    paths = [args.out / "plots" / f"{slug(row['mae'] + row['refine'])}.{ext}" for ext in ("svg", "png")]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    plot_per_block(curves, paths, f"per-block k-NN@20: {row['name']} ({args.eval_limit or 'all'} images)")
    return paths


def write_outputs(out: Path, rows: list, references: dict, context: dict) -> str:
    table_r = table_rows(rows, references)
    text = markdown(table_r)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(text)
    with open(out / "sweep.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(table_r)
    (out / "sweep.json").write_text(json.dumps({**context, "references": references, "cells": rows}, indent=2,
                                               default=str) + "\n")
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    cells = build_cells(args)
    print(f"sweep: {len(cells)} cell(s) x {len(args.seeds)} seed(s) into {args.out}", flush=True)
    references = {}
    if not args.no_references:
        references["random_init"] = random_init_metrics(args, args.dry_run)
        if not args.dry_run:
            references["raw_pixels"] = raw_pixel_metrics(args)
    rows = []
    context = {"seeds": args.seeds, "eval_limit": args.eval_limit, "kmeans_runs": args.kmeans_runs,
               "mae_config": args.mae_config, "refine_config": args.refine_config, "base": args.base}
    jobs, runs = [], []
    for n, cell in enumerate(cells):
        row = {**cell, "steps": stage_steps(args, cell), "seeds": {}, "commands": {}}
        rows.append(row)
        seeds = args.seeds if (n == 0 and not args.no_base_cell) else args.seeds[:args.grid_seeds or None]
        for seed in seeds:
            command, run_dir, _ = demo_command(args, cell, seed)
            row["commands"][seed] = shlex.join(["python", *command[1:]])
            runs.append((row, seed, run_dir))
            # runs sharing an MAE may run at once: the demo locks its directory, the first pre-trains and
            # evaluates it, the others wait for it and reuse both
            jobs.append((command, run_dir.parent / f"s{seed}.log"))
    if args.table_only:
        for row, seed, run_dir in runs:
            if not (run_dir / "summary.json").is_file():
                continue
            if not recipe_matches(args, row, seed, run_dir):
                print(f"skipped {run_dir}: made with another recipe than the cell's as it resolves now "
                      f"(an edited {args.refine_config}?)", flush=True)
                continue
            row["seeds"][seed] = seed_result(json.loads((run_dir / "summary.json").read_text()))
    elif args.jobs <= 1:  # in the cells' order, the table rewritten after each: an interrupted sweep keeps its rows
        for (row, seed, run_dir), (command, _) in zip(runs, jobs):
            call(command, args.dry_run)
            if not args.dry_run:
                row["seeds"][seed] = seed_result(json.loads((run_dir / "summary.json").read_text()))
                write_outputs(args.out, rows, references, {**context, "minutes": (time.time() - started) / 60})
    else:
        run_all(jobs, args.jobs, args.dry_run)
        if not args.dry_run:
            for row, seed, run_dir in runs:
                row["seeds"][seed] = seed_result(json.loads((run_dir / "summary.json").read_text()))
    if args.dry_run:
        return 0
    for row in rows:  # a cell measured on several seeds: its curves as mean and spread
        done = {seed: run_dir for r, seed, run_dir in runs if r is row and seed in row["seeds"]}
        if len(done) > 1:
            row["plot"] = str(plot_seeds(args, row, done)[0])
    text = write_outputs(args.out, rows, references, {**context, "minutes": (time.time() - started) / 60})
    print("\n" + text)
    print(f"(k-NN@20 and k-means NMI in %, mean ± sample std over seeds {args.seeds}; first {args.eval_limit or 'all'} "
          f"images of each split; {(time.time() - started) / 60:.1f} min)\ntable: {args.out / 'sweep.md'}  "
          f"every seed: {args.out / 'sweep.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
