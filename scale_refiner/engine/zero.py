"""DeepSpeed ZeRO engine (stage 3 by default, 2 selectable through the JSON in ds_configs/).

What the JSON holds is the user's (stage, buckets, offload); what the recipe decides is filled in here:
micro-batch per rank, gradient accumulation steps, bf16 on or off, the gradient reduce dtype, gradient
clipping. The optimiser is AdamW over the explicit parameter groups (layer-wise lr decay, weight-decay
rules), wrapped by ZeRO: torch's, or DeepSpeed's CPU Adam (AdamW mode) when the JSON offloads the optimiser,
since ZeRO-Offload refuses any other optimiser on the CPU.

Precision under bf16: DeepSpeed holds every parameter as a bf16 compute copy and keeps fp32 master weights
only for what its optimiser owns. So that nothing leaves this engine bf16-rounded:
- trainable parameters are read from the fp32 master partitions (``local_views``, ``full_state``);
- frozen parameters (the frozen prefix, the whole encoder in the heads stage) have no master: their fp32
  values are kept here, this rank's ZeRO-3 partition of each (all of it under ZeRO-2), on the host, and
  ``full_state`` / checkpoints gather those;
- buffers (BN statistics, queues) stay fp32: DeepSpeed casts parameters only.
Gradients are reduced in ``reduce_dtype`` (fp32 by default: DeepSpeed's ``communication_data_type``).

Frozen parameters are partitioned too but get no optimiser state; DeepSpeed's checkpoint restores only what
its optimiser owns, so frozen weights and every rank's buffers (BN statistics, queues) are saved beside it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from scale_refiner.engine.base import Engine
from scale_refiner.engine.base import cpu_state_copy
from scale_refiner.engine.checkpoint import atomic_save, refuse_unsafe_pickles
from scale_refiner.engine.optim import adamw
from scale_refiner.partition import fill_partition, is_partitioned, partition_range, zero_init  # noqa: F401

log = logging.getLogger("scale_refiner")


def optimizer_offload_device(ds_config: dict) -> str:
    """``zero_optimization.offload_optimizer.device`` of the JSON (``none`` when unset)."""
    return ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")


def offloads_optimizer(ds_config: dict) -> bool:
    return optimizer_offload_device(ds_config) in ("cpu", "nvme")


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


def check_hpz(ds_config: dict, world: int) -> int:
    """ZeRO++ hierarchical partitioning (``zero_optimization.zero_hpz_partition_size``, the ranks of one node):
    besides its 1/W partition each rank keeps a secondary partition of every parameter, 1/H of it, among the H
    ranks of its node, so the backward's all-gathers stay inside the node. H must divide the world into nodes
    (DeepSpeed asserts that with a bare message); stage 3 only. Returns H (1: off)."""
    from scale_refiner.config import ConfigError
    zero = ds_config.get("zero_optimization", {})
    hpz = int(zero.get("zero_hpz_partition_size", 1) or 1)
    if hpz > 1 and zero.get("stage") != 3:
        raise ConfigError(f"config key 'engine.zero_config': zero_optimization.zero_hpz_partition_size={hpz} is a "
                          f"ZeRO-3 option (stage is {zero.get('stage')})")
    if hpz > 1 and world % hpz:
        raise ConfigError(f"config key 'engine.zero_config': zero_optimization.zero_hpz_partition_size={hpz} (ranks "
                          f"per node) does not divide the world size {world}")
    return hpz


def largest_unit_numel(model: nn.Module) -> int:
    """Elements of the model's largest shard unit (an encoder block, an ID head, an MAE decoder block): the
    parameters one prefetch must bring for the next module to start at once. Counted from ``ds_numel`` under
    ``zero_init``, where a parameter's own storage is its partition."""
    def numel(p):
        return int(getattr(p, "ds_numel", p.numel()))
    return max((sum(numel(p) for p in unit.parameters()) for unit in model.shard_units()), default=0)


