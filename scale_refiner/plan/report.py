"""The planner's output: a text report and the same content as JSON."""
from __future__ import annotations

from typing import Dict, List

from scale_refiner.plan.efficiency import EfficiencyArg, EfficiencyTable, summarise_sources
from scale_refiner.plan.hardware import GPU
from scale_refiner.plan.search import Plan, dataset_size, fastest

GB = 1e9


def efficiency_sources(plans: List[Plan]) -> List[str]:
    """Every distinct compute efficiency the plans' times ran at, with its source, once."""
    return summarise_sources(t["efficiency_source"] for p in plans for t in p.time.values())


def _given(efficiency: EfficiencyArg):
    """The JSON of the ``efficiency`` argument: the number given, the table's file(s), or None (the defaults)."""
    if isinstance(efficiency, EfficiencyTable):
        return efficiency.origin or "table"
    return efficiency


def as_json(cfg, config_path: str, gpu: GPU, gpus: int, efficiency: EfficiencyArg, plans: List[Plan],
            counts: Dict) -> Dict:
    best = fastest(plans)
    return {"config": config_path, "gpus": gpus, "gpu": gpu.as_dict(), "efficiency": _given(efficiency),
            "efficiency_sources": efficiency_sources(plans),
            "global_batch": cfg.data.batch_size, "dataset_size": dataset_size(cfg),
            "epochs": {s: getattr(cfg.stages, s).epochs for s in cfg.stages.run},
            "counts": counts, "plans": [p.as_dict() for p in plans],
            "fastest": best.as_dict() if best else None, "command": best.command if best else None}


def shown(plans: List[Plan]) -> List[Plan]:
    """The plans the text table lists: of the "first N blocks checkpointed" settings of an engine, only the
    smallest N at each micro-batch (a larger N at the same micro-batch only recomputes more) and, of those that
    fit nowhere, the largest N. The JSON lists every plan."""
    def blocks(p: Plan):
        value = p.setting.checkpointing
        return None if isinstance(value, (bool, str)) else value

    keep: Dict = {}
    for p in plans:
        n = blocks(p)
        if n is None:
            continue
        key = (p.setting.kind, p.setting.zero, p.micro_batch)
        held = keep.get(key)
        if held is None or (not held.fastest and (p.fastest or (n < blocks(held) if p.fits else n > blocks(held)))):
            keep[key] = p
    kept = {id(p) for p in keep.values()}
    return [p for p in plans if blocks(p) is None or id(p) in kept]


def _breakdown(title: str, items: Dict[str, float]) -> List[str]:
    lines = [f"  {title}"]
    lines += [f"    {k:<58} {v / GB:9.2f} GB" for k, v in items.items() if v]
    return lines


