"""Normalisation layers for the ID heads.

``bn``: plain BatchNorm1d, statistics of the local batch.
``syncbn``: BatchNorm1d with statistics of the global batch. torch's ``nn.SyncBatchNorm`` runs on GPUs only,
so this one is written with the autograd-aware ``torch.distributed.nn.all_reduce``: one all-reduce of
[sum x, sum x^2, n] in the forward and one in the backward, on any backend (gloo included). Its gradient is
exactly full-batch BN's, which is what makes a 2-rank run equal a 1-process run on the same global batch.
Running statistics come from the global statistics, so every rank holds the same buffers.

Precision: all three variants normalise in fp32 whatever the autocast and whatever dtype the engine gave the
affine parameters (a bf16 copy under DeepSpeed's bf16 mode or FSDP2's bf16 policy): the input and the
parameters are cast up, the running statistics stay fp32 buffers, and the output is fp32 (fp64 inputs stay
fp64). The Linear after a norm runs in bf16 under autocast anyway; the projector's last norm feeds the queue
and the loss, which are fp32 too (precision.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from scale_refiner.heads.affine import affine_params
from scale_refiner.heads.async_bn import AsyncBatchNorm1d
from scale_refiner.precision import as_fp32, fp32_island



class FP32BatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` computed in fp32: its forward, with input and affine parameters cast up, autocast off."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fp32_island(x.device):
            return self._forward_fp32(as_fp32(x))

    def _forward_fp32(self, x: torch.Tensor) -> torch.Tensor:
        # nn.BatchNorm1d.forward, step for step (num_batches_tracked, momentum, eval with running statistics)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        weight, bias = affine_params(self, x.dtype)
        return F.batch_norm(x, self.running_mean if keep_running else None,
                            self.running_var if keep_running else None, weight, bias, use_batch, factor, self.eps)


class GlobalBatchNorm1d(FP32BatchNorm1d):
    """SyncBN for (N, C) inputs on any process-group backend; plain BN outside a distributed run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fp32_island(x.device):
            if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
                return self._forward_fp32(as_fp32(x))
            return self._forward_global(as_fp32(x))

    def _forward_global(self, x32: torch.Tensor) -> torch.Tensor:
        if x32.ndim != 2:
            raise ValueError(f"GlobalBatchNorm1d expects (N, C) inputs, got {tuple(x32.shape)}")
        # the row count as a device fill, not a host list copied over: no host-to-device copy in the step
        rows = torch.full((1,), x32.shape[0], dtype=x32.dtype, device=x32.device)
        local = torch.cat([x32.sum(0), (x32 * x32).sum(0), rows])
        total = dist_fn.all_reduce(local)  # sums over ranks, and its backward all-reduces the gradient
        channels = x32.shape[1]
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
            weight, bias = affine_params(self, x32.dtype)
            y = y * weight + bias
        return y


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "bn":
        return FP32BatchNorm1d(dim)
    if kind == "syncbn":
        return GlobalBatchNorm1d(dim)
    if kind == "async":  # previous-step global statistics, one non-blocking bucketed reduce per step
        return AsyncBatchNorm1d(dim)
    # the allowed values are the config's (config.CHOICES["heads.norm"]), checked at load
    raise ValueError(f"head norm {kind!r} is not one of bn, syncbn, async")
