"""Predicted against measured: peak memory of real training steps on the CPU (fp32, gloo), for small ViTs.

Each case builds the refiner and engine exactly as the main job does (``build_refiner``, ``partitioned`` for
ZeRO-3; ``engine.trainer.build_engine``), runs refine-stage steps (forward, backward, optimiser step, EMA) on
synthetic crops under ``measure.LiveStorage`` and takes the peak of the steps after the first (the first creates
AdamW's moments; the steady state has them), the twin of ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``. ZeRO-3 cases run on 2 gloo ranks spawned as the tests spawn them (DeepSpeed on the
CPU); the larger rank's peak is compared. The prediction is ``memory.predict_memory`` with fp32 compute and no
GPU allowances.

Besides the peak, each row compares what the step adds on top of what stays alive between steps (the
"activations": measured, the peak less the live bytes when the peak was reset; predicted, the peak less the
state the model lists), so a mode of checkpointing is checked on the part it changes, not only on a total that
the weights and moments dominate.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[2]
BASE = "configs/demo.yaml"
# ZeRO-3 with small buckets, so that the measured peak is made of what the model predicts per step rather than of
# a 2 GB preallocated reduce bucket (zero3.json leaves reduce_bucket_size at DeepSpeed's 5e8 elements); the model
# reads these values from the file like any other ZeRO JSON
ZERO3_CPU = {"zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                   "reduce_bucket_size": 200000, "stage3_prefetch_bucket_size": 200000,
                                   "stage3_param_persistence_threshold": 0},
             "steps_per_print": 1000000, "wall_clock_breakdown": False}


@dataclass
class Case:
    name: str
    model: str
    micro_batch: int       # per rank
    checkpointing: Any     # model.checkpointing: False | True | N | "selective"
    freeze_blocks: int
    engine: str = "single"  # single | zero3
    ranks: int = 1

    def overrides(self, zero_json: Optional[str]) -> List[str]:
        out = [f"model.name={self.model}", f"data.batch_size={self.micro_batch * self.ranks}",
               f"model.checkpointing={str(self.checkpointing).lower()}", f"model.freeze_blocks={self.freeze_blocks}",
               # compiled blocks run as kernels the storage tracker cannot see into: always measured eager
               "model.compile=false",
               "engine.precision=fp32", "heads.blocks=[3,4]",
               # the paper's multi-crop (2 x 32 px + 4 x 16 px), as the validation was measured; the demo recipe
               # itself now trains on global crops only
               "augment.num_local=4"]
        if self.engine == "zero3":
            out += ["engine.kind=deepspeed", f"engine.zero_config={zero_json}"]
        else:
            out.append("engine.kind=single")
        return out


CASES = [
    Case("mini b16", "vit_mini_patch4", 16, False, 0),
    Case("mini b32", "vit_mini_patch4", 32, False, 0),
    Case("mini b32 ckpt", "vit_mini_patch4", 32, True, 0),
    Case("tiny b32 frozen 4", "vit_tiny_patch4", 32, False, 4),
    Case("tiny b32 ckpt frozen 4", "vit_tiny_patch4", 32, True, 4),
    Case("tiny b32 zero3x2", "vit_tiny_patch4", 32, False, 0, "zero3", 2),
    Case("mini b16 ckpt frozen 2 zero3x2", "vit_mini_patch4", 16, True, 2, "zero3", 2),
    # model.checkpointing=N and selective; the mini cases are the four modes on one model, in the order of
    # memory they must measure: off > selective > 3 of 6 blocks > on
    Case("mini b32 ckpt 3 blocks", "vit_mini_patch4", 32, 3, 0),
    Case("mini b32 selective", "vit_mini_patch4", 32, "selective", 0),
    Case("tiny b32 ckpt 4 blocks frozen 4", "vit_tiny_patch4", 32, 4, 4),
    Case("tiny b32 selective frozen 4", "vit_tiny_patch4", 32, "selective", 4),
]


def _measure_steps(cfg, ctx, partitioned: bool, steps: int) -> Tuple[int, int]:
    """(peak, live when the peak was reset: what stays alive between steps)."""
    from scale_refiner.bench.runner import run_steps, synthetic_batch
    from scale_refiner.bench.timers import StageTimer
    from scale_refiner.engine.ema import EncoderEMA
    from scale_refiner.engine.trainer import build_engine
    from scale_refiner.plan.measure import LiveStorage
    from scale_refiner.refiner import build_refiner
    with LiveStorage() as mem:
        torch.manual_seed(cfg.run.seed)
        refiner = build_refiner(cfg, load_weights=False, partitioned=partitioned)
        engine = build_engine(refiner, cfg, "refine", ctx)
        engine.module.train()
        ema = EncoderEMA(engine, cfg.stages.refine.ema)
        batch = synthetic_batch(cfg, cfg.data.batch_size // ctx.world, ctx.device, ctx.rank)
        timer = StageTimer(ctx.device)
        run_steps(engine, cfg, ctx, batch, 1, "refine", timer, ema=ema)
        mem.reset_peak()  # steady state from here: the moments exist
        resting = mem.live
        run_steps(engine, cfg, ctx, batch, steps, "refine", timer, step0=1, ema=ema)
        peak = mem.peak
    return peak, resting


def _zero_rank(rank, world, overrides, steps):
    import deepspeed
    import torch.distributed as dist
    from scale_refiner.config import load_config
    from scale_refiner.engine.distributed import DistContext
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(ROOT / BASE, overrides)
    measured = _measure_steps(cfg, DistContext(rank, world, rank, torch.device("cpu")), True, steps)
    every = [None] * world
    dist.all_gather_object(every, measured)
    return max(every)  # the rank with the larger peak


def measure_case_detail(case: Case, zero_json: str, steps: int = 2) -> Tuple[int, int]:
    """(peak, live between steps) of the case's refine-stage steps; for ZeRO-3 the rank with the larger peak."""
    from scale_refiner.config import load_config
    from scale_refiner.engine.distributed import DistContext, spawn_gloo
    overrides = case.overrides(zero_json)
    if case.engine == "zero3":
        return spawn_gloo(_zero_rank, case.ranks, overrides, steps, threads=1)
    cfg = load_config(ROOT / BASE, overrides)
    return _measure_steps(cfg, DistContext(0, 1, 0, torch.device("cpu")), False, steps)