def ensure_prefetch_bucket(config: dict, model: nn.Module) -> Optional[tuple]:
    """ZeRO-3 prefetches the parameters of the modules about to run until ``stage3_prefetch_bucket_size``
    elements are in flight. A bucket smaller than one block fetches the next block in part, and the rest is
    gathered on demand when that block starts, in the critical path: our JSON's 5e7 is below one ViT-2B block
    (78.7 M). The bucket is raised here, in ``config`` (stage 3 only), to the largest shard unit of ``model``;
    a larger value is the user's and is kept. Returns ``(old, new)`` when it raised it, else None."""
    zero = config.get("zero_optimization", {})
    if zero.get("stage") != 3:
        return None
    need = largest_unit_numel(model)
    old = zero.get("stage3_prefetch_bucket_size", 5e7)  # DeepSpeed's default
    if isinstance(old, (int, float)) and old >= need:
        return None
    config["zero_optimization"] = dict(zero, stage3_prefetch_bucket_size=int(need))
    return old, int(need)


# ------------------------------------------------------------------ building partitioned, loading by partition
def zero3_config(cfg) -> Optional[dict]:
    """The DeepSpeed JSON of ``cfg`` when its engine is ZeRO-3 (``engine.kind=deepspeed``, stage 3), else None:
    the case where the model is built partitioned (``zero_init``) and loaded partition by partition."""
    if cfg.engine.kind != "deepspeed":
        return None
    config = load_ds_config(cfg.engine.zero_config)
    return config if config["zero_optimization"]["stage"] == 3 else None


def load_state_partitioned(model: nn.Module, state: Mapping, strict: bool = True):
    """``model.load_state_dict(state)`` for a model built under ``zero_init``: each partitioned parameter reads
    only its partition from its value (a tensor, e.g. memory-mapped, or a ``models.weights.TensorSource``), so no
    rank holds a full parameter; buffers and extra state are loaded as they are. Returns ``(missing,
    unexpected)``; with ``strict`` either raises."""
    from scale_refiner.models.weights import TensorSource, TensorView
    params = dict(model.named_parameters())
    rest, filled = {}, set()
    for key, value in state.items():
        param = params.get(key)
        if param is not None and is_partitioned(param):
            source = value if isinstance(value, TensorSource) else TensorView(value)
            if tuple(source.shape) != tuple(param.ds_shape):
                raise RuntimeError(f"size mismatch for {key}: copying a param with shape {tuple(source.shape)}, the "
                                   f"shape in the model is {tuple(param.ds_shape)}")
            fill_partition(param, source.flat)
            filled.add(key)
        else:
            rest[key] = value.full() if isinstance(value, TensorSource) else value
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k not in filled]
    if strict and (missing or unexpected):
        raise RuntimeError(f"state does not match the model: missing {missing}, unexpected {unexpected}")
    return missing, unexpected


def _all_gather_flat(local: torch.Tensor, group=None) -> torch.Tensor:
    world = dist.get_world_size(group)
    flat = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(flat, local.contiguous(), group=group)
    return flat