def as_text(cfg, config_path: str, gpu: GPU, gpus: int, efficiency: EfficiencyArg, plans: List[Plan],
            counts: Dict) -> str:
    out = [f"Plan for {config_path} on {gpus} x {gpu.name} ({gpu.memory_gb:g} GB, {gpu.peak_tflops:g} TFLOP/s bf16; "
           f"NVLink {gpu.nvlink_gbps:g} GB/s, network {gpu.internode_gbps:g} GB/s "
           f"per GPU, {gpu.gpus_per_node} GPUs a node)"]
    # the efficiency of the hardware FLOPs (recomputation included) in the compute time: column eff
    out += [f"compute efficiency: {s}" for s in efficiency_sources(plans)]
    out += [f"global batch {cfg.data.batch_size} ({cfg.data.batch_size // gpus} per GPU), "
            f"{dataset_size(cfg):,} images per epoch, epochs: "
            + ", ".join(f"{s} {getattr(cfg.stages, s).epochs:g}" for s in cfg.stages.run)]
    for stage, c in counts.items():
        out.append(f"parameters ({stage}): {c['total_params']:,} ({c['encoder_params']:,} encoder + "
                   f"{c['heads_params']:,} heads), trained {c['trainable']:,}, frozen {c['frozen']:,}")
    out.append("")
    width = max([40] + [len(p.setting.label) for p in plans])  # the longest setting's label sets the column
    header = (f"{'':2}{'setting':<{width}} {'micro':>5} {'accum':>5} {'peak GB':>8} {'total GB':>8} {'step s':>7} "
              f"{'compute':>7} {'comm':>6} {'opt':>6} {'data':>6} {'eff':>5} {'MFU':>5} {'img/s/GPU':>9} {'GPU-h':>8}")
    out.append(header)
    listed = shown(plans)
    for p in listed:
        mark = "* " if p.fastest else "  "
        if not p.fits:
            refine = p.memory.get("refine") or next(iter(p.memory.values()))
            out.append(f"{mark}{p.setting.label:<{width}} does not fit at micro-batch 1 "
                       f"({refine['total'] / GB:.1f} GB > {gpu.memory_gb:g} GB)")
            continue
        stage = "refine" if "refine" in p.time else next(iter(p.time))
        t = p.time[stage]
        peak = max(x["peak_allocated"] for x in p.memory.values())
        total = max(x["total"] for x in p.memory.values())
        out.append(f"{mark}{p.setting.label:<{width}} {p.micro_batch:>5} {p.accumulation:>5} {peak / GB:>8.1f} "
                   f"{total / GB:>8.1f} {t['step_s']:>7.3f} {t['compute_s']:>7.3f} {t['exposed_comm_s']:>6.3f} "
                   f"{t['optimizer_s']:>6.3f} {t['data_s']:>6.3f} {t['efficiency']:>5.2f} {t['mfu']:>5.1%} "
                   f"{t['images_per_s_per_gpu']:>9.1f} {p.total_gpu_hours:>8.0f}")
    out.append("(step time, split, compute efficiency and MFU of the refine stage; GPU-hours of both stages; * the "
               "fastest that fits)")
    if len(listed) < len(plans):
        out.append(f"({len(plans) - len(listed)} settings with N checkpointed blocks not listed: a smaller N fits at "
                   f"the same micro-batch with less recomputation; --json lists all {len(plans)})")
    best = fastest(plans)
    if best is None:
        out.append("\nNothing fits: more GPUs, a larger GPU, or a smaller model.")
        return "\n".join(out)
    out.append(f"\nFastest that fits: {best.setting.label}, micro-batch {best.micro_batch} x {best.accumulation} "
               f"accumulation steps")
    for stage, m in best.memory.items():
        t = best.time[stage]
        out.append(f"\n[{stage} stage] peak {m['peak_allocated'] / GB:.2f} GB allocated ({m['peak_phase']}), "
                   f"{m['total'] / GB:.2f} GB with allowances, of {gpu.memory_gb:g} GB")
        out += _breakdown("state", m["state"])
        out += _breakdown("activations and transients at the peak", m["activations"])
        out += _breakdown("allowances", m["allowances"])
        out.append(f"  per sample: trained block saves {m['per_sample']['trained block, saved'] / 1e6:.1f} MB, "
                   f"checkpointed block {m['per_sample']['checkpointed block, saved'] / 1e6:.1f} MB, "
                   f"selective block {m['per_sample']['selective block, saved'] / 1e6:.1f} MB")
        out.append(f"  step {t['step_s']:.3f} s = compute {t['compute_s']:.3f} + exposed communication "
                   f"{t['exposed_comm_s']:.3f} (of {t['comm_s']:.3f}) + optimiser/EMA {t['optimizer_s']:.3f} + data "
                   f"{t['data_s']:.3f}; {t['model_flops_per_sample'] / 1e12:.2f} TFLOP model "
                   f"({t['hardware_flops_per_sample'] / 1e12:.2f} with recomputation) per sample; MFU "
                   f"{t['mfu']:.1%}; {t['images_per_s_per_gpu']:.1f} img/s per GPU; {best.steps[stage]:,} steps, "
                   f"{best.gpu_hours[stage]:,.0f} GPU-hours")
        out.append(f"  compute efficiency {t['efficiency_source']}")
        for name, col in t["collectives"].items():
            out.append(f"    {name:<66} {col['full_bytes'] / GB:7.3f} GB x {col['per_step']}/step, "
                       f"{col['wire_bytes'] / GB:.3f} GB on the wire each, {col['seconds'] * 1e3:7.1f} ms, "
                       f"overlap {col['overlap']:.0%}")
    out.append(f"\nTotal: {best.total_gpu_hours:,.0f} GPU-hours ({best.total_gpu_hours / gpus:,.1f} hours wall on "
               f"{gpus} GPUs)")
    out.append(f"\nCommand:\n  {best.command}")
    return "\n".join(out)
