"""ZeRO-3 partitions as a model sees them while it is built: construction under ``deepspeed.zero.Init``, and
reading or writing this rank's part of a partitioned parameter.

Below the models and the engine alike: ``models/vit.py`` initialises and fills partitioned parameters while it
is built, ``engine/zero.py`` builds, loads and gathers them; neither imports the other for it.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn


def zero_init(ds_config: dict, module: Optional[nn.Module] = None):
    """``deepspeed.zero.Init`` as the builds here use it: a context under which each module's parameters are
    partitioned over the ranks as soon as the module is constructed, or, given ``module``, the partitioning of
    its parameters that are not partitioned yet.

    Partitions are fp32 whatever the run's precision: they hold the loaded values exactly, and the engine takes
    its fp32 masters from them before casting them to the compute dtype (``ZeroEngine``). Layers are constructed
    and initialised on the host, in fp32, as in a plain build (no device or dtype override of tensor factories),
    so they draw the same random numbers from the same generator; each full parameter lives only until its module
    is built (DeepSpeed broadcasts rank 0's and partitions it)."""
    import deepspeed
    config = {k: v for k, v in ds_config.items() if k not in ("bf16", "fp16")}
    config.setdefault("train_micro_batch_size_per_gpu", 1)  # DeepSpeed's config parser insists on a batch size
    extra = {}
    if config.get("zero_optimization", {}).get("zero_hpz_partition_size", 1) > 1:
        # ZeRO++ hpZ: Init creates its intra-node group whenever it is not handed one, and refuses to create it a
        # second time in the process; the builds here call Init more than once (encoder, then the heads; every
        # stage), so each after the first is handed the group the first made
        from deepspeed.utils import groups
        existing = groups._get_zero_param_intra_parallel_group()
        if existing is not None:
            extra["zero_param_parallel_group"] = existing
    return deepspeed.zero.Init(module=module, config_dict_or_path=config, dtype=torch.float32, tensor_overrides=[],
                               **extra)


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: ``param`` itself is an empty placeholder, ``param.ds_tensor`` this rank's part."""
    return getattr(param, "ds_tensor", None) is not None


def partition_range(param) -> Tuple[int, int, int]:
    """``(start, stop, size)``: this rank's ZeRO-3 partition of ``param`` holds elements ``[start, stop)`` of the
    flattened parameter, in a partition of ``size`` elements (``ceil(numel / world)``; zero-padded at the end)."""
    size = param.ds_tensor.ds_numel
    rank = dist.get_rank(group=param.ds_process_group)
    start = min(rank * size, param.ds_numel)
    return start, min(start + size, param.ds_numel), size


@torch.no_grad()
def fill_partition(param, read: Callable[[int, int], torch.Tensor]) -> None:
    """Set this rank's partition of ``param`` to elements ``[start, stop)`` of its new value, as ``read(start,
    stop)`` gives them (any dtype and device; cast and copied here); the padding is zeroed."""
    start, stop, size = partition_range(param)
    local = param.ds_tensor
    if stop > start:
        local[: stop - start].copy_(read(start, stop).reshape(-1))
    if stop - start < size:
        local[stop - start:].zero_()
