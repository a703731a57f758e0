"""DeepSpeed ZeRO engine (stage 3 by default, 2 selectable through the JSON in ds_configs/).

What the JSON holds is the user's (stage, buckets, offload); what the recipe decides is filled in here:
micro-batch per rank, no gradient accumulation, bf16 on or off, gradient clipping. The optimiser is our
torch AdamW over the explicit parameter groups (layer-wise lr decay, weight-decay rules), wrapped by ZeRO.

Frozen parameters are partitioned too but get no optimiser state; DeepSpeed's checkpoint restores only what
its optimiser owns, so frozen weights and every rank's buffers (BN statistics, queues) are saved beside it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from scale_refiner.engine.base import Engine
from scale_refiner.engine.base import cpu_state_copy
from scale_refiner.engine.checkpoint import atomic_save


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} (config key 'engine.zero_config') does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (2, 3):
        raise ValueError(f"DeepSpeed config {path}: zero_optimization.stage is {stage!r}; use 2 or 3")
    return config


class ZeroEngine(Engine):
    kind = "deepspeed"

    def __init__(self, model, groups, betas, ctx, dtype, ds_config: dict, micro_batch: int,
                 clip_grad: Optional[float] = None):
        import deepspeed

        super().__init__(model, groups, betas, ctx, dtype)
        config = dict(ds_config)
        config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1,
                      gradient_clipping=float(clip_grad or 0.0))
        config["bf16"] = {"enabled": dtype == torch.bfloat16}
        config.pop("fp16", None)
        self.stage = config["zero_optimization"]["stage"]
        # Plain lists of tensors and scalars only: ZeRO rebuilds its own groups from these.
        optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "param_names"} for g in groups],
                                      lr=0.0, betas=tuple(betas))
        model.to(ctx.device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self._encoder_params = dict(model.encoder.named_parameters())

    @property
    def module(self) -> nn.Module:
        return self.engine

    @property
    def param_groups(self) -> List[Dict]:
        return self.optimizer.param_groups

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self, clip_grad):  # clipping is DeepSpeed's (gradient_clipping in the config)
        self.engine.step()
        # DeepSpeed has already waited for this norm inside step() (its overflow check calls bool() on it), so
        # float() here adds no host sync of ours.
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------------------------------- EMA support
    def local_views(self):
        from deepspeed.utils import safe_get_local_fp32_param
        views = {}
        for name in self.trainable_encoder:
            param = self._encoder_params[name]
            if self.stage == 3:
                views[name] = safe_get_local_fp32_param(param)
            else:
                # ZeRO-2 keeps full parameters on every rank (fp32 on the CPU; on a GPU the bf16 copy, so the
                # EMA there sees bf16-rounded weights).
                views[name] = param.detach()
        return views

    def to_full(self, name, local):
        if self.stage != 3:
            return local
        param = self._encoder_params[name]
        world = dist.get_world_size()
        flat = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(flat, local.contiguous())
        return flat[: param.ds_numel].view(param.ds_shape)

    def to_local(self, name, full):
        if self.stage != 3:
            return full
        param = self._encoder_params[name]
        part = param.ds_tensor.numel()
        flat = torch.zeros(part * dist.get_world_size(), dtype=full.dtype, device=full.device)
        flat[: full.numel()] = full.reshape(-1)
        return flat[dist.get_rank() * part: (dist.get_rank() + 1) * part]

    def full_state(self):
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
            return cpu_state_copy(self.model.state_dict())

    # -------------------------------------------------------------------------------------- checkpoints
    def save(self, directory: Path) -> None:
        import deepspeed
        directory = Path(directory)
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)
        frozen = [(n, p) for n, p in self.model.named_parameters() if not p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=None):
            if self.ctx.is_main:
                atomic_save({n: p.detach().cpu().clone() for n, p in frozen}, directory / "frozen_params.pt")
        atomic_save({n: b.detach().cpu() for n, b in self.model.named_buffers()},
                    directory / f"buffers_rank{self.ctx.rank}.pt")

    def load(self, directory: Path) -> None:
        import deepspeed
        directory = Path(directory)
        path, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")
        frozen_state = torch.load(directory / "frozen_params.pt", map_location="cpu", weights_only=True)
        frozen = [(n, p) for n, p in self.model.named_parameters() if not p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=0):
            if self.ctx.is_main:
                with torch.no_grad():
                    for n, p in frozen:
                        p.copy_(frozen_state[n])
        buffers_file = directory / f"buffers_rank{self.ctx.rank}.pt"
        if not buffers_file.is_file():  # resumed at a larger world size: take rank 0's statistics
            buffers_file = directory / "buffers_rank0.pt"
        buffers = torch.load(buffers_file, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                b.copy_(buffers[n])
