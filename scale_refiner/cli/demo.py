"""The embedded main job, end to end on a fresh machine: data -> MAE pre-training -> refinement -> evaluation.

    python launch/demo.py                      # what `make demo` runs: 8.9 minutes measured on 2 quiet CPU cores
    python launch/demo.py --validate           # `make validate`: the validation recipe and its checks
    python launch/demo.py --seeds 0,1,2        # three refinements, mean and spread, one plot
    python launch/demo.py --out runs/demo2 --mae stages.mae.epochs=2 --refine heads.norm=syncbn --ranks 2
    python launch/demo.py --shards shards/flowers --out runs/flowers       # any shard set with a manifest
    python launch/demo.py --source folder:/data/flowers --out runs/flowers # class folders: shards written first

1. writes the Fashion-MNIST shards (from Debian's dataset-fashion-mnist) if they are absent; or, with
   --source, writes the source's shards into <out>/shards (reused while the source and --test-fraction are the
   same); or, with --shards, reads that set. Every later step trains and evaluates on that data;
2. takes the demo ViT pre-trained as an MAE: the shipped weights/demo_mae when this run's MAE recipe is the one
   that made it, else pre-trains (launch/pretrain_mae.py, configs/demo_mae.yaml) or reuses the weights of an
   earlier run of the same recipe;
3. refines it with MIM-Refiner, heads stage then refine stage (launch/refine.py, configs/demo.yaml), once per
   variant and seed (``--validate``: NNA vs NNCLR, bn vs syncbn vs async, on 2 ranks, 3 seeds);
4. evaluates the raw pixels, the random-init encoder, the MAE and the refined encoders (launch/evaluate.py);
5. prints one table, draws every encoder's per-block k-NN on one plot, and says where the TensorBoard logs and
   exports are. ``--validate`` then runs the chain on scikit-learn's digits (<out>/digits, one seed), whose MAE
   shows the paper's Figure 3b shape, and ends with every check.

Every step is the project's own command, run as a subprocess and printed first, so each can be re-run alone.
A step that fails stops the job with its exit status. Re-running resumes: finished steps are reused.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (configs/, launch/): the steps run from it


# The MAE the demo starts from: launch/pretrain_mae.py's output for configs/demo_mae.yaml (seed 0), shipped so
# the demo's 10 minutes go to refinement, the job this project does (weights/demo_mae/README.md: how it was made)
SHIPPED_MAE = ROOT / "weights" / "demo_mae"
MAE_FILES = ("mae_pretrained.pth", "mae_pretrained.json", "config.json")

# --validate: the MAE re-created from its recipe (the shipped one's quality is one of the checks), four
# refinement variants on 2 ranks (NNA / NNCLR's swap, bn / syncbn / async statistics), 3 seeds each
VALIDATION_SEEDS = "0,1,2"
VALIDATION_REFINE: list = []  # the demo's refinement recipe itself
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
    p.add_argument("--pretrain-mae", action="store_true",
                   help="pre-train the MAE from configs/demo_mae.yaml (about 15 minutes on 2 cores) instead of "
                        f"starting from the shipped {SHIPPED_MAE.relative_to(ROOT)}, which that recipe made; "
                        "other data, --mae overrides or another --mae-config always pre-train")
    p.add_argument("--mae", action="append", default=[], metavar="KEY=VALUE", help="pre-training override")
    p.add_argument("--refine", action="append", default=[], metavar="KEY=VALUE", help="refinement override")
    p.add_argument("--ranks", type=int, default=1,
                   help="refine on N ranks (deepspeed launcher, ZeRO-3; CPU ranks with gloo without a GPU)")
    p.add_argument("--eval-limit", type=int, default=10000,
                   help="first N images of each split for the evaluation (0: all; Fashion-MNIST has 60000 / 10000)")
    p.add_argument("--protocols", default="knn,blocks,kmeans", help="launch/evaluate.py protocols")
    p.add_argument("--kmeans-runs", type=int, default=3)
    p.add_argument("--seeds", default=None,
                   help="comma-separated refinement seeds (run.seed), each a run of its own; the table then gives "
                        "mean +- sample std (default 0, or 0,1,2 with --validate)")
    p.add_argument("--no-references", dest="references", action="store_false",
                   help="skip the raw-pixel and random-init rows (the sweep computes them once for all its runs)")
    p.add_argument("--validate", action="store_true",
                   help="the validation recipe: the MAE re-created from configs/demo_mae.yaml, refinement variants "
                        "NNA / NNCLR x bn / syncbn / async on 2 ranks with 3 seeds each, every protocol on the first "
                        "run; then the chain on scikit-learn's digits (Figure 3b's shape, one seed); ends with its "
                        "checks (exit status 1 when one is not met)")
    args = p.parse_args(argv)
    args.seeds = [int(x) for x in (args.seeds or (VALIDATION_SEEDS if args.validate else "0")).split(",") if x.strip()]
    if not args.seeds:
        p.error("--seeds needs at least one seed")
    args.seed_protocols = "knn,blocks,kmeans"  # runs after the first, and the random-init row
    if args.validate:
        args.pretrain_mae = True  # re-creating the shipped MAE is what validates its recipe
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

# --validate, second part: the demo chain on scikit-learn's digits (the README's command: epochs scaled to its
# 1,437 training images, a queue under that count), one seed. This MAE's per-block k-NN falls from its first
# block, the shape of the paper's Figure 3b, which the Fashion-MNIST MAE (rising to its last block) does not show.
DIGITS_VALIDATION = ["--mae=stages.mae.epochs=48", "--mae=stages.mae.warmup_epochs=3",
                     "--refine=stages.heads.epochs=1.5", "--refine=stages.heads.warmup_epochs=0.375",
                     "--refine=stages.refine.epochs=26", "--refine=stages.refine.warmup_epochs=1.5",
                     "--refine=queue.size=1024"]


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
    """What an evaluation's metrics depend on: its command and the content of the weights file it read (a
    hash, not the file's time: a resumed finished refinement re-exports the same bytes, which must not cost
    the evaluations again; the demo's files are a few MB)."""
    from scale_refiner.atomic import sha256_file
    weights = Path(source[source.index("--weights") + 1])
    return {"command": command, "weights_sha256": sha256_file(weights)}


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