def measure_case(case: Case, zero_json: str, steps: int = 2) -> int:
    return measure_case_detail(case, zero_json, steps)[0]


def predicted_activations(prediction) -> float:
    """What the predicted peak adds on top of the state that lives the whole step."""
    return prediction.peak_allocated - sum(prediction.state.values())


def predict_case(case: Case, zero_json: str):
    from scale_refiner.config import load_config
    from scale_refiner.plan.counts import model_counts
    from scale_refiner.plan.memory import predict_memory
    from scale_refiner.plan.settings import setting_of_config
    cfg = load_config(ROOT / BASE, case.overrides(zero_json))
    setting = setting_of_config(cfg, ROOT)
    return predict_memory(cfg, model_counts(cfg, "refine"), setting, case.ranks, case.micro_batch,
                          compute_bytes=4, on_gpu=False)


def run_validation(cases: Sequence[Case] = CASES, steps: int = 2, tolerance: float = 0.15) -> List[Dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        zero_json = str(Path(tmp) / "zero3_cpu.json")
        Path(zero_json).write_text(json.dumps(ZERO3_CPU))
        for case in cases:
            predicted = predict_case(case, zero_json)
            measured, resting = measure_case_detail(case, zero_json, steps)
            ratio = predicted.peak_allocated / measured
            act_predicted, act_measured = predicted_activations(predicted), measured - resting
            act_ratio = act_predicted / act_measured
            rows.append(dict(asdict(case), predicted=predicted.peak_allocated, measured=measured, ratio=ratio,
                             activations_predicted=act_predicted, activations_measured=act_measured,
                             activations_ratio=act_ratio,
                             within=abs(ratio - 1) <= tolerance and abs(act_ratio - 1) <= tolerance,
                             peak_phase=predicted.peak_phase))
    return rows


def _checkpointing_cell(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value) if value == "selective" else f"first {value}"


def validation_table(rows: List[Dict]) -> str:
    lines = ["| case | model | engine | micro-batch / rank | checkpointing | frozen blocks | predicted MB | "
             "measured MB | predicted / measured | activations predicted MB | measured MB | predicted / measured |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        engine = r["engine"] + (f" x{r['ranks']}" if r["ranks"] > 1 else "")
        lines.append(f"| {r['name']} | {r['model']} | {engine} | {r['micro_batch']} | "
                     f"{_checkpointing_cell(r['checkpointing'])} | {r['freeze_blocks']} | "
                     f"{r['predicted'] / 1e6:.1f} | {r['measured'] / 1e6:.1f} | {r['ratio']:.3f} | "
                     f"{r['activations_predicted'] / 1e6:.1f} | {r['activations_measured'] / 1e6:.1f} | "
                     f"{r['activations_ratio']:.3f}{'' if r['within'] else ' (outside 15 %)'} |")
    return "\n".join(lines)
