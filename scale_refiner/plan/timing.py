"""Predicted time of one optimiser step on one GPU: compute, exposed communication, optimiser + EMA, data.

- compute: the analytic FLOPs of ``bench/flops.py`` (model FLOPs plus the recomputation of checkpointed blocks:
  one forward of each, every trained block with ``model.checkpointing=true``, N of them with N) of the rank's
  samples, at ``efficiency`` x the GPU's dense bf16 peak: a number given, else the measured table of
  ``efficiency.py`` (per card, model, checkpointing mode and compile, with its fallback rule; 0.4 assumed where
  nothing applies), fitted to benchmark rows by ``calibrate.py``. The prediction names its source. Selective checkpointing
  recomputes no matmul, only the pointwise ops (two LayerNorms, GELU, the residual adds, autocast's casts): they
  are memory-bound, so they are not FLOPs; they are modelled as ``SELECTIVE_RECOMPUTE`` (a stated 0.2) of the
  time of each trained block's forward (its matmul FLOPs at the same efficiency);
- communication, per rank, as the bytes of each collective (``full``: the tensor gathered or reduced;
  ``wire``: what a ring moves per rank, (W - 1) / W of it) at the NCCL bus bandwidth of the link it crosses
  (NVLink inside a node, the per-GPU network rate as soon as the job spans nodes). Per micro-batch:
  ZeRO-3 and FSDP2 all-gather every parameter in the compute dtype for the forward -- the frozen prefix too, on
  every micro-batch, since it is partitioned like the rest -- gather the trained ones again for the backward and
  reduce-scatter their gradients in ``engine.reduce_dtype``; ZeRO-2 reduce-scatters the gradients every
  micro-batch and all-gathers the updated parameters once per step; the method gathers the predictions (with
  gradient) and the enqueued projections (small). Each collective has an overlap fraction, the share that runs
  under compute (stated per engine below); what is not overlapped, or does not fit under the compute, is exposed;
- optimiser step and EMA: memory-bound, the bytes AdamW and the EMA read and write at the HBM bandwidth;
- data: the host-to-device copy of the rank's crops (fp32) over PCIe, counted exposed (DALI's mixed decoding
  makes them on the GPU, which costs less; decoding throughput is not modelled: ``launch/bench_data.py``).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

from scale_refiner.plan.counts import ModelCounts
from scale_refiner.plan.efficiency import EfficiencyArg, mode_of, resolve
from scale_refiner.plan.hardware import GPU
from scale_refiner.plan.memory import Crops
from scale_refiner.plan.settings import Setting

# Selective checkpointing: the time of a block's recomputed pointwise ops as a fraction of the block's forward.
# An estimate, not a measurement: in bf16 those ops read and write about 54 d bytes per token (two LayerNorms
# reading the fp32 residual and writing it cast, the residual add, GELU over the r d hidden), against 24 d^2
# matmul FLOPs; on an H100 (3.35 TB/s, 40 % of 989 TFLOP/s) that is 0.26 of the forward for ViT-L (d 1024) and
# 0.10 for ViT-2B (d 2560). 0.2 sits between them, on the side of not over-selling selective checkpointing;
# with model.compile the ops are fused with their neighbours and cost less.
SELECTIVE_RECOMPUTE = 0.2

# Share of a collective that runs under compute. ZeRO-3 prefetches parameters on a side stream
# (stage3_prefetch_bucket_size > 0) and reduces on one only with overlap_comm; FSDP2 prefetches the next
# all-gather and reduce-scatters on its own streams; ZeRO-2 overlaps its reduction with overlap_comm. 0.8, not 1:
# the first gather of a step and the last reduce have nothing to hide under.
OVERLAP = 0.8


@dataclass
class Collective:
    name: str
    full_bytes: float     # per occurrence: the whole tensor gathered / reduced
    wire_bytes: float     # per occurrence, per rank, ring
    per_step: int         # occurrences per optimiser step
    overlap: float
    seconds: float = 0.0  # all occurrences of a step
    # which link it crosses: True inside a node (NVLink), False the network, None as the job spans (the world)
    intra_node: Optional[bool] = None

    def as_dict(self) -> Dict:
        return asdict(self)


@dataclass
class TimePrediction:
    stage: str
    micro_batch: int
    accumulation: int
    per_rank_batch: int
    model_flops_per_sample: float
    hardware_flops_per_sample: float
    compute_s: float                  # includes selective_recompute_s
    selective_recompute_s: float = 0.0
    collectives: Dict[str, Dict] = field(default_factory=dict)
    comm_s: float = 0.0
    exposed_comm_s: float = 0.0
    optimizer_s: float = 0.0
    data_s: float = 0.0
    step_s: float = 0.0
    mfu: float = 0.0
    images_per_s_per_gpu: float = 0.0
    efficiency: float = 0.0           # the compute efficiency it ran at (of hardware FLOPs, efficiency.py)
    efficiency_source: str = ""       # where that came from: given, measured (card, date), a fallback, assumed

    def as_dict(self) -> Dict:
        return asdict(self)


def collectives(cfg, counts: ModelCounts, setting: Setting, world: int, micro_batch: int,
                compute_bytes: int = 2) -> Dict[str, Collective]:
    """The collectives of one optimiser step on one rank, with their bytes (no times yet)."""
    W = world
    if W == 1:
        return {}
    c = compute_bytes
    reduce_bytes = 4 if (c == 4 or cfg.engine.reduce_dtype == "fp32") else 2
    accumulation = max(1, cfg.data.batch_size // W // micro_batch)
    ring = (W - 1) / W
    T, F = counts.trainable, counts.frozen
    kind = setting.kind
    out: Dict[str, Collective] = {}

    def add(name, full, per_step, overlap):
        out[name] = Collective(name, full, full * ring, per_step, overlap)

    if kind == "fsdp2" and (setting.replicate > 1 or setting.replicate_frozen):
        _fsdp2_hybrid(out, setting, W, c, reduce_bytes, T, F, accumulation)
    elif kind in ("zero3", "fsdp2"):
        if kind == "zero3":
            kept_t, kept_f = counts.persistent(setting.zero.persistence_threshold)  # held whole: never gathered
            gather_ov = OVERLAP if setting.zero.prefetch_bucket_size > 0 else 0.0
            reduce_ov = OVERLAP if setting.zero.overlap_comm else 0.0
        else:
            kept_t, kept_f, gather_ov, reduce_ov = 0, 0, OVERLAP, OVERLAP
        add("all-gather, forward: trained parameters", c * (T - kept_t), accumulation, gather_ov)
        if F - kept_f:
            add("all-gather, forward: frozen parameters (every micro-batch)", c * (F - kept_f), accumulation,
                gather_ov)
        add("all-gather, backward: trained parameters", c * (T - kept_t), accumulation, gather_ov)
        add("reduce-scatter: gradients", reduce_bytes * (T - kept_t), accumulation, reduce_ov)
        if kept_t:  # gradients of parameters held whole are all-reduced
            add("all-reduce: gradients of whole-held parameters", 2 * reduce_bytes * kept_t, accumulation, reduce_ov)
        hpz = min(setting.zero.hpz, W) if kind == "zero3" else 1
        if hpz > 1:
            # ZeRO++ hpZ: the backward re-gathers the trained parameters from the node's secondary partitions
            name = "all-gather, backward: trained parameters"
            out[name] = Collective(name + " (hpZ, inside the node)", c * (T - kept_t),
                                   c * (T - kept_t) * (hpz - 1) / hpz, accumulation, gather_ov, intra_node=True)
    elif kind == "zero2":
        add("reduce-scatter: gradients", reduce_bytes * T, accumulation,
            OVERLAP if setting.zero.overlap_comm else 0.0)
        add("all-gather: updated parameters (after the step)", c * T, 1, 0.0)
    crops = Crops.of(cfg, counts.patch)
    heads = len(cfg.heads.blocks) + 1
    out_dim = cfg.heads.proj_out_dim
    # predictions of every crop gathered with gradient (forward gather + backward reduce) and the g1
    # projections with their indices and labels gathered for the enqueue: fp32, per head
    method = heads * micro_batch * W * out_dim * 4 * (2 * crops.count + 1) + 2 * micro_batch * W * 8
    if counts.stage == "refine" or counts.heads_params:
        out["method: NNA gathers, enqueue"] = Collective("method: NNA gathers, enqueue", method, method * ring,
                                                          accumulation, 0.0)
    return out


def _fsdp2_hybrid(out: Dict[str, Collective], setting: Setting, W: int, c: int, reduce_bytes: int, T: int, F: int,
                  accumulation: int) -> None:
    """FSDP2's collectives with HSDP (``setting.replicate`` R nodes, each shard group a node's W / R ranks) and/or
    the frozen prefix replicated (it is not gathered at all): all-gathers and reduce-scatters inside the shard
    group (NVLink under HSDP), and under HSDP the reduce-scattered gradient shards (1 / (W / R) of them) all-reduced
    across the R replicas over the network."""
    R = max(setting.replicate, 1)
    S = W // R  # the shard group
    ring = (S - 1) / S
    intra = True if R > 1 else None

    def add(name, full, per_step, wire=None, intra_node=intra):
        out[name] = Collective(name, full, full * ring if wire is None else wire, per_step, OVERLAP,
                               intra_node=intra_node)

    if S > 1:
        add("all-gather, forward: trained parameters", c * T, accumulation)
        if F and not setting.replicate_frozen:
            add("all-gather, forward: frozen parameters (every micro-batch)", c * F, accumulation)
        add("all-gather, backward: trained parameters", c * T, accumulation)
        add("reduce-scatter: gradients", reduce_bytes * T, accumulation)
    if R > 1:
        shard = reduce_bytes * T / S
        add("all-reduce across nodes: gradient shards (HSDP)", shard, accumulation, wire=2 * shard * (R - 1) / R,
            intra_node=False)


def predict_time(cfg, counts: ModelCounts, setting: Setting, gpu: GPU, world: int, micro_batch: int,
                 efficiency: EfficiencyArg = None, compute_bytes: int = 2) -> TimePrediction:
    """``efficiency``: a number (used as it is), an ``EfficiencyTable`` or None (the measured defaults)."""
    from scale_refiner.bench.flops import block_forward_flops, step_flops
    from scale_refiner.models.vit import checkpointing_plan
    # the refine stage's checkpointing mode keys the table in both stages (the heads stage trains no block)
    used = resolve(efficiency, gpu, cfg.model.name,
                   mode_of(setting.checkpointing, counts.depth - cfg.model.freeze_blocks), bool(cfg.model.compile))
    efficiency = used.value
    W = world
    per_rank = cfg.data.batch_size // W
    accumulation = max(1, per_rank // micro_batch)
    flop_cfg = copy.deepcopy(cfg)
    flop_cfg.model.checkpointing = setting.checkpointing
    flops = step_flops(flop_cfg, counts.stage)
    peak = gpu.peak_tflops * 1e12
    compute = per_rank * flops.hardware / (peak * efficiency)
    trained = counts.depth - counts.frozen_blocks if counts.stage == "refine" else 0
    policy, checkpointed = checkpointing_plan(setting.checkpointing, trained)
    selective = 0.0
    if policy == "selective":
        block = sum(c["count"] * block_forward_flops(c["tokens"], counts.dim, counts.mlp_ratio) for c in flops.crops)
        selective = per_rank * SELECTIVE_RECOMPUTE * checkpointed * block / (peak * efficiency)
        compute += selective
    bw = (gpu.nvlink_gbps if W <= gpu.gpus_per_node else gpu.internode_gbps) * 1e9
    colls = collectives(cfg, counts, setting, W, micro_batch, compute_bytes)
    hidden_wanted = 0.0
    total = 0.0
    for col in colls.values():
        link = bw if col.intra_node is None else (gpu.nvlink_gbps if col.intra_node else gpu.internode_gbps) * 1e9
        col.seconds = col.per_step * col.wire_bytes / link
        total += col.seconds
        hidden_wanted += col.overlap * col.seconds
    exposed = total - min(hidden_wanted, compute)  # what overlaps can hide at most the compute time
    T, E = counts.trainable, counts.trainable_encoder
    c = compute_bytes
    sharded = setting.kind in ("zero3", "zero2", "fsdp2")
    div = W if sharded else 1
    if setting.kind == "fsdp2":
        div = max(W // max(setting.replicate, 1), 1)  # HSDP: each replica steps its node's shards
    if setting.kind == "single":
        opt_bytes = T * (4 + 8 + 16)            # fp32 gradient read, parameter read + write, moments read + write
    else:
        opt_bytes = T / div * (c + 8 + 16 + c)  # gradient read, master read + write, moments, compute copy write
    ema_bytes = 12 * E / div if counts.stage == "refine" else 0  # online read, shadow read + write
    optimizer = (opt_bytes + ema_bytes) / (gpu.hbm_gbps * 1e9)
    data = per_rank * Crops.of(cfg, counts.patch).pixel_bytes / (gpu.pcie_gbps * 1e9)
    step = compute + exposed + optimizer + data
    return TimePrediction(
        stage=counts.stage, micro_batch=micro_batch, accumulation=accumulation, per_rank_batch=per_rank,
        model_flops_per_sample=flops.model, hardware_flops_per_sample=flops.hardware, compute_s=compute,
        selective_recompute_s=selective, collectives={k: v.as_dict() for k, v in colls.items()}, comm_s=total,
        exposed_comm_s=exposed,
        optimizer_s=optimizer, data_s=data, step_s=step, mfu=per_rank * flops.model / (step * peak),
        images_per_s_per_gpu=per_rank / step, efficiency=efficiency, efficiency_source=used.source)
