"""Every setting the trainer supports x the largest micro-batch that fits, both stages; the fastest marked.

The micro-batch is ``data.micro_batch_size``, one value for both stages, so it is the largest divisor of the
rank's share of ``data.batch_size`` at which both stages fit (the refine stage binds). "Fits": the predicted
``total`` (peak allocated plus allowances) is at most the GPU's memory. The fastest plan is the fitting one with
the fewest GPU-hours for the whole recipe (both stages; the GPU count is fixed, so also the shortest wall time).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from scale_refiner.plan.counts import meta_refiner, model_counts
from scale_refiner.plan.efficiency import EfficiencyArg
from scale_refiner.plan.hardware import GPU
from scale_refiner.plan.memory import predict_memory
from scale_refiner.plan.settings import Setting, all_settings
from scale_refiner.plan.timing import predict_time

IMAGENET_TRAIN = 1_281_167
STAGES = ("heads", "refine")


@dataclass
class Plan:
    setting: Setting
    micro_batch: int                 # 0: nothing fits
    accumulation: int
    fits: bool
    memory: Dict[str, Dict] = field(default_factory=dict)  # stage -> MemoryPrediction.as_dict()
    time: Dict[str, Dict] = field(default_factory=dict)    # stage -> TimePrediction.as_dict()
    steps: Dict[str, int] = field(default_factory=dict)
    gpu_hours: Dict[str, float] = field(default_factory=dict)
    command: str = ""
    fastest: bool = False

    @property
    def total_gpu_hours(self) -> float:
        return sum(self.gpu_hours.values())

    def as_dict(self) -> Dict:
        return dict(setting=self.setting.as_dict(), micro_batch=self.micro_batch, accumulation=self.accumulation,
                    fits=self.fits, fastest=self.fastest, memory=self.memory, time=self.time, steps=self.steps,
                    gpu_hours=self.gpu_hours, total_gpu_hours=self.total_gpu_hours, command=self.command)


def dataset_size(cfg) -> int:
    """Images per epoch: the config's cap when it sets one, else ImageNet-1K's train split."""
    return cfg.data.samples_per_epoch or IMAGENET_TRAIN


def compute_bytes_of(cfg) -> int:
    """On a GPU ``engine.precision=auto`` is bf16."""
    return 4 if cfg.engine.precision == "fp32" else 2


def largest_fitting(candidates, predict, capacity: float):
    """The largest micro-batch of ``candidates`` whose predicted memory fits ``capacity`` bytes, with that
    prediction: ``predict(micro)`` returns a ``Memory`` or a dict of them (one per stage, all must fit).
    (0, the smallest candidate's prediction) when none fits. Memory grows with the micro-batch, so the scan
    runs downwards and stops at the first fit. The planner and ``benchmark.py --batch auto`` both ask this."""
    memory = None
    for micro in sorted(set(candidates), reverse=True):
        memory = predict(micro)
        if all(m.total <= capacity for m in (memory.values() if isinstance(memory, dict) else [memory])):
            return micro, memory
    return 0, memory


def plan_all(cfg, config_path: str, gpu: GPU, gpus: int, efficiency: EfficiencyArg = None,
             root: Optional[Path] = None, settings: Optional[List[Setting]] = None) -> List[Plan]:
    """Every setting's plan; ``efficiency``: a number for every setting, an ``EfficiencyTable``, or None (the
    measured defaults, efficiency.py): each stage's time names the value it used."""
    from scale_refiner.engine.trainer import plan_stage
    root = Path(root or Path(__file__).resolve().parents[2])
    if cfg.data.batch_size % gpus:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by {gpus} GPUs")
    per_rank = cfg.data.batch_size // gpus
    c = compute_bytes_of(cfg)
    refiner = meta_refiner(cfg)
    stages = [s for s in STAGES if s in cfg.stages.run]
    counts = {s: model_counts(cfg, s, refiner) for s in stages}
    capacity = gpu.memory_gb * 1e9
    divisors = [d for d in range(per_rank, 0, -1) if per_rank % d == 0]
    plans = []
    trained = counts["refine"].depth - counts["refine"].frozen_blocks if "refine" in counts else 0
    for setting in settings or all_settings(gpus, root, gpus_per_node=gpu.gpus_per_node, trained_blocks=trained):
        scfg = copy.deepcopy(cfg)
        scfg.model.checkpointing = setting.checkpointing
        chosen, memory = largest_fitting(
            divisors, lambda micro: {s: predict_memory(scfg, counts[s], setting, gpus, micro, c) for s in stages},
            capacity)
        plan = Plan(setting, chosen, per_rank // chosen if chosen else 0, bool(chosen),
                    memory={s: m.as_dict() for s, m in memory.items()})
        if chosen:
            for s in stages:
                t = predict_time(scfg, counts[s], setting, gpu, gpus, chosen, efficiency, c)
                plan.time[s] = t.as_dict()
                steps = plan_stage(getattr(cfg.stages, s), dataset_size(cfg), cfg.data.batch_size,
                                   cfg.run.max_steps).total_steps
                plan.steps[s] = steps
                plan.gpu_hours[s] = steps * t.step_s * gpus / 3600
            plan.command = setting.command(config_path, gpus, gpu.gpus_per_node, chosen, per_rank)
        plans.append(plan)
    fitting = [p for p in plans if p.fits]
    if fitting:
        min(fitting, key=lambda p: p.total_gpu_hours).fastest = True
    return plans


def fastest(plans: List[Plan]) -> Optional[Plan]:
    return next((p for p in plans if p.fastest), None)
