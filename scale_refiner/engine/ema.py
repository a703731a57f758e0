"""EMA of the encoder's trainable parameters, kept in fp32 on each rank's local storage.

Under ZeRO-3 the local storage is the rank's fp32 partition, under FSDP2 its shard, in one process the
parameter itself (``Engine.local_views``): the update is one fused ``_foreach_lerp_`` with no communication,
and equals a full-parameter EMA element by element. Frozen parameters never change, so their EMA is the
parameter. ``ema = decay * ema + (1 - decay) * online`` is ``lerp(ema, online, 1 - decay)``.

Saved as full tensors (``Engine.to_full``) so a checkpoint restores at any world size.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch


class EncoderEMA:
    def __init__(self, engine, decay: float):
        self.engine = engine
        self.decay = decay
        self.shadow: Dict[str, torch.Tensor] = {n: t.detach().float().clone()
                                                for n, t in engine.local_views().items()}
        # the shadow tensors are only ever updated in place (lerp_, copy_): their list is built once
        self._names = list(self.shadow)
        self._shadow_list = [self.shadow[n] for n in self._names]

    @torch.no_grad()
    def update(self) -> None:
        views = self.engine.local_views()
        online = [views[n] for n in self._names]
        if any(t.dtype != torch.float32 for t in online):  # fp32 storage everywhere today: no conversion
            online = [t.float() for t in online]
        torch._foreach_lerp_(self._shadow_list, online, 1.0 - self.decay)

    def full_state(self) -> Dict[str, torch.Tensor]:
        """Full fp32 CPU tensors of the trainable parameters' EMA (collective)."""
        return {n: self.engine.to_full(n, t).float().cpu() for n, t in self.shadow.items()}

    def load_full_state(self, state: Dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"the checkpoint's EMA lacks {sorted(missing)}")
        for n in self.shadow:
            self.shadow[n].copy_(self.engine.to_local(n, state[n].to(self.shadow[n].device)))

    def encoder_state(self, refiner_state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """The full encoder state dict with the EMA in place of the trainable parameters (collective).
        ``refiner_state``: an ``Engine.full_state()`` already gathered, to avoid gathering it again."""
        if refiner_state is None:
            state = self.engine.encoder_state()
        else:
            state = {k[len("encoder."):]: v for k, v in refiner_state.items() if k.startswith("encoder.")}
        state.update(self.full_state())
        return state
