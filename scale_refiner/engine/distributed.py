"""Process-group set-up from the launcher's environment (deepspeed, torchrun, or none).

Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. With a GPU the backend is
NCCL and each rank takes cuda:LOCAL_RANK; without one it is gloo on the CPU.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        """The process group the method gathers over; None in a single process."""
        return dist.group.WORLD if self.world > 1 else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(use_deepspeed: bool = False, need_group: bool = False) -> DistContext:
    """``need_group``: make a process group even for one process (FSDP2 shards over a device mesh)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 or use_deepspeed:
        if use_deepspeed:
            import deepspeed
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        elif not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    device_id=device if device.type == "cuda" else None)
        world, rank = dist.get_world_size(), dist.get_rank()
    elif need_group and not dist.is_initialized():
        # a plain `python launch/refine.py`: a 1-rank group over an in-memory store, no rendezvous
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=device)


def start_job(cfg) -> DistContext:
    """What every launcher (refine, pretrain_mae) does first: the process group its ``engine.kind`` needs,
    warnings only from ranks other than 0, then the config validated against the world size. Raises
    ``ConfigError`` naming the key."""
    from scale_refiner.config import ConfigError, validate
    ctx = init_distributed(use_deepspeed=cfg.engine.kind == "deepspeed", need_group=cfg.engine.kind == "fsdp2")
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    validate(cfg, world_size=ctx.world)
    if cfg.engine.kind == "single" and ctx.world > 1:
        raise ConfigError(f"config key 'engine.kind': single runs in one process, launched with {ctx.world} "
                          f"ranks; use deepspeed or fsdp2")
    return ctx


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, fp32 on the CPU (CPU bf16 matmuls are slow and not the
    production path)."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
