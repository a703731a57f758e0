"""Evaluate a refined (or any registered) ViT: k-NN, per-block k-NN, linear probe, low-shot, k-means.

    python launch/evaluate.py --checkpoint runs/demo --out runs/demo/eval                      # EMA encoder
    python launch/evaluate.py --checkpoint runs/demo/checkpoints/refine-end --encoder online --out DIR
    python launch/evaluate.py --model vit_large_patch16 --weights mae_large.pth --out DIR
    python launch/evaluate.py --weights runs/demo/export/ema --out DIR                        # an export directory
    torchrun --nproc_per_node 2 launch/evaluate.py --checkpoint runs/demo --out DIR            # extraction on 2 ranks

Writes DIR/metrics.json, DIR/metrics.md, DIR/knn_per_block.png (and DIR/tsne.png with --tsne N).
Under torchrun / deepspeed (WORLD_SIZE > 1) each rank extracts a contiguous part of the features, rank 0
gathers them in order and runs the protocols; the metrics equal a one-process run's.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


import torch
from scale_refiner.cli.args import parse_launched

log = logging.getLogger("scale_refiner.eval")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to evaluate (one of)")
    src.add_argument("--checkpoint", help="a refine run directory or one of its checkpoints/<tag> directories")
    src.add_argument("--model", help="registered ViT name (with --weights)")
    src.add_argument("--weights", help="weights file (load_pretrained formats) or an export (its directory)")
    p.add_argument("--weights-format", default="auto", help="auto, mae, timm, maws, d2v2, native")
    p.add_argument("--encoder", default="ema", choices=("ema", "online"), help="with --checkpoint (default ema)")
    p.add_argument("--img-size", type=int, default=0,
                   help="evaluation resolution (default: the run's augment.global_size, else the weights' own)")
    data = p.add_argument_group("what to evaluate on (default: a --checkpoint's own run data; the embedded "
                                "fashion-mnist for --weights)")
    data.add_argument("--dataset", help="the data set's name; with shards it must equal their manifest's")
    data.add_argument("--train-shards", help="shard directory (or manifest) whose 'train' split is the k-NN bank / "
                                              "probe training set (launch/make_shards.py)")
    data.add_argument("--test-shards", help="shard directory (or manifest) whose 'test' split is evaluated "
                                             "(default: the --train-shards set)")
    p.add_argument("--limit", type=int, default=0, help="first N images of each split (0: all)")
    p.add_argument("--protocols", default="knn,blocks,linear,lowshot,kmeans",
                   help="comma-separated subset of knn,blocks,linear,lowshot,kmeans (or all)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=256, help="feature extraction batch per rank")
    p.add_argument("--linear-epochs", type=int, default=10)
    p.add_argument("--linear-batch-size", type=int, default=256)
    p.add_argument("--linear-val-fraction", type=float, default=0.1,
                   help="held-out part of train for choosing the learning rate (0: choose on test)")
    p.add_argument("--kmeans-runs", type=int, default=3, help="k-means restarts (the paper: 100)")
    p.add_argument("--kmeans-split", default="test", choices=("train", "test"))
    p.add_argument("--tsne", type=int, default=0, help="t-SNE plot of N test samples (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="feature extraction under autocast: auto = bf16 on a GPU, fp32 on the CPU")
    args = parse_launched(p, argv)
    if bool(args.checkpoint) == bool(args.weights):
        p.error("give either --checkpoint RUN_OR_CHECKPOINT_DIR or --weights FILE (with --model NAME)")
    if args.checkpoint and args.model:
        p.error("--model goes with --weights; a --checkpoint's model comes from its config.json")
    if args.limit < 0:
        p.error("--limit must be >= 0")
    return args


def select_data(args, cfg):
    """Point ``cfg.data`` at the data to evaluate on and check it (``loaders.run_data``): --train-shards /
    --test-shards when given, else a --checkpoint run's own data (what it trained on), else the embedded
    Fashion-MNIST. Returns the ``RunData``; raises ValueError naming the option or key."""
    from scale_refiner.data.loaders import run_data
    from scale_refiner.data.manifest import load_manifest
    if args.test_shards and not args.train_shards:
        raise ValueError("--test-shards needs --train-shards (the k-NN bank and its queries are one data set)")
    if args.train_shards:
        named = load_manifest(args.train_shards, verify="none").dataset
        if args.dataset and args.dataset != named:
            raise ValueError(f"--dataset {args.dataset!r}, but --train-shards {args.train_shards} holds {named!r} "
                             f"(its manifest.json)")
        cfg.data.dataset, cfg.data.train_shards, cfg.data.test_shards = named, args.train_shards, args.test_shards
    elif args.checkpoint:
        if args.dataset and args.dataset != cfg.data.dataset:
            raise ValueError(f"--dataset {args.dataset!r}, but the run {args.checkpoint} trained on "
                             f"{cfg.data.dataset!r}; give --train-shards to evaluate it on other data")
    else:
        cfg.data.dataset = args.dataset or "fashion-mnist"
    if cfg.data.pipeline == "memory" and cfg.data.train_shards:
        cfg.data.pipeline = "wds"  # evaluation reads shards with the webdataset reader whatever trained
    cfg.data.num_workers = 0
    return run_data(cfg, evaluate=True, train=False)


def load_data(args, cfg, split: str):
    from scale_refiner.data.loaders import eval_arrays
    return eval_arrays(cfg, split, args.limit)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from scale_refiner.engine.distributed import init_distributed, resolve_precision
    from scale_refiner.eval.features import extract_features
    from scale_refiner.eval.linear import LinearProbeConfig
    from scale_refiner.eval.loading import EvalInputError, load_from_run, load_from_weights
    from scale_refiner.eval.suite import (SuiteOptions, feature_keys, options_dict, parse_protocols, plot_tsne,
                                         run_protocols, write_report)
    from scale_refiner.models.weights import WeightsError

    try:
        protocols = parse_protocols(args.protocols)
        if args.checkpoint:
            model, cfg, source = load_from_run(args.checkpoint, args.encoder)
            if args.img_size:
                cfg.augment.global_size = args.img_size
        else:
            model, cfg, source = load_from_weights(args.model, args.weights, args.weights_format,
                                                   args.img_size or None)
    except (EvalInputError, WeightsError, FileNotFoundError, NotImplementedError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    ctx = init_distributed()
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    torch.manual_seed(args.seed)
    model = model.to(ctx.device).eval()
    started = time.time()
    try:
        data = select_data(args, cfg)
        (train_x, train_y), (test_x, test_y) = load_data(args, cfg, "train"), load_data(args, cfg, "test")
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data_s, started = time.time() - started, time.time()
    log.info("extracting features of %d train / %d test images of %s at %d px on %d rank(s)", len(train_x),
             len(test_x), data.dataset, cfg.augment.global_size, ctx.world)
    keys = feature_keys(protocols)
    dtype = resolve_precision(args.precision, ctx.device)
    train = extract_features(model, train_x, args.batch_size, rank=ctx.rank, world=ctx.world, device=ctx.device,
                             keys=keys, autocast_dtype=dtype)
    test = extract_features(model, test_x, args.batch_size, rank=ctx.rank, world=ctx.world, device=ctx.device,
                            keys=keys, autocast_dtype=dtype)
    extract_s = time.time() - started
    if not ctx.is_main:
        return 0  # rank 0 runs the protocols; nothing collective follows

    opts = SuiteOptions(linear=LinearProbeConfig(epochs=args.linear_epochs, batch_size=args.linear_batch_size,
                                                 val_fraction=args.linear_val_fraction, seed=args.seed),
                        kmeans_runs=args.kmeans_runs, kmeans_split=args.kmeans_split, seed=args.seed)
    try:
        metrics = run_protocols(train, train_y, test, test_y, protocols, opts)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics["seconds"].update(data=round(data_s, 3), extract=round(extract_s, 3))
    metrics = {"source": source, "model": {"name": cfg.model.name, "arch": model.arch, "depth": model.depth,
                                           "embed_dim": model.embed_dim, "patch_size": model.patch_size},
               "dataset": data.dataset, "data": data.describe(),
               "img_size": cfg.augment.global_size, "limit": args.limit, "precision": str(dtype).split(".")[-1],
               "world_size": ctx.world, "protocols": protocols, "options": options_dict(opts), **metrics}
    out = Path(args.out)
    title = f"{Path(source['path']).as_posix()} ({source.get('encoder', source['kind'])})"
    written = write_report(metrics, out, title)
    if args.tsne:
        plot_tsne(test["final"], test_y, out / "tsne.png", args.tsne, args.seed)
        written.append(out / "tsne.png")
    print((out / "metrics.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
