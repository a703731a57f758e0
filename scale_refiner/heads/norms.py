"""Normalisation layers for the ID heads.

``bn``: plain BatchNorm1d, statistics of the local batch.
``syncbn``: BatchNorm1d with statistics of the global batch. torch's ``nn.SyncBatchNorm`` runs on GPUs only,
so this one is written with the autograd-aware ``torch.distributed.nn.all_reduce``: one all-reduce of
[sum x, sum x^2, n] in the forward and one in the backward, on any backend (gloo included). Its gradient is
exactly full-batch BN's, which is what makes a 2-rank run equal a 1-process run on the same global batch.
Running statistics come from the global statistics, so every rank holds the same buffers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

NORM_KINDS = ("bn", "syncbn", "async")


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """SyncBN for (N, C) inputs on any process-group backend; plain BN outside a distributed run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.ndim != 2:
            raise ValueError(f"GlobalBatchNorm1d expects (N, C) inputs, got {tuple(x.shape)}")
        x32 = x if x.dtype == torch.float64 else x.float()  # bf16/fp16 statistics in fp32
        local = torch.cat([x32.sum(0), (x32 * x32).sum(0), x32.new_tensor([x.shape[0]])])
        total = dist_fn.all_reduce(local)  # sums over ranks, and its backward all-reduces the gradient
        channels = x.shape[1]
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm1d(dim)
    if kind == "syncbn":
        return GlobalBatchNorm1d(dim)
    if kind == "async":  # previous-step global statistics, one non-blocking bucketed reduce per step
        from scale_refiner.heads.async_bn import AsyncBatchNorm1d
        return AsyncBatchNorm1d(dim)
    raise ValueError(f"head norm {kind!r} is not one of {', '.join(NORM_KINDS)}")