def gather_partitioned_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The full state dict of a ``zero_init`` model on every rank (collective), one parameter gathered at a time;
    fp32 CPU. A full copy per rank: for what needs the whole model on every rank (the k-NN of a randomly
    initialised encoder)."""
    params = dict(model.named_parameters())
    state = {}
    for key, value in model.state_dict().items():
        param = params.get(key)
        if param is not None and is_partitioned(param):
            flat = _all_gather_flat(param.ds_tensor.detach(), param.ds_process_group)
            value = flat[: param.ds_numel].view(param.ds_shape)
        state.update(cpu_state_copy({key: value}))
    return state


def _deepspeed_checkpoint_types() -> list:
    """The classes DeepSpeed's optimiser-state files hold besides tensors and plain values (ZeRO-2/3, fp32 and
    bf16; found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on the files it writes)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class ZeroEngine(Engine):
    kind = "deepspeed"

    def __init__(self, model, groups, betas, ctx, dtype, ds_config: dict, micro_batch: int,
                 clip_grad: Optional[float] = None, accumulation: int = 1,
                 reduce_dtype: torch.dtype = torch.float32, optimizer_impl: str = "auto"):
        import deepspeed

        super().__init__(model, groups, betas, ctx, dtype, accumulation)
        config = dict(ds_config)
        config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=accumulation,
                      train_batch_size=micro_batch * accumulation * ctx.world,
                      gradient_clipping=float(clip_grad or 0.0))
        config["bf16"] = {"enabled": dtype == torch.bfloat16}
        config.pop("fp16", None)
        if dtype != torch.float32:
            config["communication_data_type"] = {torch.float32: "fp32", torch.bfloat16: "bf16"}[reduce_dtype]
        self.stage = config["zero_optimization"]["stage"]
        check_hpz(config, ctx.world)
        raised = ensure_prefetch_bucket(config, model)
        if raised is not None and ctx.is_main:
            log.info("zero_optimization.stage3_prefetch_bucket_size raised from %s to %d elements, the largest "
                     "block of this model, so that the next block is prefetched whole", raised[0], raised[1])
        # Plain lists of tensors and scalars only: ZeRO rebuilds its own groups from these.
        plain_groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
        if offloads_optimizer(config):
            if optimizer_impl != "auto":
                from scale_refiner.config import ConfigError
                raise ConfigError(f"config key 'engine.optimizer_impl': {optimizer_impl} with an offloaded optimiser "
                                  f"(zero_optimization.offload_optimizer.device="
                                  f"{optimizer_offload_device(config)}); ZeRO-Offload steps with DeepSpeed's CPU Adam "
                                  f"only: use auto")
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            optimizer = DeepSpeedCPUAdam(plain_groups, lr=0.0, betas=tuple(betas), adamw_mode=True)
        else:  # torch's AdamW over ZeRO's fp32 partitions (fused on a GPU: engine/optim.py)
            optimizer = adamw(plain_groups, betas, ctx.device, optimizer_impl)
        # bf16 mode casts the model to bf16 and then builds its fp32 masters from the bf16 copy: the loaded
        # weights would be rounded for good. This rank's share of every parameter's fp32 values is taken first
        # (its ZeRO-3 partition, 1/world of the model; the whole tensor under ZeRO-2) and put back below.
        fp32_shares = ({n: self._share_before_init(p) for n, p in model.named_parameters()}
                       if dtype != torch.float32 else {})
        if dtype != torch.float32:
            # Built under zero_init: DeepSpeed leaves such a model's dtype alone, so its fp32 partitions are cast to
            # the compute dtype here, as DeepSpeed casts a plain model (their fp32 values are the shares above).
            for param in model.parameters():
                if is_partitioned(param):
                    param.ds_tensor.data = param.ds_tensor.data.to(dtype)
                    param.data = param.data.to(dtype)
        model.to(ctx.device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self._params = dict(model.named_parameters())
        self._frozen_fp32 = {}  # frozen parameters have no master: their fp32 share is kept here, on the host
        for name, share in fp32_shares.items():
            param = self._params[name]
            if self.stage == 3 and share.numel() != param.ds_tensor.numel():
                raise RuntimeError(f"ZeRO-3 partition of {name}: {param.ds_tensor.numel()} elements, expected "
                                   f"{share.numel()}")
            if param.requires_grad:
                self._set_master(name, share)
            else:
                self._frozen_fp32[name] = share.to("cpu")
        del fp32_shares
        self._micro = 0
        # set by stage_end_state (ZeRO-3): the full state on rank 0, {} on the others (every rank knows it is set)
        self._end_gathered = None  # the stage end's state, kept for the one save that follows it (rank 0)
        self._invalidate_secondary()

    def _invalidate_secondary(self) -> None:
        """Drop ZeRO++ hpZ's secondary (intra-node) partitions, so that each is cut afresh from the primary one at
        its parameter's next gather. DeepSpeed cuts them when it partitions a module, from the values the
        parameter has then: a model built under ``zero_init`` is filled partition by partition afterwards (the
        initialisation, the weights file, the previous stage's hand-off, the fp32 masters set above, a
        checkpoint's frozen weights), which writes the primary partitions only. Stale secondaries would be
        gathered instead of the loaded weights (DeepSpeed itself drops them after each optimiser step, for the
        trainable parameters only)."""
        for param in self.model.parameters():
            if getattr(param, "ds_secondary_tensor", None) is not None:
                param.ds_secondary_tensor = None

    @property
    def module(self) -> nn.Module:
        return self.engine

    @property
    def param_groups(self) -> List[Dict]:
        return self.optimizer.param_groups

    def backward(self, loss):
        # DeepSpeed divides the loss by the accumulation steps itself, and reduces gradients at the boundary;
        # its step() must see every micro-batch (it counts them), and steps the optimiser at the last only.
        self.engine.backward(loss)
        self._micro += 1
        if self._micro < self.accumulation:
            self.engine.step()

    def step(self, clip_grad):  # clipping is DeepSpeed's (gradient_clipping in the config)
        if self._micro != self.accumulation:
            raise RuntimeError(f"step() after {self._micro} of {self.accumulation} micro-batches")
        self._micro = 0
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        # returned as it is (a tensor or a float): the stage loop reads it only on the steps it logs
        return norm if norm is not None else float("nan")

    # --------------------------------------------------------------------- fp32 storage, local <-> full
    def _share_before_init(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's ZeRO-3 partition of ``param`` as DeepSpeed will cut it (ceil(numel / world) elements
        each, zero-padded at the end), fp32 on the host; the whole tensor under ZeRO-2. A parameter built under
        ``zero_init`` already is that partition, in fp32: its storage is taken as it is (no copy), and the
        partition itself gets a cast copy below."""
        if is_partitioned(param):
            if param.ds_tensor.dtype != torch.float32:
                raise RuntimeError("a parameter built under zero.Init holds a non-fp32 partition: build with "
                                   "engine.zero.zero_init, whose partitions are fp32")
            return param.ds_tensor.data
        flat = param.detach().reshape(-1).to("cpu", torch.float32)
        if self.stage != 3:
            return flat.view(param.shape).clone()
        world, rank = self.ctx.world, self.ctx.rank
        part = -(-flat.numel() // world)
        share = torch.zeros(part, dtype=torch.float32)
        piece = flat[rank * part: (rank + 1) * part]
        share[: piece.numel()] = piece
        return share

    def _set_master(self, name: str, share: torch.Tensor) -> None:
        """Overwrite this rank's fp32 master of trainable parameter ``name`` with ``share`` (as cut above)."""
        param = self._params[name]
        if self.stage == 3:
            from deepspeed.utils import safe_set_local_fp32_param
            safe_set_local_fp32_param(param, share.to(self.ctx.device))
            return
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            start, numel = self._fragment_address(name)
            with torch.no_grad():
                mapping.get_hp_fragment().copy_(share.reshape(-1)[start:start + numel])

    def _local_part(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's ZeRO-3 partition of a full tensor of parameter ``name`` (all of it under ZeRO-2)."""
        if self.stage != 3:
            return full
        part = self._params[name].ds_tensor.numel()
        flat = torch.zeros(part * self.ctx.world, dtype=full.dtype, device=full.device)
        flat[: full.numel()] = full.reshape(-1)
        return flat[self.ctx.rank * part: (self.ctx.rank + 1) * part].clone()

    def _gather_partition(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's ZeRO-3 partition (collective)."""
        param = self._params[name]
        local = local.to(self.ctx.device)
        flat = torch.empty(self.ctx.world * local.numel(), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(flat, local.contiguous())
        return flat[: param.ds_numel].view(param.ds_shape)

    def _fragment_address(self, name: str):
        mapping = getattr(self._params[name], "_hp_mapping", None)
        return (0, 0) if mapping is None else (mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)

    def local_views(self):
        views = {}
        for name in self.trainable_encoder:
            param = self._params[f"encoder.{name}"]
            if self.stage == 3:
                from deepspeed.utils import safe_get_local_fp32_param
                views[name] = safe_get_local_fp32_param(param)
            else:
                # ZeRO-2: this rank's fragment of the flat fp32 master (empty when another rank owns it all)
                mapping = getattr(param, "_hp_mapping", None)
                views[name] = (mapping.get_hp_fragment() if mapping is not None
                               else torch.empty(0, dtype=torch.float32, device=self.ctx.device))
        return views

    def to_full(self, name, local):
        key = f"encoder.{name}"
        if self.stage == 3:
            return self._gather_partition(key, local)
        param = self._params[key]
        start, numel = self._fragment_address(key)
        flat = torch.zeros(param.numel(), dtype=local.dtype, device=self.ctx.device)
        flat[start:start + numel] = local.reshape(-1).to(self.ctx.device)
        dist.all_reduce(flat)  # each element lives in exactly one rank's fragment
        return flat.view(param.shape)

    def to_local(self, name, full):
        key = f"encoder.{name}"
        if self.stage == 3:
            return self._local_part(key, full)
        start, numel = self._fragment_address(key)
        return full.reshape(-1)[start:start + numel].clone()

    def full_parameter(self, name: str) -> torch.Tensor:
        """Parameter ``name`` of the model in full, fp32, from the fp32 master (trainable) or the fp32 copy kept
        here (frozen), never from the bf16 compute copy (collective)."""
        param = self._params[name]
        if param.requires_grad:
            from deepspeed.utils import safe_get_full_fp32_param
            return safe_get_full_fp32_param(param).view(param.ds_shape if self.stage == 3 else param.shape)
        if name in self._frozen_fp32:
            local = self._frozen_fp32[name]
            return self._gather_partition(name, local) if self.stage == 3 else local
        if self.stage == 3:  # fp32 run: the partition itself is fp32
            return self._gather_partition(name, param.ds_tensor.detach())
        return param.detach()

    def full_state(self):
        state = {}
        for key, value in self.model.state_dict().items():
            if key in self._params:
                state[key] = self.full_parameter(key).detach().to("cpu", torch.float32, copy=True)
            else:
                state.update(cpu_state_copy({key: value}))
        return state

    # ------------------------------------------------------------------------- ZeRO-3: no full copy per rank
    def _local_fp32(self, name: str) -> torch.Tensor:
        """This rank's fp32 ZeRO-3 partition of parameter ``name`` (flat, padded): the master of a trainable one,
        the copy kept here of a frozen one under bf16, DeepSpeed's own partition in an fp32 run."""
        param = self._params[name]
        if param.requires_grad:
            from deepspeed.utils import safe_get_local_fp32_param
            return safe_get_local_fp32_param(param).reshape(-1)
        if name in self._frozen_fp32:
            return self._frozen_fp32[name].reshape(-1)
        return param.ds_tensor.detach().reshape(-1)

    def _gather_to_main(self, name: str, local: torch.Tensor) -> Optional[torch.Tensor]:
        """The full tensor of parameter ``name`` from every rank's partition ``local``, on rank 0 only (None on the
        others; collective)."""
        param = self._params[name]
        local = local.reshape(-1).to(self.ctx.device).contiguous()
        if not self.ctx.is_main:
            dist.gather(local, None, dst=0)
            return None
        flat = torch.empty(self.ctx.world * local.numel(), dtype=local.dtype, device=local.device)
        dist.gather(local, list(flat.chunk(self.ctx.world)), dst=0)
        return flat[: param.ds_numel].view(param.ds_shape)

    def stage_end_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """What ``model_state.pt`` holds at the end of a stage, fp32 CPU (collective). Under ZeRO-3 gathered to
        rank 0 only, one parameter at a time, and None on the other ranks, which hand their weights on with
        ``hand_off`` instead; under ZeRO-2, where every rank holds the whole model anyway, ``full_state()``."""
        if self.stage != 3:
            return self.full_state()
        state = {} if self.ctx.is_main else None
        for key, value in self.model.state_dict().items():
            if key in self._params:
                full = self._gather_to_main(key, self._local_fp32(key))
                if full is not None:  # fp32 already; a copy only where it comes from a device
                    state[key] = full.to("cpu", torch.float32)
            elif state is not None:
                state.update(cpu_state_copy({key: value}))
        # save() of the stage-end checkpoint, which comes next, takes the frozen weights from this state instead
        # of gathering them again: rank 0 would otherwise hold them twice (the whole encoder in the heads stage)
        self._end_gathered = state if state is not None else {}
        return state

    @property
    def can_hand_off(self) -> bool:
        """Whether the next stage takes its weights by ``hand_off`` (ZeRO-3) rather than from the end state."""
        return self.stage == 3

    @torch.no_grad()
    def hand_off(self, model: nn.Module) -> None:
        """Give ``model`` -- the same model built afresh under ``zero_init`` on the same ranks, hence partitioned
        alike -- this engine's weights, partition by partition, with no communication and no full tensor: the
        fp32 master of each trainable parameter, the fp32 partition of each frozen one; and this rank's buffers
        and extra state (BN statistics, queues), as ``full_state`` would hand them on."""
        if self.stage != 3:
            raise RuntimeError("hand_off moves ZeRO-3 partitions; under ZeRO-2 start from full_state()")
        params = dict(model.named_parameters())
        if params.keys() != self._params.keys():
            raise RuntimeError(f"hand_off: the new model's parameters differ: "
                               f"{sorted(params.keys() ^ self._params.keys())}")
        for name in self._params:
            target, local = params[name], self._local_fp32(name)
            if not is_partitioned(target) or target.ds_tensor.numel() != local.numel():
                raise RuntimeError(f"hand_off: {name} is not partitioned like this engine's (build the model under "
                                   f"engine.zero.zero_init, on the same ranks)")
            target.ds_tensor.copy_(local)
        rest = {k: v for k, v in self.model.state_dict().items() if k not in self._params}
        missing, unexpected = model.load_state_dict(rest, strict=False)
        if unexpected or set(missing) - set(params):
            raise RuntimeError(f"hand_off: buffers do not match: missing {missing}, unexpected {unexpected}")

    def close(self) -> None:
        """Let go of the model, so that it and its partitions are freed with this engine: DeepSpeed keeps the top
        module of every ZeRO-3 engine in a module-level list (``parameter_offload.FWD_MODULE_STACK``) and its hooks
        on it. For the hand-off between stages; the engine is unusable afterwards."""
        self.engine.destroy()
        if self.stage == 3:
            from deepspeed.runtime.zero import parameter_offload
            stack = parameter_offload.FWD_MODULE_STACK
            stack[:] = [m for m in stack if m is not self.model]
        self._end_gathered = None

    # -------------------------------------------------------------------------------------- checkpoints
    def save(self, directory: Path) -> None:
        directory = Path(directory)
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)
        frozen_names = [n for n, p in self._params.items() if not p.requires_grad]
        if self.stage == 3 and self._end_gathered is not None:  # the stage end: rank 0 holds them already
            frozen = {n: self._end_gathered[n] for n in frozen_names} if self.ctx.is_main else {}
            self._end_gathered = None  # used once: the caller's reference is the only one left
        elif self.stage == 3:  # gathered to rank 0 only, one at a time (for the heads stage: the whole encoder)
            frozen = {}
            for n in frozen_names:
                full = self._gather_to_main(n, self._local_fp32(n))
                if full is not None:
                    frozen[n] = full.to("cpu")
        else:
            frozen = {n: self.full_parameter(n).detach().to("cpu", copy=True) for n in frozen_names}
        if self.ctx.is_main:
            atomic_save(frozen, directory / "frozen_params.pt")
        atomic_save({n: b.detach().cpu() for n, b in self.model.named_buffers()},
                    directory / f"buffers_rank{self.ctx.rank}.pt")

    def load(self, directory: Path) -> None:
        import deepspeed
        directory = Path(directory)
        # DeepSpeed unpickles its files with weights_only=False: each is first proved to hold only weights,
        # plain values and the few DeepSpeed types its optimiser states carry
        refuse_unsafe_pickles(sorted(directory.glob("*.pt")), _deepspeed_checkpoint_types())
        path, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")
        # mapped: each rank reads its partitions of the frozen weights, the ranks of a node one page-cache copy
        frozen_state = torch.load(directory / "frozen_params.pt", map_location="cpu", weights_only=True, mmap=True)
        frozen = [(n, p) for n, p in self._params.items() if not p.requires_grad]
        if self.stage == 3:
            for n, p in frozen:
                flat = frozen_state[n].reshape(-1)
                if n in self._frozen_fp32:  # bf16: the fp32 partition kept here, and its cast in DeepSpeed's
                    share = torch.zeros_like(self._frozen_fp32[n])
                    start, stop, _ = partition_range(p)
                    share[: stop - start] = flat[start:stop]
                    self._frozen_fp32[n] = share
                fill_partition(p, lambda a, b: flat[a:b])
            self._load_buffers(directory)
            self._invalidate_secondary()
            return
        with deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=0):
            if self.ctx.is_main:
                with torch.no_grad():
                    for n, p in frozen:
                        p.copy_(frozen_state[n])
        for n in self._frozen_fp32:
            self._frozen_fp32[n] = self._local_part(n, frozen_state[n].float())
        self._load_buffers(directory)

    def _load_buffers(self, directory: Path) -> None:
        buffers = torch.load(directory / f"buffers_rank{self.ctx.rank}.pt", map_location="cpu", weights_only=True)
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                b.copy_(buffers[n])