def plot_per_block(curves: dict, paths, title: str) -> None:
    """Every encoder's per-block k-NN@20 on one set of axes (blocks on x; ``curves``: {name: (labels, means,
    stds)}, a band of +- 1 std where several seeds make a curve): where the MAE's representation peaks, and what
    refinement does to the late blocks, in one picture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: a smaller SVG, searchable in the README

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    labels = None
    styles = ("o-", "s--", "^-", "d:", "v-.", "x-", "P--", "*-", "h:", "<-.")
    for (name, (labels, means, stds)), style in zip(curves.items(), styles * 3):
        xs, ys = range(len(labels)), [100 * m for m in means]
        line, = ax.plot(xs, ys, style, label=name, alpha=0.6 if name in REFERENCE_NAMES else 1.0)
        if any(stds):
            ax.fill_between(xs, [y - 100 * sd for y, sd in zip(ys, stds)], [y + 100 * sd for y, sd in zip(ys, stds)],
                            color=line.get_color(), alpha=0.15)
    ax.set_xticks(range(len(labels)), [lab.replace("block", "") for lab in labels])
    ax.set_xlabel("block (raw CLS; final = after the final norm, standardised)")
    ax.set_ylabel("k-NN@20 accuracy (%)")
    import textwrap
    ax.set_title("\n".join(textwrap.wrap(title, 72)), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=110)
    plt.close(fig)


def adopt_shipped_mae(args, mae_dir: Path) -> bool:
    """Start from the shipped MAE when this run would pre-train exactly its recipe (same config, overrides and
    data): its files are copied into ``mae_dir``, where launch/pretrain_mae.py finds weights of its own recipe and
    reuses them. Anything else (other data, --mae overrides, an MAE already there) pre-trains or keeps what is
    there. Returns whether the shipped MAE was adopted."""
    import shutil
    from scale_refiner.cli.pretrain_mae import recipe_of
    from scale_refiner.config import PretrainConfig, load_config
    if (mae_dir / "mae_pretrained.pth").exists() or not all((SHIPPED_MAE / f).is_file() for f in MAE_FILES):
        return False
    recipe = recipe_of(load_config(ROOT / args.mae_config, args.mae, schema_class=PretrainConfig))
    if recipe != json.loads((SHIPPED_MAE / "mae_pretrained.json").read_text()):
        print(f"== MAE: this run's recipe is not the shipped MAE's ({SHIPPED_MAE.relative_to(ROOT)}): pre-training",
              flush=True)
        return False
    mae_dir.mkdir(parents=True, exist_ok=True)
    for name in MAE_FILES:
        shutil.copyfile(SHIPPED_MAE / name, mae_dir / name)
    print(f"== MAE: starting from the shipped {SHIPPED_MAE.relative_to(ROOT)} (configs/demo_mae.yaml's output; "
          f"--pretrain-mae re-creates it, about 15 minutes)", flush=True)
    return True


def seed_shipped_mae_evaluation(args, where: Path, command: list, source: list, protocols: str) -> bool:
    """When the MAE to evaluate is the shipped one, byte for byte, on the embedded data, and this evaluation asks
    for what made its ``eval_metrics.json`` (protocols, image count, k-means restarts), put those metrics in
    ``where`` as this command's result, so the demo does not spend its minutes (about 50 s on 2 cores)
    recomputing them. Returns whether it did."""
    from scale_refiner.atomic import sha256_file
    shipped_metrics = SHIPPED_MAE / "eval_metrics.json"
    weights = Path(source[source.index("--weights") + 1])
    if "--train-shards" in command or not shipped_metrics.is_file() or reusable_evaluation(where, command, source):
        return False
    shipped = json.loads(shipped_metrics.read_text())
    if (sorted(protocols.split(",")) != sorted(shipped["protocols"]) or shipped["limit"] != args.eval_limit
            or shipped["options"]["kmeans_runs"] != args.kmeans_runs or shipped["dataset"] != "fashion-mnist"):
        return False
    if sha256_file(weights) != sha256_file(SHIPPED_MAE / "mae_pretrained.pth"):
        return False
    where.mkdir(parents=True, exist_ok=True)
    (where / "metrics.json").write_text(shipped_metrics.read_text())
    record_evaluation(where, command, source)
    print(f"\n== evaluate MAE: the shipped MAE's own evaluation ({shipped_metrics.relative_to(ROOT)}: same weights, "
          f"protocols, images and restarts)", flush=True)
    return True


REFERENCE_NAMES = ("raw pixels", "random init")  # rows for scale: no encoder, and the MAE's initial weights


def run_label(args, variant: str, seed: int) -> str:
    return variant if len(args.seeds) == 1 else f"{variant} s{seed}"


def run_subdir(args, variant: str, seed: int) -> str:
    return variant if len(args.seeds) == 1 else f"{variant}/s{seed}"


def evaluate_once(name: str, where: Path, command: list, source: list) -> dict:
    """launch/evaluate.py's metrics for ``command``, run unless the same command already evaluated the same
    weights file into ``where``."""
    if reusable_evaluation(where, command, source):
        print(f"\n== evaluate {name}: reused {where / 'metrics.json'} (same command, same weights)", flush=True)
    else:
        run(f"evaluate {name}", command)
        record_evaluation(where, command, source)
    return evaluated(where)


def reference_results(args, data: dict, eval_dir: Path, common: list) -> dict:
    """The two rows that put the encoders on a scale, on the same images and protocols: k-NN and k-means on the
    raw pixels (the evaluation's own preprocessing, flattened), and the encoder at the MAE's initial weights
    (what pre-training starts from: launch/pretrain_mae.py seeds the same way before building it)."""
    where = eval_dir / "random_init"
    cfg, weights = random_init_weights(args.mae_config, args.mae, where)
    source = ["--model", cfg.model.name, "--weights", str(weights)]
    command = ["launch/evaluate.py", *source, "--out", str(where), "--protocols", args.seed_protocols, *common]
    random_init = {"dir": str(where), **evaluate_once("random init", where, command, source)}
    return {"raw pixels": raw_pixel_metrics(args, data, eval_dir / "raw_pixels"), "random init": random_init}


def random_init_weights(mae_config: str, overrides: list, where: Path) -> tuple:
    """(MAE config, ``where/init.pth``): the encoder at the MAE's initial weights, seeded with the config's
    run.seed exactly as launch/pretrain_mae.py seeds before it builds the model. Written once, and reused while
    it is there."""
    import torch
    from scale_refiner.config import PretrainConfig, load_config
    from scale_refiner.mae import build_mae, mae_state_dict
    cfg = load_config(ROOT / mae_config, overrides, schema_class=PretrainConfig)
    weights = where / "init.pth"
    if not weights.is_file():
        where.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.run.seed)
        torch.save({"model": mae_state_dict(build_mae(cfg).state_dict())}, weights)
    return cfg, weights


def raw_pixel_metrics(args, data: dict, where: Path) -> dict:
    """k-NN@10/20 and k-means on flattened pixels (resized and normalised as every evaluation reads them);
    kept in ``where/metrics.json`` and reused for the same data, image count and k-means restarts."""
    key = {"dataset": data["name"], "shards": data["shards"], "limit": args.eval_limit,
           "kmeans_runs": args.kmeans_runs}
    path = where / "metrics.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded.get("key") == key:
            return recorded
    from scale_refiner.config import load_config
    from scale_refiner.data.loaders import eval_arrays
    from scale_refiner.eval.clustering import kmeans_eval
    from scale_refiner.eval.knn import knn_accuracy
    print("\n== raw pixels: k-NN and k-means on the flattened images", flush=True)
    cfg = load_config(ROOT / args.refine_config, data["overrides"])
    cfg.data.num_workers = 0
    (train_x, train_y), (test_x, test_y) = (eval_arrays(cfg, split, args.eval_limit) for split in ("train", "test"))
    knn = knn_accuracy(train_x.flatten(1), train_y, test_x.flatten(1), test_y, ks=(10, 20))
    kmeans = kmeans_eval(test_x.flatten(1), test_y, runs=args.kmeans_runs, seed=0)
    result = {"key": key, "knn": {str(k): v for k, v in knn.items()}, "kmeans": kmeans, "dir": str(where)}
    where.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def mean_std(values) -> tuple:
    """Mean and sample standard deviation (0 for one value) of the finite values (None and NaN skipped: a run
    that has no such number); (nan, nan) for none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5


def mean_curves(grouped: dict, shared=()) -> dict:
    """Plot curves from per-block k-NN@20 results grouped by encoder ({name: [blocks, ...]}, one per seed): each
    group's mean with its sample standard deviation as the band, {label: (labels, means, stds)}. A group of
    several runs is labelled "<name>, N seeds", except the names in ``shared`` (one model under every seed)."""
    curves = {}
    for key, runs in grouped.items():
        stats = [mean_std(values) for values in zip(*(r["knn20"] for r in runs))]
        label = key if len(runs) == 1 or key in shared else f"{key}, {len(runs)} seeds"
        curves[label] = (runs[0]["labels"], [m for m, _ in stats], [sd for _, sd in stats])
    return curves


def per_block_curves(args, results: dict) -> dict:
    """Per-block k-NN@20 curves for the plot, one per encoder; an encoder refined with several seeds is one curve,
    their mean, with the sample standard deviation as its band: {name: (labels, means, stds)}."""
    grouped: dict = {}
    for name, m in results.items():
        key = name
        for seed in args.seeds if len(args.seeds) > 1 else ():
            key = key.replace(f" s{seed} (", " (")
        grouped.setdefault(key, []).append(m["blocks"])
    return mean_curves(grouped)


def seed_table(args, results: dict) -> str:
    """Several seeds: each variant's k-NN@20 and k-means NMI as mean +- sample std over the seeds."""
    lines = ["| variant | encoder | seeds | k-NN@20 | k-means NMI |", "|---|---|---|---|---|"]
    for variant in args.variants:
        for which in ("online", "EMA"):
            runs = [results.get(f"{run_label(args, variant, seed)} ({which})") for seed in args.seeds]
            runs = [m for m in runs if m is not None]
            if not runs:
                continue
            knn, nmi = mean_std(m["knn"]["20"] for m in runs), mean_std(m["kmeans"]["nmi"] for m in runs)
            lines.append(f"| {variant} | {which} | {len(runs)} | {100 * knn[0]:.1f} ± {100 * knn[1]:.1f} | "
                         f"{100 * nmi[0]:.1f} ± {100 * nmi[1]:.1f} |")
    return "\n".join(lines) + "\n"


def validation_checks(args, results: dict) -> list:
    """What the validation recipe must show, each with its measured value and target (accuracies in [0, 1]):
    the re-created MAE is a meaningful starting point (and as good as the shipped one), its per-block k-NN
    peaks before the last block (the paper's Figure 3b), refinement lifts the output above that peak, NNA is
    not worse than NNCLR's swap, and async statistics lose nothing against synchronised ones."""
    mae, checks = results["MAE"], []

    def check(name, value, target, passed, detail=""):
        checks.append({"name": name, "value": value, "target": target, "passed": bool(passed), "detail": detail})

    if "random init" in results:
        gap = mae["knn"]["20"] - results["random init"]["knn"]["20"]
        check("MAE k-NN@20 above random init", gap, ">= +5 points", gap >= 0.05)
    shipped = SHIPPED_MAE / "eval_metrics.json"
    if shipped.is_file() and args.pretrain_mae:
        recorded = json.loads(shipped.read_text())
        if recorded.get("limit") == args.eval_limit and recorded.get("dataset") == results["MAE"].get("dataset"):
            gap = mae["knn"]["20"] - recorded["knn"]["20"]
            check("re-created MAE k-NN@20 vs the shipped MAE's", gap, ">= -1.5 points", gap >= -0.015,
                  f"shipped {100 * recorded['knn']['20']:.1f}")

    def ema_scores(variant):
        return [results[f"{run_label(args, variant, seed)} (EMA)"]["knn"]["20"] for seed in args.seeds
                if f"{run_label(args, variant, seed)} (EMA)" in results]

    variants = list(args.variants)
    checks += figure3b_checks(mae, mae.get("n_test") or args.eval_limit or 10000,
                              ema_scores(variants[0]) if variants else [], variants[0] if variants else "")
    if "nna_bn" in args.variants and "nnclr_bn" in args.variants:
        (a, sa), (b, sb) = mean_std(ema_scores("nna_bn")), mean_std(ema_scores("nnclr_bn"))
        check("NNA vs NNCLR's swap (EMA k-NN@20, mean over seeds)", a - b, ">= 0 points", a >= b,
              f"NNA {100 * a:.1f} ± {100 * sa:.1f}, NNCLR {100 * b:.1f} ± {100 * sb:.1f}")
    if "nna_syncbn" in args.variants and "nna_async" in args.variants:
        (a, sa), (b, sb) = mean_std(ema_scores("nna_async")), mean_std(ema_scores("nna_syncbn"))
        check("async vs synchronised BatchNorm statistics (EMA k-NN@20)", a - b, ">= -1 point", a >= b - 0.01,
              f"async {100 * a:.1f} ± {100 * sa:.1f}, syncbn {100 * b:.1f} ± {100 * sb:.1f}")
    return checks


def figure3b_checks(mae: dict, n_test: int, refined: list, variant: str, data: str = "") -> list:
    """The paper's Figure 3b in miniature, as checks (accuracies in [0, 1]): the MAE's per-block k-NN@20 peaks
    before its last block by more than one binomial standard error of the last block's accuracy on ``n_test``
    images, and the refined EMA encoders' output (``refined``: one score per seed) exceeds that peak."""
    on = f" ({data})" if data else ""
    blocks = mae["blocks"]["knn20"]
    earlier, last = max(blocks[:-2]), max(blocks[-2:])  # blocks before the last vs the last block / final norm
    se = (last * (1 - last) / n_test) ** 0.5
    at = mae["blocks"]["labels"][blocks.index(earlier)]
    checks = [{"name": f"MAE per-block k-NN@20 peaks before the last block (by > 1 s.e.){on}",
               "value": earlier - last, "target": f"> +{100 * se:.2f} points (1 s.e.)", "passed": earlier - last > se,
               "detail": f"peak {100 * earlier:.1f} at {at}, last block / final {100 * last:.1f}"}]
    if refined:
        peak = max(blocks)
        mean, sd = mean_std(refined)
        checks.append({"name": f"refined ({variant}, EMA) output above the MAE's per-block peak{on}",
                       "value": mean - peak, "target": "> 0 points", "passed": bool(mean > peak),
                       "detail": f"{100 * mean:.1f} ± {100 * sd:.1f} over {len(refined)} seed(s) vs peak "
                                 f"{100 * peak:.1f}"})
    return checks


def digits_checks(summary_path: Path) -> list:
    """``figure3b_checks`` of the digits part of --validate, from that run's summary.json (the number of test
    images from its MAE evaluation's metrics.json)."""
    encoders = json.loads(summary_path.read_text())["encoders"]
    mae = encoders["MAE"]
    n_test = json.loads((Path(mae["dir"]) / "metrics.json").read_text())["n_test"]
    ema = encoders.get("refined (EMA)")
    return figure3b_checks(mae, n_test, [ema["knn"]["20"]] if ema else [], "nna_bn", "digits")


def checks_table(checks: list) -> str:
    lines = ["| validation check | measured | target | met |", "|---|---|---|---|"]
    for c in checks:
        value = f"{100 * c['value']:+.2f} points" + (f" ({c['detail']})" if c["detail"] else "")
        lines.append(f"| {c['name']} | {value} | {c['target']} | {'yes' if c['passed'] else '**no**'} |")
    return "\n".join(lines) + "\n"


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
        if not args.pretrain_mae:
            adopt_shipped_mae(args, mae_dir)
        run("MAE pre-training", ["launch/pretrain_mae.py", "--config", args.mae_config, f"run.out_dir={mae_dir}",
                                 "run.resume=auto", *args.mae])
    weights = mae_dir / "mae_pretrained.pth"
    model_name = json.loads((mae_dir / "config.json").read_text())["model"]["name"]
    common = ["--limit", str(args.eval_limit), "--kmeans-runs", str(args.kmeans_runs), *data["evaluate"]]
    # (encoder name, evaluation subdirectory, weights options, protocols)
    encoders = [("MAE", "mae", ["--model", model_name, "--weights", str(weights)], args.protocols)]
    # the recipe file's content, not only its name: an edited configs/demo.yaml is another recipe
    config_digest = hashlib.sha256((ROOT / args.refine_config).read_bytes()).hexdigest()
    for n, (variant, overrides) in enumerate(args.variants.items()):
        for seed in args.seeds:
            label, refine_dir = run_label(args, variant, seed), out / run_subdir(args, variant, seed)
            seeded = [*overrides, f"run.seed={seed}"] if len(args.seeds) > 1 else list(overrides)
            claim_run_dir(refine_dir, {"config": args.refine_config, "config_sha256": config_digest,
                                       "overrides": seeded, "ranks": args.ranks,
                                       "mae_recipe": json.loads((mae_dir / "mae_pretrained.json").read_text())})
            # CPU ranks share the cores: one thread pool each of cores / ranks, not cores each (oversubscription)
            threads = ({"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.ranks))} if args.ranks > 1
                       else None)
            run(f"MIM-Refiner {label} (heads, then refine)", refine_command(args, refine_dir, weights, seeded),
                env=threads)
            exports, sub = refine_dir / "export", run_subdir(args, variant, seed).replace("/", "_")
            first = n == 0 and seed == args.seeds[0]  # every protocol and the online encoder: the first run only
            if n == 0:  # the online encoder is what training optimises; the EMA is what the paper reports
                encoders.append((f"{label} (online)", f"{sub}_online",
                                 ["--weights", str(exports / "online" / "model.safetensors")],
                                 args.protocols if first else args.seed_protocols))
            # the exports are timm hub-layout directories; --weights names the weights file in one (hashed below)
            if (exports / "ema" / "config.json").is_file():
                encoders.append((f"{label} (EMA)", f"{sub}_ema",
                                 ["--weights", str(exports / "ema" / "model.safetensors")],
                                 args.protocols if first else args.seed_protocols))

    results = {}
    if args.references:
        results.update(reference_results(args, data, eval_dir, common))
    for name, subdir, source, protocols in encoders:
        # a shared MAE (--mae-dir) is evaluated once, beside its weights, for every run that refines it
        where = mae_dir / "eval" if (subdir == "mae" and shared_mae) else eval_dir / subdir
        command = ["launch/evaluate.py", *source, "--out", str(where), "--protocols", protocols, *common]
        with shared_lock(mae_dir if where.parent == mae_dir else None):
            if subdir == "mae":
                seed_shipped_mae_evaluation(args, where, command, source, protocols)
            results[name] = {"dir": str(where), **evaluate_once(name, where, command, source)}

    table = summary_table(results)
    if len(args.seeds) > 1:
        table += "\n" + seed_table(args, results)
    plots = []
    if "blocks" in results["MAE"]:  # every encoder evaluated per block (the raw pixels have no blocks)
        plots = [out / "per_block_knn.svg", out / "per_block_knn.png"]
        plot_per_block(per_block_curves(args, {k: v for k, v in results.items() if "blocks" in v}), plots,
                       f"{data['name']}: per-block k-NN@20 ({args.eval_limit or 'all'} images)")
    summary = {"minutes": (time.time() - started) / 60, "step_seconds": dict(STEP_SECONDS),
               "dataset": data["name"], "shards": data["shards"], "mae_dir": str(mae_dir),
               "eval_limit": args.eval_limit, "ranks": args.ranks, "seeds": args.seeds,
               "variants": args.variants, "mae_overrides": args.mae,
               "encoders": {name: {k: m.get(k) for k in ("knn", "kmeans", "blocks", "linear", "lowshot", "dir")}
                            for name, m in results.items()}}
    status = 0
    if args.validate:
        checks = validation_checks(args, results)
        if not (args.shards or args.source):  # the second part: Figure 3b where the miniature shows it
            run("validation on digits (Figure 3b)", ["launch/demo.py", "--source", "digits", "--out",
                                                     str(out / "digits"), *DIGITS_VALIDATION])
            checks += digits_checks(out / "digits" / "summary.json")
        summary["checks"] = checks
        table += "\n" + checks_table(checks)
        status = 0 if all(c["passed"] for c in checks) else 1
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(table)
    print("\n" + table)
    print(f"(accuracies in %, {data['name']}, first {args.eval_limit or 'all'} images of each split; "
          f"{summary['minutes']:.1f} min in all)")
    print(f"TensorBoard: tensorboard --logdir {out}")
    if plots:
        print(f"per-block k-NN of every encoder on one plot: {plots[0]}")
    print(f"exports (timm-loadable): {out}/<variant>/export   summary: {out / 'summary.md'}")
    if status:
        print("validation: " + "; ".join(c["name"] for c in summary["checks"] if not c["passed"]) + ": NOT met",
              file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
