"""The embedded main job, end to end on a fresh machine: data -> MAE pre-training -> refinement -> evaluation.

    python launch/demo.py                      # what `make demo` runs: about 10 minutes on 2 CPU cores
    python launch/demo.py --validate           # `make validate`: the longer validation recipe (under an hour)
    python launch/demo.py --out runs/demo2 --mae stages.mae.epochs=2 --refine heads.norm=syncbn --ranks 2
    python launch/demo.py --shards shards/flowers --out runs/flowers       # any shard set with a manifest
    python launch/demo.py --source folder:/data/flowers --out runs/flowers # class folders: shards written first

1. writes the Fashion-MNIST shards (from Debian's dataset-fashion-mnist) if they are absent; or, with
   --source, writes the source's shards into <out>/shards (reused while the source and --test-fraction are the
   same); or, with --shards, reads that set. Every later step trains and evaluates on that data;
2. pre-trains the demo ViT as an MAE (launch/pretrain_mae.py, configs/demo_mae.yaml), or reuses the weights of
   an earlier run of the same recipe;
3. refines it with MIM-Refiner, heads stage then refine stage (launch/refine.py, configs/demo.yaml), once per
   variant (``--validate``: NNA vs NNCLR, bn vs syncbn vs async, on 2 ranks);
4. evaluates the MAE and the refined encoders (launch/evaluate.py);
5. prints one table and where the TensorBoard logs, plots and exports are.

Every step is the project's own command, run as a subprocess and printed first, so each can be re-run alone.
A step that fails stops the job with its exit status. Re-running resumes: finished steps are reused.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (configs/, launch/): the steps run from it


# --validate: the MAE 6x longer (3 full epochs), four refinements on 2 ranks, every protocol
VALIDATION_MAE = ["stages.mae.epochs=3", "stages.mae.warmup_epochs=0.3", "data.samples_per_epoch=0"]
VALIDATION_REFINE = ["data.samples_per_epoch=6144"]  # 1.5x the demo's refinement: 24 heads + 144 refine steps
VALIDATION_VARIANTS = {
    "nna_bn": ["heads.objective=nna", "heads.norm=bn"],
    "nnclr_bn": ["heads.objective=nnclr", "heads.norm=bn"],
    "nna_syncbn": ["heads.objective=nna", "heads.norm=syncbn"],
    "nna_async": ["heads.objective=nna", "heads.norm=async"],
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="run directory: mae/, refine*/, eval/ go under it "
                                               "(default runs/demo, runs/validate with --validate)")
    p.add_argument("--mae-config", default="configs/demo_mae.yaml")
    p.add_argument("--refine-config", default="configs/demo.yaml")
    p.add_argument("--shard-root", default=None,
                   help="where the embedded Fashion-MNIST shards are written and found (data.shard_root; default: "
                        "$SCALE_REFINER_SHARD_ROOT, else shards/ of the checkout, else ~/.cache/scale-refiner/shards)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--shards", metavar="DIR", help="a shard set (make_shards; with a manifest and a test split) "
                                                     "to pre-train, refine and evaluate on instead of Fashion-MNIST")
    data.add_argument("--source", metavar="SOURCE",
                      help="make_shards source (folder:PATH of class folders, ...): its shards are written into "
                           "<out>/shards, then used as --shards")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="with --source folder:PATH: the part of each class held out as the test split (default 0.2 "
                        "when PATH has no train/ folder of its own, else none: its val/ or test/ is the test split)")
    p.add_argument("--mae-dir", default=None,
                   help="the MAE run directory (default <out>/mae); the sweep points several runs at one, so one "
                        "pre-training serves every refinement recipe of a seed")
    p.add_argument("--mae", action="append", default=[], metavar="KEY=VALUE", help="pre-training override")
    p.add_argument("--refine", action="append", default=[], metavar="KEY=VALUE", help="refinement override")
    p.add_argument("--ranks", type=int, default=1,
                   help="refine on N ranks (deepspeed launcher, ZeRO-3; CPU ranks with gloo without a GPU)")
    p.add_argument("--eval-limit", type=int, default=10000,
                   help="first N images of each split for the evaluation (0: all; Fashion-MNIST has 60000 / 10000)")
    p.add_argument("--protocols", default="knn,blocks,kmeans", help="launch/evaluate.py protocols")
    p.add_argument("--kmeans-runs", type=int, default=3)
    p.add_argument("--validate", action="store_true",
                   help="the validation recipe: MAE for 3 full epochs, refinement variants NNA/NNCLR x bn/syncbn/async "
                        "on 2 ranks, all protocols on the full splits")
    args = p.parse_args(argv)
    if args.validate:
        args.mae = VALIDATION_MAE + args.mae
        args.ranks = 2 if args.ranks == 1 else args.ranks
        args.protocols = "all"  # on the first 10,000 train (the k-NN bank, probe set) and all 10,000 test images
        args.variants = {name: VALIDATION_REFINE + overrides + args.refine
                         for name, overrides in VALIDATION_VARIANTS.items()}
    else:
        args.variants = {"refined": args.refine}
    # absolute: the steps run from the repository, whatever directory the demo was started in
    args.out = Path(args.out or ("runs/validate" if args.validate else "runs/demo")).resolve()
    args.mae_dir = Path(args.mae_dir).resolve() if args.mae_dir else args.out / "mae"
    args.shard_root = str(Path(args.shard_root).resolve()) if args.shard_root else None
    if args.test_fraction is not None and not (args.source or "").startswith("folder:"):
        p.error("--test-fraction goes with --source folder:PATH")
    return args


STEP_SECONDS: dict = {}  # step -> wall seconds of this invocation (a reused step takes ~ the start-up time)


def run(step: str, args, env=None) -> None:
    command = [sys.executable, *args]
    print(f"\n== {step}\n$ {shlex.join(['python', *args])}", flush=True)
    started = time.time()
    status = subprocess.call(command, cwd=ROOT, env=None if env is None else dict(os.environ, **env))
    if status:
        raise SystemExit(f"error: step '{step}' failed with exit status {status}: {shlex.join(command)}")
    STEP_SECONDS[step] = round(time.time() - started, 1)
    print(f"== {step}: {STEP_SECONDS[step]:.0f} s", flush=True)


def evaluated(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


@contextlib.contextmanager
def shared_lock(directory):
    """Hold an exclusive lock on ``directory`` (None: no lock): concurrent demo runs sharing one MAE directory
    (the sweep's) take turns to pre-train and evaluate it, so the first does the work and the rest reuse it."""
    if directory is None:
        yield
        return
    import fcntl
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _evaluation_key(command: list, source: list) -> dict:
    """What an evaluation's metrics depend on: its command and the weights file it read (size and time)."""
    weights = Path(source[source.index("--weights") + 1])
    return {"command": command, "weights": [weights.stat().st_size, weights.stat().st_mtime_ns]}


def reusable_evaluation(where: Path, command: list, source: list) -> bool:
    record = where / "demo_evaluation.json"
    return ((where / "metrics.json").is_file() and record.is_file()
            and json.loads(record.read_text()) == _evaluation_key(command, source))


def record_evaluation(where: Path, command: list, source: list) -> None:
    (where / "demo_evaluation.json").write_text(json.dumps(_evaluation_key(command, source)) + "\n")


def summary_table(results: dict) -> str:
    """One row per encoder: k-NN, k-means, the per-block k-NN peak; linear probe and low-shot when run."""
    def pct(v):
        return f"{100 * v:.1f}"
    any_linear = any("linear" in m for m in results.values())
    any_lowshot = any("lowshot" in m for m in results.values())
    header = ["encoder", "k-NN@10", "k-NN@20", "k-means ACC", "k-means NMI", "per-block k-NN@20 peak"]
    header += ["linear probe"] * any_linear + ["1 / 2 / 5-shot"] * any_lowshot
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in results.items():
        knn, km, blocks = m.get("knn", {}), m.get("kmeans"), m.get("blocks")
        cells = [name, pct(knn["10"]) if "10" in knn else "-", pct(knn["20"]) if "20" in knn else "-"]
        cells += [pct(km["acc"]), pct(km["nmi"])] if km else ["-", "-"]
        if blocks:
            accs = blocks["knn20"]
            best = max(range(len(accs)), key=accs.__getitem__)
            cells.append(f"{pct(accs[best])} at {blocks['labels'][best]} (final {pct(accs[-1])})")
        else:
            cells.append("-")
        if any_linear:
            cells.append(pct(m["linear"]["best"]["test"]) if "linear" in m else "-")
        if any_lowshot:
            cells.append(" / ".join(pct(r["mean"]) for r in m["lowshot"].values()) if "lowshot" in m else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_per_block(results: dict, paths, title: str) -> None:
    """Every encoder's per-block k-NN@20 on one set of axes (blocks on x): where the MAE's representation
    peaks, and what refinement does to the late blocks, in one picture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    labels = None
    for (name, m), style in zip(results.items(), ("o-", "s--", "^-", "d:", "v-.", "x-")):
        blocks = m["blocks"]
        labels = blocks["labels"]
        ax.plot(range(len(labels)), [100 * a for a in blocks["knn20"]], style, label=name)
    ax.set_xticks(range(len(labels)), [lab.replace("block", "") for lab in labels])
    ax.set_xlabel("block (raw CLS; final = after the final norm, standardised)")
    ax.set_ylabel("k-NN@20 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=110)
    plt.close(fig)


def claim_run_dir(run_dir: Path, recipe: dict) -> None:
    """A refinement directory is resumed only for the recipe that made it (resume=auto alone would re-export an
    old run under a new label): record the recipe on first use, refuse a different one later."""
    path = run_dir / "demo_recipe.json"
    if path.is_file():
        if json.loads(path.read_text()) != recipe:
            raise SystemExit(f"error: {run_dir} holds a refinement of another recipe ({path}); use another --out "
                             f"or remove {run_dir}")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe, indent=2) + "\n")


def refine_command(args, out_dir: Path, weights: Path, overrides) -> list:
    job = ["launch/refine.py", "--config", args.refine_config, "--eval-samples", "0", f"run.out_dir={out_dir}",
           f"model.weights={weights}", "run.resume=auto", *overrides]
    if args.ranks == 1:
        return job
    from scale_refiner.engine.distributed import free_port
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(args.ranks), "--master_port", str(free_port()), *job,
            "engine.kind=deepspeed", "engine.zero_config=ds_configs/cpu_demo.json"]


def prepare_data(args) -> dict:
    """The data every step reads: the embedded Fashion-MNIST (written under the shard root if absent), the shards
    of ``--source`` written into ``<out>/shards``, or the ``--shards`` set. Returns its name, the shard directory
    (None: embedded), the overrides of the training steps and the options of the evaluations."""
    from scale_refiner.data.shards import (EMBEDDED_DATASET, MANIFEST, ShardError, ensure_fashion_mnist_shards,
                                           load_manifest, make_shards, shard_root)
    if not (args.shards or args.source):
        path = ensure_fashion_mnist_shards(shard_root(args.shard_root) / EMBEDDED_DATASET, log=print)
        print(f"== data: Fashion-MNIST shards in {path}", flush=True)
        overrides = [f"data.shard_root={args.shard_root}"] if args.shard_root else []
        return {"name": EMBEDDED_DATASET, "shards": None, "overrides": overrides, "evaluate": []}
    if args.source:
        shards = args.out / "shards"
        test_fraction = args.test_fraction
        if test_fraction is None:
            folder = Path(args.source[len("folder:"):]) if args.source.startswith("folder:") else None
            test_fraction = 0.2 if folder is not None and not (folder / "train").is_dir() else 0.0
        written = shards / MANIFEST
        recorded = json.loads(written.read_text()) if written.is_file() else {}
        if recorded.get("source") == args.source and recorded.get("test_fraction", 0.0) == test_fraction:
            print(f"== data: shards of {args.source} in {shards} (reused)", flush=True)
        else:
            print(f"== data: writing the shards of {args.source} into {shards}", flush=True)
            try:
                make_shards(args.source, shards, samples_per_shard=2000, test_fraction=test_fraction, log=print)
            except ShardError as err:
                raise SystemExit(f"error: --source {args.source}: {err}") from None
    else:
        shards = Path(args.shards).resolve()
    try:
        shard_set = load_manifest(shards, verify="size")
        for split in ("train", "test"):
            shard_set.split(split)  # both are read: train by every step, test by every evaluation
    except ShardError as err:
        raise SystemExit(f"error: --shards {shards}: {err}") from None
    counts = ", ".join(f"{s} {shard_set.manifest['splits'][s]['num_samples']}" for s in ("train", "test"))
    print(f"== data: {shard_set.dataset!r} ({shard_set.num_classes} classes; {counts} images) in {shards}",
          flush=True)
    return {"name": shard_set.dataset, "shards": str(shards),
            "overrides": [f"data.dataset={shard_set.dataset}", f"data.train_shards={shards}"],
            "evaluate": ["--train-shards", str(shards)]}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out
    started = time.time()

    data = prepare_data(args)
    if data["overrides"]:  # every step reads the same data
        args.mae = [*data["overrides"], *args.mae]
        args.variants = {name: [*data["overrides"], *o] for name, o in args.variants.items()}

    mae_dir, eval_dir = args.mae_dir, out / "eval"
    shared_mae = mae_dir != out / "mae"
    with shared_lock(mae_dir):  # runs sharing an MAE (--mae-dir) pre-train it once: the others wait, then reuse
        run("MAE pre-training", ["launch/pretrain_mae.py", "--config", args.mae_config, f"run.out_dir={mae_dir}",
                                 "run.resume=auto", *args.mae])
    weights = mae_dir / "mae_pretrained.pth"
    model_name = json.loads((mae_dir / "config.json").read_text())["model"]["name"]
    common = ["--protocols", args.protocols, "--limit", str(args.eval_limit), "--kmeans-runs", str(args.kmeans_runs),
              *data["evaluate"]]
    encoders = {"MAE": ("mae", ["--model", model_name, "--weights", str(weights)])}
    for n, (variant, overrides) in enumerate(args.variants.items()):
        refine_dir = out / variant
        claim_run_dir(refine_dir, {"config": args.refine_config, "overrides": list(overrides), "ranks": args.ranks,
                                   "mae_recipe": json.loads((mae_dir / "mae_pretrained.json").read_text())})
        # CPU ranks share the cores: one thread pool each of cores / ranks, not cores each (oversubscription)
        threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.ranks))} if args.ranks > 1 else None
        run(f"MIM-Refiner {variant} (heads, then refine)", refine_command(args, refine_dir, weights, overrides),
            env=threads)
        exports = refine_dir / "export"
        encoders[f"{variant} (online)"] = (f"{variant}_online", ["--weights", str(exports / "online.safetensors")])
        if n == 0 and (exports / "ema.safetensors").is_file():
            encoders[f"{variant} (EMA)"] = (f"{variant}_ema", ["--weights", str(exports / "ema.safetensors")])

    results = {}
    for name, (subdir, source) in encoders.items():
        # a shared MAE (--mae-dir) is evaluated once, beside its weights, for every run that refines it
        where = mae_dir / "eval" if (subdir == "mae" and shared_mae) else eval_dir / subdir
        command = ["launch/evaluate.py", *source, "--out", str(where), *common]
        with shared_lock(mae_dir if where.parent == mae_dir else None):
            if reusable_evaluation(where, command, source):
                print(f"\n== evaluate {name}: reused {where / 'metrics.json'} (same command, same weights)",
                      flush=True)
            else:
                run(f"evaluate {name}", command)
                record_evaluation(where, command, source)
        results[name] = {"dir": str(where), **evaluated(where)}

    table = summary_table(results)
    plots = []
    if all("blocks" in m for m in results.values()):
        plots = [out / "per_block_knn.svg", out / "per_block_knn.png"]
        plot_per_block(results, plots, f"{data['name']}: per-block k-NN@20 ({args.eval_limit or 'all'} images)")
    summary = {"minutes": (time.time() - started) / 60, "step_seconds": dict(STEP_SECONDS),
               "dataset": data["name"], "shards": data["shards"], "mae_dir": str(mae_dir),
               "eval_limit": args.eval_limit, "ranks": args.ranks,
               "variants": args.variants, "mae_overrides": args.mae,
               "encoders": {name: {k: m.get(k) for k in ("knn", "kmeans", "blocks", "linear", "lowshot", "dir")}
                            for name, m in results.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(table)
    print("\n" + table)
    print(f"(accuracies in %, {data['name']}, first {args.eval_limit or 'all'} images of each split; "
          f"{summary['minutes']:.1f} min in all)")
    print(f"TensorBoard: tensorboard --logdir {out}")
    if plots:
        print(f"per-block k-NN of every encoder on one plot: {plots[0]}")
    print("per-block k-NN plots: " + ", ".join(str(Path(m["dir"]) / "knn_per_block.png") for m in results.values()
                                               if "blocks" in m))
    print(f"exports (timm-loadable): {out}/<variant>/export   summary: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
