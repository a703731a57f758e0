"""The affine parameters of a BatchNorm in the dtype its statistics are computed in: shared by the plain,
global-batch and async-statistics norms (heads/norms.py, heads/async_bn.py)."""
from __future__ import annotations

import torch
from torch import nn


def affine_params(bn: nn.BatchNorm1d, dtype: torch.dtype):
    """The norm's weight and bias in ``dtype`` (a bf16 engine copy is cast up; the gradient flows back)."""
    if not bn.affine:
        return None, None
    return bn.weight.to(dtype), bn.bias.to(dtype)
