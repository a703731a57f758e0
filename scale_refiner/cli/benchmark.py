"""Throughput, MFU, memory and GPU-hour benchmark of a recipe, launched as the main job is launched.

    python launch/benchmark.py --config configs/demo.yaml engine.kind=single --steps 10
    torchrun --nproc_per_node 8 launch/benchmark.py --config configs/mae_l16.yaml engine.kind=fsdp2 --batch auto
    deepspeed --num_gpus 8 launch/benchmark.py --config configs/mae_2b14.yaml --batch 32
    torchrun --nproc_per_node 2 launch/benchmark.py --config configs/demo.yaml --compare engines,checkpointing,norm

The refiner and engine are the main job's (``build_refiner`` + ``build_engine``); batches are synthetic random
crops at the recipe's sizes, copied host -> device every step (no data loading: see launch/bench_data.py).
Reports images/s, crops/s and tokens/s per rank; model TFLOP/s from the analytic FLOPs
(scale_refiner/bench/flops.py) and MFU against the device's dense bf16 peak (A100 312, H100 / H200 989;
on the CPU against a measured fp32 matmul rate, or n/a with --no-cpu-peak); peak memory; a per-step time
breakdown; GPU-hours for the recipe's stages on ``--dataset-size`` images. Appends a markdown row to ``--out``
and one JSON line to ``--json`` (default: ``--out`` with suffix .jsonl).

``--batch auto``: the largest power-of-two per-rank batch that runs (GPU: until out of memory, capped by
``--max-batch``; CPU: until the resident memory would pass ``--mem-budget-gb`` (default half of what is
available), capped by the recipe's per-rank batch).

``--compare``: comma list of ``engines`` (ZeRO-3, ZeRO-2, FSDP2; needs a process group: torchrun / deepspeed,
or one local rank), ``checkpointing`` (every trained block / the first half / selective / off), ``norm`` (heads.norm bn / syncbn / async),
``float8`` (the recipe compiled in bf16, then with ``model.float8``: the FP8 img/s ratio; needs a GPU of compute
capability >= 8.9, see docs/training.md "FP8 matmuls"). Each variant is
built fresh, in turn, in the same process group; a side-by-side table with ratios to each group's first row
is printed (``--rounds`` repeats the sequence and keeps each variant's median).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from pathlib import Path


import torch

from scale_refiner.cli.args import parse_launched
from scale_refiner.config import ConfigError, micro_batch_for, load_config, validate

log = logging.getLogger("scale_refiner.bench")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--batch", default="recipe", help="per-rank batch: N, auto, or recipe (data.batch_size/world)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--stage", default="refine", choices=("refine", "heads"))
    p.add_argument("--dataset-size", type=int, default=1_281_167, help="images per epoch (ImageNet-1K train)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs for the wall-hour extrapolation (0: world size)")
    p.add_argument("--max-batch", type=int, default=0, help="cap of --batch auto (default GPU 1024, CPU recipe)")
    p.add_argument("--mem-budget-gb", type=float, default=0.0, help="CPU --batch auto memory budget")
    p.add_argument("--compare", default="", help="engines,checkpointing,norm,float8")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--no-fine-timers", action="store_true", help="no synchronised lookup / comm timers")
    p.add_argument("--breakdown-steps", type=int, default=None,
                   help="steps timed region by region after the untimed throughput window (default: 2 on a GPU, "
                        "whose region timers synchronise; 0 on the CPU: one window gives both)")
    p.add_argument("--no-cpu-peak", action="store_true", help="CPU: MFU n/a instead of a measured matmul peak")
    p.add_argument("--out", default="runs/bench/results.md")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*")
    return parse_launched(p, argv)


def _deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - absent, or broken on this machine
        return False


def init(cfg, groups):
    """The main job's process-group set-up; comparisons always get a group (1 rank when not launched).
    DeepSpeed initialises the group only when a DeepSpeed engine is among the runs (on the CPU its first
    launch compiles a communication op)."""
    from scale_refiner.engine.distributed import free_port, init_distributed
    comparing = bool(groups)
    use_ds = (cfg.engine.kind == "deepspeed" or "engines" in groups) and _deepspeed_available()
    if comparing or cfg.engine.kind == "deepspeed":
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    ctx = init_distributed(use_deepspeed=use_ds, need_group=comparing or cfg.engine.kind == "fsdp2")
    if comparing and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo")
    return ctx, use_ds


def variants(cfg, groups, ds_ok: bool):
    """(group, label, cfg) per variant."""
    out = []
    for group in groups:
        if group == "engines":
            if ds_ok:
                # ZeRO-3 with the recipe's JSON when that is a stage-3 one (e.g. ds_configs/cpu_demo.json)
                own = json.loads(Path(cfg.engine.zero_config).read_text()).get("zero_optimization", {})
                zero3 = cfg.engine.zero_config if own.get("stage") == 3 else "ds_configs/zero3.json"
                for stage, path in (("3", zero3), ("2", "ds_configs/zero2.json")):
                    c = copy.deepcopy(cfg)
                    c.engine.kind, c.engine.zero_config = "deepspeed", path
                    out.append((group, f"zero{stage}", c))
            else:
                print("deepspeed does not import here: ZeRO variants skipped", file=sys.stderr)
            c = copy.deepcopy(cfg)
            c.engine.kind = "fsdp2"
            out.append((group, "fsdp2", c))
        elif group == "checkpointing":  # the planner's modes: every trained block, half of them, op-level, none
            from scale_refiner.models.vit import resolve_model_dims
            trained = resolve_model_dims(cfg.model)["depth"] - cfg.model.freeze_blocks
            for mode in (True, max(1, trained // 2), "selective", False):
                c = copy.deepcopy(cfg)
                c.model.checkpointing = mode
                label = {True: "every block", False: "off", "selective": "selective"}.get(mode, f"first {mode}")
                out.append((group, f"checkpointing={label}", c))
        elif group == "norm":
            for kind in ("syncbn", "async", "bn"):
                c = copy.deepcopy(cfg)
                c.heads.norm = kind
                out.append((group, f"heads.norm={kind}", c))
        elif group == "float8":  # model.float8 against bf16, both compiled (FP8 requires compile)
            from scale_refiner.models.float8 import float8_problem
            for flag in (False, True):
                c = copy.deepcopy(cfg)
                c.model.compile, c.model.float8 = True, flag
                problem = float8_problem(c.model, c.engine.kind)
                if problem:
                    raise SystemExit(f"error: --compare float8: config key '{problem[0]}': {problem[1]}")
                out.append((group, "float8" if flag else "bf16 (compiled)", c))
        elif group == "frozen":
            c = copy.deepcopy(cfg)
            out.append((group, f"frozen prefix {cfg.model.freeze_blocks} inside engine (current)", c))
        else:
            raise SystemExit(f"error: --compare {group!r}: use engines, checkpointing, norm, frozen, float8")
    return out


def memory_predictor(cfg, ctx, stage: str, per_rank: int):
    """(``micro -> plan.memory.MemoryPrediction``, the planner's setting) for this config as it is (its engine and
    checkpointing) with ``per_rank`` samples a step, on this device: its compute dtype, the GPU allowances only
    on a GPU. Shared by ``--batch auto``'s planned batch and each row's memory comparison."""
    from scale_refiner.engine.distributed import resolve_precision
    from scale_refiner.plan.counts import meta_refiner, model_counts
    from scale_refiner.plan.memory import predict_memory
    from scale_refiner.plan.settings import setting_of_config
    on_gpu = ctx.device.type == "cuda"
    compute_bytes = 2 if resolve_precision(cfg.engine.precision, ctx.device) == torch.bfloat16 else 4
    plan_cfg = copy.deepcopy(cfg)
    plan_cfg.data.batch_size = per_rank * ctx.world
    counts = model_counts(plan_cfg, stage, meta_refiner(plan_cfg))
    setting = setting_of_config(plan_cfg, Path(__file__).resolve().parents[2])
    return (lambda micro: predict_memory(plan_cfg, counts, setting, ctx.world, micro, compute_bytes, on_gpu=on_gpu),
            setting)


def planned_batch(cfg, ctx, stage: str, cap: int, cpu_budget_gb: float) -> int:
    """The planner's largest per-rank micro-batch (up to ``cap``) for this config as it is, on this device: the
    GPU's total memory with the GPU allowances, or on the CPU the ``--batch auto`` budget with none (and fp32
    unless the config asks for bf16). 0 when not even 1 is predicted to fit."""
    from scale_refiner.plan.search import largest_fitting
    capacity = (torch.cuda.get_device_properties(ctx.device).total_memory if ctx.device.type == "cuda"
                else cpu_budget_gb * 1e9)
    predict, _ = memory_predictor(cfg, ctx, stage, cap)
    best, _ = largest_fitting(range(1, cap + 1), predict, capacity)
    return best


def planner_memory(cfg, ctx, stage: str, per_rank: int) -> dict:
    """The planner's memory prediction (GiB) for one benchmark row: the config as it ran, ``per_rank`` samples a
    step in one micro-batch (the measured counterpart is ``torch.cuda.max_memory_allocated``, which the GPU
    allowances are not part of). ``state_gib`` is what the model keeps alive between steps, the counterpart of
    the row's ``resting_memory_gb``."""
    predict, setting = memory_predictor(cfg, ctx, stage, per_rank)
    m = predict(per_rank)
    state = sum(m.state.values())
    return {"peak_gib": m.peak_allocated / 2 ** 30, "state_gib": state / 2 ** 30,
            "step_adds_gib": (m.peak_allocated - state) / 2 ** 30, "peak_phase": m.peak_phase,
            "setting": setting.label}


