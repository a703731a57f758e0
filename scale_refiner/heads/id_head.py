"""The ID head of MIM-Refiner: a projector and a predictor, with a pluggable normalisation layer.

Projector: Linear(D, H) N GELU, Linear(H, H) N GELU, Linear(H, d) N.
Predictor: Linear(d, H') N GELU, Linear(H', d) N, fed the un-normalised projector output.
Linears have no bias (the following norm has one); N is BatchNorm1d with affine parameters, or its global-batch form (heads/norms.py).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from scale_refiner.heads.norms import make_norm


def _mlp(dims, norm: str, last_act: bool) -> nn.Sequential:
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [nn.Linear(d_in, d_out, bias=False), make_norm(norm, d_out)]
        if i < len(dims) - 2 or last_act:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class IDHead(nn.Module):
    def __init__(self, in_dim: int, proj_hidden_dim: int = 2048, proj_out_dim: int = 256,
                 pred_hidden_dim: int = 4096, norm: str = "bn"):
        super().__init__()
        self.projector = _mlp([in_dim, proj_hidden_dim, proj_hidden_dim, proj_out_dim], norm, last_act=False)
        self.predictor = _mlp([proj_out_dim, pred_hidden_dim, proj_out_dim], norm, last_act=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: CLS tokens of every crop, concatenated, so BN statistics mix all crops.

        Returns the projector output z and the predictor output p, both un-normalised.
        """
        z = self.projector(x)
        return z, self.predictor(z)
