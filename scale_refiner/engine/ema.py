"""EMA of the encoder, kept in fp32 and updated with one fused ``_foreach_lerp_`` per step.

It tracks every encoder parameter so the exported EMA is a complete model; frozen ones never change, so only
the trainable ones are lerped. ``ema = decay * ema + (1 - decay) * online`` is ``lerp(ema, online, 1 - decay)``.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn


class EncoderEMA:
    def __init__(self, encoder: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, _ in encoder.named_parameters()]
        self.shadow: Dict[str, torch.Tensor] = {n: p.detach().float().clone() for n, p in encoder.named_parameters()}
        self.trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, encoder: nn.Module) -> None:
        params = dict(encoder.named_parameters())
        online = [params[n].detach().float() for n in self.trainable]
        torch._foreach_lerp_([self.shadow[n] for n in self.trainable], online, 1.0 - self.decay)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])

    def copy_to(self, encoder: nn.Module) -> None:
        """Load the EMA weights into ``encoder`` (buffers untouched)."""
        with torch.no_grad():
            for n, p in encoder.named_parameters():
                p.copy_(self.shadow[n].to(p.dtype))
