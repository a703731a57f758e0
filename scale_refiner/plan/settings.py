"""The engine settings the trainer supports, as the planner enumerates them, and the command line of each.

A ``Setting`` is one way to run a recipe: the engine (``single``: one process, plain AdamW; ``deepspeed``:
ZeRO-2 or ZeRO-3 as a JSON in ds_configs/ says; ``fsdp2``) and activation checkpointing (``model.checkpointing``:
off, selective, the first N trained blocks, every trained block). The DeepSpeed JSON's values that change memory
or time are read from the file itself. A new option (hybrid sharding, a replicated frozen prefix) is a new field
here with its config override, and a branch where ``memory`` and ``timing`` read it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

# DeepSpeed's own defaults (deepspeed/runtime/zero/config.py) for the keys a JSON may leave out
_DS_DEFAULTS = {"contiguous_gradients": True, "reduce_bucket_size": 5e8,
                "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
                "stage3_param_persistence_threshold": 1e5, "stage3_max_live_parameters": 1e9}


@dataclass(frozen=True)
class ZeroOptions:
    """What the planner reads from a DeepSpeed JSON."""
    path: str
    stage: int
    overlap_comm: bool
    contiguous_gradients: bool
    reduce_bucket_size: int
    allgather_bucket_size: int
    prefetch_bucket_size: int
    persistence_threshold: int
    max_live_parameters: int
    offload: bool
    hpz: int = 1  # ZeRO++ zero_hpz_partition_size: ranks of a node sharing a secondary partition (1: off)

    @classmethod
    def from_json(cls, path: str) -> "ZeroOptions":
        zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
        get = lambda key: zero.get(key, _DS_DEFAULTS[key])  # noqa: E731
        offload = any(zero.get(k, {}).get("device", "none") in ("cpu", "nvme")
                      for k in ("offload_optimizer", "offload_param"))
        stage = int(zero.get("stage", 0))
        # unset, DeepSpeed turns overlap_comm on for stage 3 only (its config validator)
        overlap = zero.get("overlap_comm")
        return cls(path=str(path), stage=stage, overlap_comm=bool(stage == 3 if overlap is None else overlap),
                   contiguous_gradients=bool(get("contiguous_gradients")),
                   reduce_bucket_size=int(get("reduce_bucket_size")),
                   allgather_bucket_size=int(get("allgather_bucket_size")),
                   prefetch_bucket_size=int(get("stage3_prefetch_bucket_size")),
                   persistence_threshold=int(get("stage3_param_persistence_threshold")),
                   max_live_parameters=int(get("stage3_max_live_parameters")), offload=offload,
                   hpz=int(zero.get("zero_hpz_partition_size", 1) or 1))


def checkpointing_values(trained: int) -> List[Any]:
    """Every distinct ``model.checkpointing`` of a model training ``trained`` blocks, least memory first: every
    block, the first N for N = trained - 1 .. 1, selective, none."""
    if trained <= 0:
        return [False]
    return [True, *range(trained - 1, 0, -1), "selective", False]


def normal_checkpointing(value, trained: int):
    """One spelling per behaviour: 0 is false, N >= the trained blocks is true."""
    if isinstance(value, bool) or value == "selective":
        return value if trained > 0 else False
    return False if value <= 0 else (True if value >= trained else int(value))


def checkpointing_label(value) -> str:
    if value is True:
        return "checkpointing on"
    if value is False:
        return "checkpointing off"
    if value == "selective":
        return "checkpointing selective"
    return f"checkpointing {value} block{'s' if value != 1 else ''}"


@dataclass(frozen=True)
class Setting:
    engine: str                       # single | deepspeed | fsdp2
    checkpointing: Any                # model.checkpointing: False | True | N (first N trained blocks) | "selective"
    zero: Optional[ZeroOptions] = None
    replicate: int = 1                # fsdp2: engine.fsdp_replicate, replica groups (HSDP over nodes; 1: plain)
    replicate_frozen: bool = False    # fsdp2: engine.replicate_frozen, the frozen prefix whole in the compute dtype
    optimizer_impl: str = "auto"      # engine.optimizer_impl: AdamW's kernel (auto: fused on a GPU)

    @property
    def kind(self) -> str:
        """single, zero2, zero3 or fsdp2."""
        return f"zero{self.zero.stage}" if self.engine == "deepspeed" else self.engine

    @property
    def label(self) -> str:
        hybrid = f" HSDP {self.replicate}x" if self.replicate > 1 else ""
        frozen = ", frozen prefix replicated" if self.replicate_frozen else ""
        return f"{self.kind}{hybrid}{' (' + Path(self.zero.path).name + ')' if self.zero else ''}{frozen}, " \
               f"{checkpointing_label(self.checkpointing)}"

    def overrides(self, micro_batch: int, per_rank: int) -> List[str]:
        out = [f"engine.kind={self.engine}"]
        if self.zero:
            out.append(f"engine.zero_config={self.zero.path}")
        if self.replicate > 1:
            out.append(f"engine.fsdp_replicate={self.replicate}")
        if self.replicate_frozen:
            out.append("engine.replicate_frozen=true")
        if self.optimizer_impl != "auto":
            out.append(f"engine.optimizer_impl={self.optimizer_impl}")
        value = self.checkpointing
        out.append(f"model.checkpointing={str(value).lower() if isinstance(value, bool) else value}")
        if micro_batch != per_rank:
            out.append(f"data.micro_batch_size={micro_batch}")
        return out

    def command(self, config: str, gpus: int, gpus_per_node: int, micro_batch: int, per_rank: int) -> str:
        """The exact launch line (multi-node: run on every node, as docs/training.md describes)."""
        tail = f"launch/refine.py --config {config} " + " ".join(self.overrides(micro_batch, per_rank))
        nodes = -(-gpus // gpus_per_node)
        per_node = min(gpus, gpus_per_node)
        if self.engine == "single":
            return f"python {tail}"
        if self.engine == "deepspeed":
            if nodes == 1:
                return f"deepspeed --num_gpus {per_node} {tail}"
            return f"deepspeed --hostfile hosts --num_nodes {nodes} --num_gpus {per_node} {tail}"
        if nodes == 1:
            return f"torchrun --nproc_per_node {per_node} {tail}"
        return (f"torchrun --nnodes {nodes} --nproc_per_node {per_node} --rdzv_backend c10d "
                f"--rdzv_endpoint $HEAD:29500 --rdzv_id refine {tail}")

    def as_dict(self) -> Dict:
        out = asdict(self)
        out.update(kind=self.kind, label=self.label)
        return out


PLANNED_DS_CONFIGS = ("ds_configs/zero3.json", "ds_configs/zero2.json", "ds_configs/zero3_hpz.json")


def all_settings(gpus: int, root: Path, ds_configs=PLANNED_DS_CONFIGS, gpus_per_node: int = 8,
                 trained_blocks: int = 1) -> List[Setting]:
    """Every setting the trainer runs on ``gpus`` GPUs: one process only on one GPU; ZeRO from each JSON; FSDP2,
    with the frozen prefix sharded or replicated, and across nodes also hybrid (HSDP, one replica a node); each
    with every checkpointing of ``trained_blocks`` trained blocks (``checkpointing_values``). An offloading JSON
    (ds_configs/zero3_offload.json) is left out: the memory and time of host offload are not modelled. A ZeRO++
    hpZ JSON is planned only across nodes (inside one node its secondary partition spans the same ranks as the
    primary one: plain ZeRO-3 with more memory)."""
    out = []
    nodes = -(-gpus // gpus_per_node)
    engines = [("single", None, 1)] if gpus == 1 else []
    for p in ds_configs:
        zero = ZeroOptions.from_json(str(Path(root) / p))
        if zero.hpz > 1 and (nodes == 1 or gpus % zero.hpz):
            continue
        engines.append(("deepspeed", zero, 1))
    engines.append(("fsdp2", None, 1))
    if nodes > 1 and gpus % nodes == 0:
        engines.append(("fsdp2", None, nodes))
    for engine, zero, replicate in engines:
        if zero is not None:
            zero = _relative(zero, root)
            if zero.offload:
                continue
        for frozen in ((False, True) if engine == "fsdp2" else (False,)):
            for ckpt in checkpointing_values(trained_blocks):
                out.append(Setting(engine, ckpt, zero, replicate=replicate, replicate_frozen=frozen))
    return out


def _relative(zero: ZeroOptions, root: Path) -> ZeroOptions:
    path = Path(zero.path)
    try:
        path = path.resolve().relative_to(Path(root).resolve())
    except ValueError:
        pass
    return replace(zero, path=str(path))


def setting_of_config(cfg, root: Path) -> Setting:
    """The setting a config runs as it is (engine.kind, engine.zero_config, model.checkpointing)."""
    from scale_refiner.models.vit import resolve_model_dims
    zero = None
    if cfg.engine.kind == "deepspeed":
        path = Path(cfg.engine.zero_config)
        zero = _relative(ZeroOptions.from_json(str(path if path.is_absolute() else Path(root) / path)), root)
    trained = resolve_model_dims(cfg.model)["depth"] - cfg.model.freeze_blocks
    return Setting(cfg.engine.kind, normal_checkpointing(cfg.model.checkpointing, trained), zero,
                   replicate=cfg.engine.fsdp_replicate, replicate_frozen=bool(cfg.engine.replicate_frozen),
                   optimizer_impl=cfg.engine.optimizer_impl)


