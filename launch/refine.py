"""Refine a pre-trained MIM ViT with MIM-Refiner: the heads stage, then the refine stage.

    python launch/refine.py --config configs/demo.yaml [key=value ...]

See the README for the recipes and the multi-node launch.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from scale_refiner.config import ConfigError, load_config, to_dict  # noqa: E402
from scale_refiner.data.loaders import eval_arrays, train_batches  # noqa: E402
from scale_refiner.engine.checkpoint import atomic_save, check_out_dir  # noqa: E402
from scale_refiner.engine.trainer import run_stage  # noqa: E402
from scale_refiner.eval.features import extract_cls  # noqa: E402
from scale_refiner.eval.knn import knn_accuracy  # noqa: E402
from scale_refiner.models.weights import export_timm  # noqa: E402
from scale_refiner.refiner import build_refiner  # noqa: E402

log = logging.getLogger("scale_refiner")


def knn_of(encoder, cfg, train, test):
    train_feats = extract_cls(encoder, train[0])
    test_feats = extract_cls(encoder, test[0])
    return knn_accuracy(train_feats, train[1], test_feats, test[1], ks=(10, 20))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML in configs/")
    parser.add_argument("--eval-samples", type=int, default=10000,
                        help="train / test images used by the before/after k-NN (0 = all)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. queue.size=4096")
    args, unknown = parser.parse_known_args(argv)
    # deepspeed / torchrun append --local_rank; it is read from the environment instead.
    unknown = [u for u in unknown if not u.startswith("--local_rank")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.engine.kind != "single":
        print(f"error: config key 'engine.kind': {cfg.engine.kind!r} is not available yet in this build; "
              f"use engine.kind=single (the sharded engines arrive with the engine issue)", file=sys.stderr)
        return 2
    out_dir = Path(cfg.run.out_dir)
    check_out_dir(out_dir)
    torch.manual_seed(cfg.run.seed)
    device = torch.device("cpu")

    refiner = build_refiner(cfg).to(device)
    (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    writer = SummaryWriter(str(out_dir / "tensorboard"))
    batches, samples = train_batches(cfg)
    train = eval_arrays(cfg, "train", args.eval_samples)
    test = eval_arrays(cfg, "test", args.eval_samples)
    results = {"before": knn_of(refiner.encoder, cfg, train, test)}
    log.info("k-NN before refinement: %s", results["before"])

    offset, started = 0, time.time()
    for stage in cfg.stages.run:
        last = run_stage(refiner, cfg, stage, batches, samples, writer, device, global_step_offset=offset)
        offset += last["steps"]
        atomic_save({"model": refiner.state_dict(),
                     "ema": refiner.ema.state_dict() if refiner.ema is not None else None,
                     "stage": stage, "step": offset, "config": to_dict(cfg)}, out_dir / f"stage_{stage}.pt")
        results[f"{stage}_last"] = last
    results["online"] = knn_of(refiner.encoder, cfg, train, test)
    export_timm(refiner.encoder, out_dir / "export", "online", extra_config={"recipe": to_dict(cfg)})
    if refiner.ema is not None:
        refiner.ema.copy_to(refiner.encoder)
        results["ema"] = knn_of(refiner.encoder, cfg, train, test)
        export_timm(refiner.encoder, out_dir / "export", "ema", extra_config={"recipe": to_dict(cfg)})
    results["minutes"] = (time.time() - started) / 60
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    writer.close()

    print("\n| encoder | k-NN@10 | k-NN@20 |\n|---|---|---|")
    for name in ("before", "online", "ema"):
        if name in results:
            print(f"| {name} | {100 * results[name][10]:.1f} | {100 * results[name][20]:.1f} |")
    print(f"\nTensorBoard: tensorboard --logdir {out_dir / 'tensorboard'}   exports: {out_dir / 'export'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
