"""One small interface over the single-process, DeepSpeed ZeRO and FSDP2 engines.

The model is a ``MIMRefiner`` (refinement) or an ``MAEPretrainer`` (pre-training): an ``encoder`` (our ViT),
the rest of the trainable model, and a forward that returns ``(loss, metrics)``. The stage loop
(engine/trainer.py) sees only this: forward, backward, step, the local fp32 storage of the
trainable encoder parameters (for the EMA), conversions between that local layout and full tensors (to save
the EMA as full tensors and restore it at any world size), the full encoder state (for export), and sharded
save / load of model and optimiser.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from scale_refiner.engine.distributed import DistContext


def cpu_state_copy(state: Dict) -> Dict:
    """fp32 CPU copies of floating tensors (others copied as they are): a state that outlives the engine."""
    def copy(v):
        if not torch.is_tensor(v):
            return v
        v = v.detach().cpu().clone()
        return v.float() if v.is_floating_point() else v
    return {k: copy(v) for k, v in state.items()}


class Engine(ABC):
    kind: str = "?"

    def __init__(self, model: nn.Module, groups: List[Dict], betas, ctx: DistContext, dtype: torch.dtype,
                 accumulation: int = 1):
        self.model = model  # unwrapped, for attribute access (encoder, heads, queues)
        self.ctx = ctx
        self.dtype = dtype
        # micro-batches per optimiser step: ``backward`` is called once per micro-batch, ``step`` once after
        # the last, and the gradient stepped is the mean of the micro-batches' gradients
        self.accumulation = accumulation
        self.trainable_encoder = [n for n, p in model.encoder.named_parameters() if p.requires_grad]

    # -------------------------------------------------------------------------------------------- a step
    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.dtype)

    def forward(self, *inputs, **kwargs) -> Tuple[torch.Tensor, Dict]:
        """The model's forward (through the engine's wrapper) under autocast, given the process group."""
        with self.autocast():
            return self.module(*inputs, group=self.ctx.group, **kwargs)

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The callable (wrapped) model."""

    @property
    @abstractmethod
    def param_groups(self) -> List[Dict]:
        """The optimiser's groups, each with its ``lr_scale``."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, accumulating ``1 / accumulation`` of its gradient."""

    @abstractmethod
    def step(self, clip_grad: Optional[float]):
        """Clip (when set), optimiser step, zero gradients; returns the gradient norm before clipping (a float
        or a 0-d tensor, which the stage loop reads only on the steps it logs: no host sync on the others)."""

    def discard_gradients(self) -> None:
        """Drop the gradients of a step that will not be taken (a batch-size probe that ran out of memory)."""
        try:
            self.optimizer.zero_grad(set_to_none=True)
        except TypeError:  # DeepSpeed's ZeRO optimisers take no set_to_none
            self.optimizer.zero_grad()

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr * group["lr_scale"]

    # ------------------------------------------------------------------------------ EMA / export support
    @abstractmethod
    def local_views(self) -> Dict[str, torch.Tensor]:
        """name -> this rank's fp32 storage of each trainable encoder parameter (full tensor, ZeRO partition or
        FSDP shard), as updated in place by ``step``."""

    @abstractmethod
    def to_full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """Assemble the full tensor of parameter ``name`` from tensors laid out like ``local_views()[name]``
        (collective: every rank calls it)."""

    @abstractmethod
    def to_local(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full tensor of parameter ``name``, laid out like ``local_views()[name]``."""

    @abstractmethod
    def full_state(self) -> Dict[str, torch.Tensor]:
        """The model's full state dict (parameters gathered, this rank's buffers and queues), fp32 CPU, on
        every rank (collective). What the next stage, an export or an evaluation starts from."""

    def stage_end_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """What a stage's end checkpoint (``model_state.pt``), the next stage and the exports start from, fp32 CPU
        (collective). Here the full state on every rank; the sharded engines gather it to rank 0 only (None on
        the others, which hand their part on with ``hand_off``)."""
        return self.full_state()

    @property
    def can_hand_off(self) -> bool:
        """Whether the next stage takes its weights from this engine by ``hand_off`` (sharded, no full copy)
        rather than from ``stage_end_state``."""
        return False

    def hand_off(self, model: nn.Module) -> None:
        """Give ``model``, the next stage's model built partitioned alike, this engine's weights part by part."""
        raise RuntimeError(f"engine {self.kind} hands a stage on through its end state, not hand_off")

    def close(self) -> None:
        """Let go of the model so that it is freed with this engine (before the next stage's engine is built);
        the engine is unusable afterwards. Nothing to do where nothing outside the engine holds the model."""

    def encoder_state(self) -> Dict[str, torch.Tensor]:
        """The encoder's full state dict (fp32, CPU) on every rank (collective)."""
        return {k[len("encoder."):]: v for k, v in self.full_state().items() if k.startswith("encoder.")}

    # -------------------------------------------------------------------------------------- checkpoints
    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write model and optimiser state into ``directory`` (collective; sharded where the engine shards)."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what ``save`` wrote (collective)."""
