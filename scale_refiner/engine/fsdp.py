"""FSDP2 engine: every unit of ``model.shard_units()`` (each encoder block and each ID head; for MAE each
encoder and decoder block) is its own ``fully_shard`` unit, the root takes the rest.

Each unit's parameters are gathered just before it runs and freed after it, so a rank holds its shards plus
about one block's full parameters. Parameters become DTensors sharded on dim 0 over a 1-D mesh of all ranks
(uneven shards allowed: a rank may hold an empty shard); buffers (BN running statistics, the NN queues) are
not sharded and stay replicated, which the refiner keeps consistent itself (global-batch BN, gathered
enqueue). Frozen parameters are sharded too but left out of the optimiser, so they never change and carry no
optimiser state; the model runs the frozen prefix under ``no_grad``, so they get no gradient either.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from scale_refiner.engine.base import Engine, cpu_state_copy


class FSDPEngine(Engine):
    kind = "fsdp2"

    def __init__(self, model, groups, betas, ctx, dtype, accumulation: int = 1,
                 reduce_dtype: torch.dtype = torch.float32):
        super().__init__(model, groups, betas, ctx, dtype, accumulation)  # trainable encoder names, pre-sharding
        model.to(ctx.device)
        self.mesh = init_device_mesh(ctx.device.type, (ctx.world,))
        # Compute in ``dtype`` (bf16 on GPU), reduce gradients in ``reduce_dtype`` (fp32 unless configured);
        # the shards themselves, frozen ones included, stay fp32, and buffers are never cast. The heads' norms
        # cast their bf16 affine copies back up (heads/norms.py).
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce_dtype)
        for unit in model.shard_units():
            fully_shard(unit, mesh=self.mesh, mp_policy=policy)
        fully_shard(model, mesh=self.mesh, mp_policy=policy)

        # fully_shard replaced every parameter by a DTensor: rebuild the same groups from the new objects.
        params = dict(model.named_parameters())
        sharded_groups = [{**{k: v for k, v in g.items() if k != "params"},
                           "params": [params[n] for n in g["param_names"]]} for g in groups]
        self.optimizer = torch.optim.AdamW(sharded_groups, lr=0.0, betas=tuple(betas),
                                           foreach=ctx.device.type == "cuda")
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        encoder_params = dict(model.encoder.named_parameters())
        self._encoder_params = {n: encoder_params[n] for n in self.trainable_encoder}

    @property
    def module(self) -> nn.Module:
        return self.model  # fully_shard works in place: the model *is* the sharded root

    @property
    def param_groups(self) -> List[Dict]:
        return self.optimizer.param_groups

    def backward(self, loss):
        # FSDP2 reduce-scatters (mean over ranks) each unit's gradients as its backward ends, and adds them to
        # the sharded gradients of earlier micro-batches: with accumulation every micro-batch is reduced (no
        # set_requires_gradient_sync(False)), which keeps gradients sharded, the memory accumulation is for.
        (loss / self.accumulation if self.accumulation > 1 else loss).backward()

    def step(self, clip_grad: Optional[float]) -> torch.Tensor:
        # DTensor-aware: the norm of the sharded gradients is reduced over ranks, so every rank clips alike.
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip_grad or float("inf"))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm  # read only when logged

    # ------------------------------------------------------------------------------ EMA / export support
    def local_views(self) -> Dict[str, torch.Tensor]:
        # Looked up on every call: FSDP2's lazy init (first forward) may re-point a parameter's local tensor.
        return {n: p.detach().to_local() for n, p in self._encoder_params.items()}

    def to_full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        p = self._encoder_params[name]
        # Explicit global shape and stride: shards may be uneven (or empty), which from_local cannot infer.
        return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape,
                                  stride=p.stride()).full_tensor()

    def to_local(self, name: str, full: torch.Tensor) -> torch.Tensor:
        p = self._encoder_params[name]
        # src_data_rank=None: every rank cuts its own chunk out of its own copy, no communication; DTensor's
        # Shard chunking is FSDP2's, so the result is laid out like local_views()[name].
        return distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()

    def full_state(self) -> Dict[str, torch.Tensor]:
        # Parameters are DTensors, gathered here one at a time (collective) so that only one full tensor is on
        # the device at once; buffers and the queues' extra state are plain, this rank's own. Keys are those of
        # an unsharded refiner (fully_shard adds no prefixes).
        state = {}
        for key, value in self.model.state_dict().items():
            state.update(cpu_state_copy({key: value.full_tensor() if isinstance(value, DTensor) else value}))
        return state

    # -------------------------------------------------------------------------------------- checkpoints
    def _dcp_state(self) -> Dict:
        # Model state includes the queues' ``_extra_state`` (a dict holding the generator's ByteTensor):
        # get_state_dict keeps it, DCP flattens the dict and saves the tensor, and set_state_dict hands it back
        # to ``set_extra_state``, so the queues resume picking the same neighbours. Plain buffers are saved once
        # (DCP dedups replicated tensors): right for syncbn and the queues; per-rank BN statistics (plain bn)
        # come back from the caller's per-rank client state.
        model, optimizer = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optimizer": optimizer}

    def save(self, directory: Path) -> None:
        dcp.save(self._dcp_state(), checkpoint_id=str(directory))  # each rank writes its shards

    def load(self, directory: Path) -> None:
        state = self._dcp_state()  # the layout to load into (this rank's shards)
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