def planned_memory_or_none(cfg, ctx, stage: str, per_rank: int):
    """``planner_memory``, or None for a variant the planner does not model (the row says so)."""
    try:
        return planner_memory(cfg, ctx, stage, per_rank)
    except Exception as err:  # noqa: BLE001 -- a benchmark row must not be lost to its prediction
        log.warning("no planner prediction for this row: %s", err)
        return None


def memory_line(r: dict) -> str:
    """Measured against predicted memory of one row, in words."""
    p = r.get("planner")
    head = f"memory ({r['variant'] or r['engine']}): "
    if p is None:
        return head + f"peak {r['peak_memory_gb']:.2f} GiB ({r['memory_kind']}); no planner prediction"
    if r["memory_kind"].startswith("cuda"):
        rest = r["resting_memory_gb"]
        return (head + f"peak {r['peak_memory_gb']:.2f} GiB measured ({rest:.2f} resting between steps, "
                f"{r['peak_memory_gb'] - rest:.2f} added by a step); the planner predicts {p['peak_gib']:.2f} "
                f"({p['state_gib']:.2f} state, {p['step_adds_gib']:.2f} added by a step, at {p['peak_phase']}): "
                f"predicted / measured {p['peak_gib'] / r['peak_memory_gb']:.2f} for the peak, "
                f"{p['state_gib'] / rest:.2f} for the state")
    return (head + f"the planner predicts {p['peak_gib']:.2f} GiB of tensors at the peak ({p['state_gib']:.2f} "
            f"state); the measured {r['peak_memory_gb']:.2f} GiB is the process's peak RSS, not comparable "
            f"(python launch/plan.py --validate checks the model against the CPU's live tensors)")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    groups = [g for g in args.compare.split(",") if g]
    ctx, ds_ok = init(cfg, groups)
    from scale_refiner.bench import runner
    try:
        if cfg.engine.kind == "single" and ctx.world > 1:
            raise ConfigError("config key 'engine.kind': single runs in one process; use deepspeed or fsdp2")
        if cfg.engine.kind == "deepspeed" and not ds_ok:
            raise ConfigError("config key 'engine.kind': deepspeed does not import here; use fsdp2 or single")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if args.batch == "recipe":
        per_rank = max(cfg.data.batch_size // ctx.world, 1)
    elif args.batch == "auto":
        cap = args.max_batch or (1024 if ctx.device.type == "cuda" else max(cfg.data.batch_size // ctx.world, 1))
        recipe_batch = cfg.data.batch_size
        budget_gb = args.mem_budget_gb or 0.5 * (runner.available_memory_gb() + runner.current_rss_gb())
        predicted = planned_batch(cfg, ctx, args.stage, cap, budget_gb)
        start = 1 << max(0, predicted.bit_length() - 1) if predicted else 1
        per_rank = runner.find_batch(cfg, ctx, args.stage, cap, args.mem_budget_gb or None, start=start)
        if ctx.is_main:
            print(f"--batch auto: per-rank batch {per_rank} (cap {cap}); the planner predicted {predicted} "
                  f"(search started at {start}; found / predicted = {per_rank / max(predicted, 1):.2f})")
            micro, steps = micro_batch_for(recipe_batch, ctx.world, per_rank)
            print(f"--batch auto: the recipe's global batch {recipe_batch} on {ctx.world} rank(s) runs as {steps} "
                  f"micro-batch(es) of {micro} per rank: data.micro_batch_size={micro}"
                  + ("" if steps == 1 else " (gradient accumulation; docs/training.md 'Gradient accumulation')"))
    else:
        per_rank = int(args.batch)
    cfg.data.batch_size = per_rank * ctx.world
    try:
        validate(cfg, world_size=ctx.world)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    opts = runner.BenchOptions(stage=args.stage, steps=args.steps, warmup=args.warmup,
                               dataset_size=args.dataset_size, gpus=args.gpus,
                               fine_timers=not args.no_fine_timers, measure_cpu_peak=not args.no_cpu_peak,
                               breakdown_steps=args.breakdown_steps)
    name = Path(args.config).stem

    if not groups:
        while True:
            try:
                results = [runner.benchmark(cfg, ctx, per_rank, opts, name)]
                results[0]["planner"] = planned_memory_or_none(cfg, ctx, args.stage, per_rank)
                break
            except RuntimeError as err:  # --batch auto found the edge; fragmentation can push it over
                if args.batch != "auto" or per_rank == 1 or not runner._is_oom(err):
                    raise
                del err
                runner.free_memory(ctx.device)
                per_rank //= 2
                cfg.data.batch_size = per_rank * ctx.world
                print(f"out of memory at the auto batch: retrying with {per_rank}", file=sys.stderr)
    else:
        runs = {}
        todo = variants(cfg, groups, ds_ok)
        for _ in range(max(args.rounds, 1)):
            for group, label, vcfg in todo:
                r = runner.benchmark(vcfg, ctx, per_rank, opts, name, variant=label)
                r["group"] = group
                r["planner"] = planned_memory_or_none(vcfg, ctx, args.stage, per_rank)
                runs.setdefault((group, label), []).append(r)
        results = []
        for key, rs in runs.items():
            rs.sort(key=lambda r: r["images_per_s_per_rank"])
            results.append(rs[len(rs) // 2])  # the median round
    if ctx.is_main:
        for r in results:
            print(memory_line(r))
        for r in results:
            print(json.dumps({**{k: r[k] for k in ("config", "engine", "variant", "per_rank_batch",
                                                    "checkpointing", "compile", "images_per_s_per_rank",
                                                    "model_tflops_per_rank", "mfu", "peak_memory_gb",
                                                    "resting_memory_gb", "step_time_s", "breakdown_step_time_s")},
                              "planner_peak_gib": (r.get("planner") or {}).get("peak_gib"),
                              "planner_state_gib": (r.get("planner") or {}).get("state_gib")}))
        print()
        print(runner.MD_HEADER)
        for r in results:
            print(runner.markdown_row(r))
        if groups:
            print()
            print(runner.comparison_table(results))
        print("\nbreakdown (ms/step):", json.dumps({r["variant"] or r["engine"]: {
            k: round(v, 2) for k, v in r["breakdown_ms"].items()} for r in results}))
        gh = results[0]["gpu_hours"]
        print("GPU-hours:", json.dumps({k: {kk: (round(vv, 2) if isinstance(vv, float) else vv)
                                            for kk, vv in v.items()} for k, v in gh.items()}))
        runner.append_results(results, Path(args.out), Path(args.json) if args.json else None)
        print(f"appended to {args.out}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
