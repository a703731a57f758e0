"""Single-process engine: AdamW over the parameter groups (``engine.optimizer_impl``'s kernel), the model as it is."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from scale_refiner.engine.base import Engine, cpu_state_copy
from scale_refiner.engine.checkpoint import atomic_save
from scale_refiner.engine.optim import adamw


class SingleEngine(Engine):
    kind = "single"

    def __init__(self, model, groups, betas, ctx, dtype, accumulation: int = 1, optimizer_impl: str = "auto"):
        super().__init__(model, groups, betas, ctx, dtype, accumulation)
        if ctx.world > 1:
            raise ValueError("engine.kind=single runs in one process; launched with "
                             f"{ctx.world} ranks use engine.kind=deepspeed or fsdp2")
        self.optimizer = adamw(groups, betas, ctx.device, optimizer_impl)
        self.trainable = [p for g in groups for p in g["params"]]

    @property
    def module(self) -> nn.Module:
        return self.model

    @property
    def param_groups(self) -> List[Dict]:
        return self.optimizer.param_groups

    def backward(self, loss):
        (loss / self.accumulation if self.accumulation > 1 else loss).backward()

    def step(self, clip_grad: Optional[float]) -> torch.Tensor:
        if clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip_grad)
        else:  # the norm only, for the log: no multiply of every gradient by 1
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm  # a tensor: read (a host sync on a GPU) only when the loop logs it

    def local_views(self):
        params = dict(self.model.encoder.named_parameters())
        return {n: params[n].detach() for n in self.trainable_encoder}

    def to_full(self, name, local):
        return local

    def to_local(self, name, full):
        return full

    def full_state(self):
        return cpu_state_copy(self.model.state_dict())

    def save(self, directory: Path) -> None:
        atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                    Path(directory) / "engine.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(Path(directory) / "engine.pt", map_location=self.ctx.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
