"""Scaling projection: the fastest fitting plan of a recipe at several GPU counts, and its efficiency.

For each count N the planner searches every setting (``search.plan_all``) and keeps the fastest that fits. The
recipe's global batch stays fixed (the paper's recipes fix it), so more GPUs mean fewer samples per GPU: the
compute per step shrinks with N while the parameter traffic of a sharded engine does not, and across nodes it
runs at the network's rate instead of NVLink's. Scaling efficiency at N is the images/s per GPU at N over the
images/s of 1 GPU (1.0: perfect linear scaling). Everything is a prediction of the models in ``memory.py`` and
``timing.py``; the compute efficiency is the measured table's (``efficiency.py``: measured on one GPU, so at a
few samples per GPU it may be optimistic) or a number given (``--efficiency``); each row names its source.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from scale_refiner.plan.efficiency import EfficiencyArg, summarise_sources
from scale_refiner.plan.hardware import GPU
from scale_refiner.plan.search import fastest, plan_all


def scaling_rows(cfg, config_path: str, gpu: GPU, gpu_counts: Sequence[int],
                 efficiency: EfficiencyArg = None) -> List[Dict]:
    rows = []
    for n in gpu_counts:
        if cfg.data.batch_size % n:
            rows.append(dict(gpus=n, fits=False, why=f"data.batch_size {cfg.data.batch_size} is not divisible by {n}"))
            continue
        best = fastest(plan_all(cfg, config_path, gpu, n, efficiency))
        if best is None:
            rows.append(dict(gpus=n, fits=False, why="no setting fits in memory"))
            continue
        refine = best.time.get("refine") or best.time.get("heads")
        step = refine["step_s"]
        rows.append(dict(
            gpus=n, fits=True, setting=best.setting.label, micro_batch=best.micro_batch,
            accumulation=best.accumulation, per_gpu=cfg.data.batch_size // n, step_s=step,
            compute_s=refine["compute_s"], exposed_comm_s=refine["exposed_comm_s"], mfu=refine["mfu"],
            compute_efficiency=refine["efficiency"], compute_efficiency_source=refine["efficiency_source"],
            images_per_s_per_gpu=cfg.data.batch_size / n / step, gpu_hours=best.total_gpu_hours,
            wall_hours=best.total_gpu_hours / n, command=best.command))
    base = next((r for r in rows if r["fits"]), None)
    for r in rows:
        if r["fits"] and base is not None:
            # relative to the smallest count that fits (1 GPU when it does)
            r["efficiency"] = r["images_per_s_per_gpu"] / base["images_per_s_per_gpu"]
            r["relative_to"] = base["gpus"]
    return rows


def scaling_text(cfg, config_path: str, gpu: GPU, efficiency: EfficiencyArg, rows: List[Dict]) -> str:
    sources = summarise_sources(r["compute_efficiency_source"] for r in rows if r["fits"])
    lines = [f"Scaling projection for {config_path} on {gpu.name} (global batch {cfg.data.batch_size}; "
             f"{gpu.peak_tflops:.0f} TFLOP/s bf16; collectives at "
             f"{gpu.nvlink_gbps:.0f} GB/s inside a node of {gpu.gpus_per_node}, {gpu.internode_gbps:.0f} GB/s per GPU "
             f"between nodes)"]
    lines += [f"compute efficiency: {s}" for s in sources]
    lines += ["",
              "| GPUs | fastest setting that fits | per GPU (micro x accum) | refine step s | compute s | exposed comm s "
              "| MFU | img/s per GPU | scaling efficiency | GPU-hours | wall hours |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r["fits"]:
            lines.append(f"| {r['gpus']} | {r['why']} | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['gpus']} | {r['setting']} | {r['per_gpu']} ({r['micro_batch']} x {r['accumulation']}) | "
            f"{r['step_s']:.3f} | {r['compute_s']:.3f} | {r['exposed_comm_s']:.3f} | {r['mfu']:.1%} | "
            f"{r['images_per_s_per_gpu']:.1f} | {r['efficiency']:.2f} (vs {r['relative_to']}) | "
            f"{r['gpu_hours']:,.0f} | {r['wall_hours']:,.1f} |")
    return "\n".join(lines)
