"""FSDP2 engine: every unit of ``model.shard_units()`` (each encoder block and each ID head; for MAE each
encoder and decoder block) is its own ``fully_shard`` unit, the root takes the rest.

Each unit's parameters are gathered just before it runs and freed after it, so a rank holds its shards plus
about one block's full parameters. Parameters become DTensors sharded on dim 0 over a 1-D mesh of all ranks
(uneven shards allowed: a rank may hold an empty shard); buffers (BN running statistics, the NN queues) are
not sharded and stay replicated, which the refiner keeps consistent itself (global-batch BN, gathered
enqueue). Frozen parameters are sharded too but left out of the optimiser, so they never change and carry no
optimiser state; the model runs the frozen prefix under ``no_grad``, so they get no gradient either.

Hybrid sharding (``engine.fsdp_replicate`` R > 1, HSDP): the mesh is 2-D, (R, W / R); each parameter is sharded
over the W / R ranks of its row (one node) and replicated over the R rows, so gathers stay inside a node and the
gradients, reduce-scattered inside the node, are all-reduced across nodes (``fully_shard`` does both from the
mesh). A rank holds R / W of the model instead of 1 / W.

Replicated frozen prefix (``engine.replicate_frozen``): the encoder's frozen parameters (patch embed, cls, pos, the
first ``model.freeze_blocks`` blocks; the whole encoder in the heads stage) are left out of ``fully_shard``
(``ignored_params``) and held whole on every rank in the compute dtype, so they are never all-gathered. Under
bf16 their fp32 values stay exact: this rank's rows of each (cut as a shard would be) are kept on the host and
gathered for the full state, the stage end and checkpoints (``frozen_params.pt``, beside DCP's files).

An encoder built on the meta device (``build_refiner(partitioned=True)``) is sharded as it is and then given
storage for this rank's shards only, each filled with its rows of the encoder's pending weights (the weights
file memory-mapped, a checkpoint, or the previous stage's shards, ``hand_off``): no rank holds it whole. The
stage end gathers ``model_state.pt`` to rank 0 only (``stage_end_state``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from scale_refiner.engine.base import Engine, cpu_state_copy
from scale_refiner.engine.checkpoint import CheckpointError, atomic_save, refuse_unsafe_pickle
from scale_refiner.engine.distributed import SHARD_DIM, data_parallel_mesh
from scale_refiner.engine.optim import adamw

FROZEN_FILE = "frozen_params.pt"  # the replicated frozen prefix, fp32, beside DCP's files


class FSDPEngine(Engine):
    kind = "fsdp2"

    def __init__(self, model, groups, betas, ctx, dtype, accumulation: int = 1,
                 reduce_dtype: torch.dtype = torch.float32, replicate: int = 1, replicate_frozen: bool = False,
                 optimizer_impl: str = "auto"):
        super().__init__(model, groups, betas, ctx, dtype, accumulation)  # trainable encoder names, pre-sharding
        # An encoder built on the meta device (build_refiner(partitioned=True)) is sharded as it is, and only then
        # materialised, each rank its own shards, read from its pending weights: no rank holds it whole
        meta = any(p.is_meta for p in model.encoder.parameters())
        if meta:
            model._apply(lambda t: t if t.is_meta else t.to(ctx.device))
        else:
            model.to(ctx.device)
        self.mesh = data_parallel_mesh(ctx.device.type, ctx.world, replicate)
        # where this rank sits in its shard group: the rows of a parameter it holds, whom it gathers from
        self.shard_rank = self.mesh.get_local_rank(SHARD_DIM)
        self.shard_size = self.mesh.size(self.mesh.mesh_dim_names.index(SHARD_DIM))
        self.shard_group = self.mesh.get_group(SHARD_DIM)
        # the frozen encoder parameters kept whole (engine.replicate_frozen), by state-dict key
        self._replicated: Dict[str, nn.Parameter] = (
            {f"encoder.{n}": p for n, p in model.encoder.named_parameters() if not p.requires_grad}
            if replicate_frozen else {})
        ignored = set(self._replicated.values()) or None
        # Compute in ``dtype`` (bf16 on GPU), reduce gradients in ``reduce_dtype`` (fp32 unless configured);
        # the shards themselves, frozen ones included, stay fp32, and buffers are never cast. The heads' norms
        # cast their bf16 affine copies back up (heads/norms.py).
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce_dtype)
        for unit in model.shard_units():
            if ignored and all(p in ignored for p in unit.parameters()):
                continue  # a frozen block held whole: nothing of it to shard, no unit (no hooks, no gathers)
            fully_shard(unit, mesh=self.mesh, mp_policy=policy, ignored_params=ignored)
        fully_shard(model, mesh=self.mesh, mp_policy=policy, ignored_params=ignored)
        if meta:
            self._materialise(model.encoder)
            # to_empty gave the replicated (plain) parameters new Parameter objects: look them up again
            encoder_params = dict(model.named_parameters())
            self._replicated = {key: encoder_params[key] for key in self._replicated}
        self._frozen_fp32: Dict[str, torch.Tensor] = {}  # under bf16: this rank's fp32 rows of each, on the host
        self._cast_replicated()

        # fully_shard replaced every parameter by a DTensor: rebuild the same groups from the new objects.
        params = dict(model.named_parameters())
        sharded_groups = [{**{k: v for k, v in g.items() if k != "params"},
                           "params": [params[n] for n in g["param_names"]]} for g in groups]
        self.optimizer = adamw(sharded_groups, betas, ctx.device, optimizer_impl)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        encoder_params = dict(model.encoder.named_parameters())
        self._encoder_params = {n: encoder_params[n] for n in self.trainable_encoder}

    def _shard_rows(self, param) -> tuple:
        """``(start, stop)``: the rows (dim 0) of ``param`` this rank's shard holds, as FSDP2 cuts them
        (``torch.chunk``: ceil(rows / world) each, the last ones shorter or empty)."""
        rows = param.shape[0]
        size = -(-rows // self.shard_size)
        start = min(self.shard_rank * size, rows)
        return start, min(start + size, rows)

    @torch.no_grad()
    def _materialise(self, encoder: nn.Module) -> None:
        """Give the sharded meta encoder its storage, this rank's shards only, and fill each shard with its rows
        of ``encoder.pending_weights`` (lazy sources: the memory-mapped weights file, a checkpoint, the previous
        engine's shards)."""
        sources = getattr(encoder, "pending_weights", None)
        if sources is None:
            raise RuntimeError("the encoder was built on the meta device with no weights to fill it: build it with "
                               "a weights file, or give it the previous stage's (FSDPEngine.hand_off) or a "
                               "checkpoint's (refiner.load_refiner_state)")
        if next(encoder.buffers(), None) is not None:  # to_empty would leave them uninitialised
            raise RuntimeError("a meta-built encoder with buffers: give them values before sharding")
        encoder.to_empty(device=self.ctx.device)
        for name, param in encoder.named_parameters():
            if f"encoder.{name}" in self._replicated:  # held whole: the full tensor (cast by _cast_replicated)
                param.copy_(sources[name].full())
                continue
            local = param.to_local()  # under no_grad: the shard itself
            start, stop = self._shard_rows(param)
            if local.shape[0] != stop - start:
                raise RuntimeError(f"{name}: a shard of {local.shape[0]} rows, expected rows {start}..{stop}")
            local.copy_(sources[name].rows(start, stop))
        encoder.pending_weights = None

    @torch.no_grad()
    def _cast_replicated(self) -> None:
        """The replicated frozen parameters in the compute dtype (rounded once, here), their fp32 rows kept."""
        if self.dtype == torch.float32:
            return  # the parameters themselves hold the fp32 values
        for key, param in self._replicated.items():
            start, stop = self._shard_rows(param)
            self._frozen_fp32[key] = param.detach()[start:stop].to("cpu", torch.float32, copy=True)
            param.data = param.data.to(self.dtype)

    def _rows_to_main(self, local: torch.Tensor, shape) -> Optional[torch.Tensor]:
        """The full tensor of ``shape`` from every shard rank's rows ``local``, on rank 0 only (None elsewhere).
        Only rank 0's shard group takes part: under HSDP every other replica holds the same rows."""
        if self.mesh.ndim == 2 and self.mesh.get_coordinate()[0] != 0:
            return None  # another replica: rank 0's shard group has the same rows
        padded = _padded_rows(local.detach(), shape, self.shard_size, self.ctx.device)
        if not self.ctx.is_main:
            dist.gather(padded, None, dst=0, group=self.shard_group)
            return None
        flat = padded.new_empty((padded.shape[0] * self.shard_size,) + tuple(shape[1:]))
        dist.gather(padded, list(flat.chunk(self.shard_size)), dst=0, group=self.shard_group)
        return flat[: shape[0]]

    def _replicated_full(self, key: str) -> torch.Tensor:
        """The fp32 value of a replicated frozen parameter, on every rank (collective under bf16: its rows are
        all-gathered over the shard group)."""
        param = self._replicated[key]
        if key not in self._frozen_fp32:
            return param.detach()
        return _all_gather_rows(self._frozen_fp32[key], param.shape, self.shard_group, self.shard_size,
                                self.ctx.device)

    def _replicated_to_main(self, key: str) -> Optional[torch.Tensor]:
        """The fp32 value of a replicated frozen parameter on rank 0 only (None elsewhere; collective in rank
        0's shard group under bf16)."""
        param = self._replicated[key]
        if key not in self._frozen_fp32:
            return param.detach() if self.ctx.is_main else None
        return self._rows_to_main(self._frozen_fp32[key], param.shape)

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
        # Without clipping only the norm is taken (the divergence guard and the log read it): clip_grad_norm_
        # with an infinite bound would still multiply every gradient by 1, a pass over all of them.
        if clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip_grad)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None])
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
            if key in self._replicated:
                value = self._replicated_full(key)
            state.update(cpu_state_copy({key: value.full_tensor() if isinstance(value, DTensor) else value}))
        return state

    def _gather_to_main(self, param) -> Optional[torch.Tensor]:
        """The full tensor of a sharded parameter on rank 0 only (None elsewhere; collective): each rank's shard,
        padded to the common row count, gathered within rank 0's shard group."""
        return self._rows_to_main(param.to_local(), param.shape)

    def stage_end_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """What ``model_state.pt`` holds at the end of a stage, fp32 CPU (collective): gathered to rank 0 only,
        one parameter at a time; None on the other ranks, which hand their shards on with ``hand_off``."""
        state = {} if self.ctx.is_main else None
        for key, value in self.model.state_dict().items():
            if key in self._replicated:
                full = self._replicated_to_main(key)
                if state is not None:
                    state[key] = full.detach().to("cpu", torch.float32, copy=True)
            elif isinstance(value, DTensor):
                full = self._gather_to_main(value)
                if state is not None:  # gathered afresh: fp32 already, a copy only where it comes from a device
                    state[key] = full.detach().to("cpu", torch.float32)
            elif state is not None:
                state.update(cpu_state_copy({key: value}))
        return state

    can_hand_off = True

    @torch.no_grad()
    def hand_off(self, model: nn.Module) -> None:
        """Give ``model`` -- the refiner built again with its encoder on the meta device
        (``build_refiner(cfg, load_weights=False, partitioned=True)``) -- this engine's weights: the encoder's as
        this rank's shards, pending until the next engine shards it the same way (same ranks, same cuts) and
        copies them in; the heads (small) whole, and this rank's buffers and extra state (BN statistics, queues)."""
        encoder = model.encoder
        if not all(p.is_meta for p in encoder.parameters()):
            raise RuntimeError("hand_off: build the next refiner with its encoder on the meta device "
                               "(build_refiner(..., load_weights=False, partitioned=True))")
        own = dict(self.model.encoder.named_parameters())
        if own.keys() != dict(encoder.named_parameters()).keys():
            raise RuntimeError("hand_off: the new encoder's parameters differ")
        encoder.pending_weights = {
            n: (self._replicated_source(f"encoder.{n}") if f"encoder.{n}" in self._replicated
                else _OwnShard(p.to_local().detach(), p.shape)) for n, p in own.items()}
        rest = {k: (v.full_tensor() if isinstance(v, DTensor) else v)
                for k, v in self.model.state_dict().items() if not k.startswith("encoder.")}
        missing, unexpected = model.load_state_dict(rest, strict=False)
        if unexpected or any(not k.startswith("encoder.") for k in missing):
            raise RuntimeError(f"hand_off: the rest of the model does not match: missing {missing}, unexpected "
                               f"{unexpected}")

    def _replicated_source(self, key: str):
        """What the next engine reads a replicated frozen parameter from: the full fp32 tensor itself (fp32), or,
        under bf16, its fp32 rows, all-gathered when the next engine asks (collective: every rank materialises
        the same parameters in the same order)."""
        if key not in self._frozen_fp32:
            return _Full(self._replicated[key].detach())
        return _GatheredOnUse(self._frozen_fp32[key], self._replicated[key].shape, self.shard_group, self.shard_size,
                              self.ctx.device)

    # -------------------------------------------------------------------------------------- checkpoints
    def _dcp_state(self) -> Dict:
        # Model state includes the queues' ``_extra_state`` (a dict holding the generator's ByteTensor):
        # get_state_dict keeps it, DCP flattens the dict and saves the tensor, and set_state_dict hands it back
        # to ``set_extra_state``, so the queues resume picking the same neighbours. Plain buffers are saved once
        # (DCP dedups replicated tensors): right for syncbn and the queues; per-rank BN statistics (plain bn)
        # come back from the caller's per-rank client state.
        # The replicated frozen parameters are not in it (bf16 copies, and whole on every rank): FROZEN_FILE.
        model, optimizer = get_state_dict(self.model, self.optimizer)
        for key in self._replicated:
            model.pop(key, None)
        return {"model": model, "optimizer": optimizer}

    def save(self, directory: Path) -> None:
        if self._replicated:  # their fp32 values, gathered to rank 0 one at a time, written by it
            frozen = {}
            for key in self._replicated:
                full = self._replicated_to_main(key)
                if full is not None:
                    frozen[key] = full.detach().to("cpu", torch.float32, copy=True)
            if self.ctx.is_main:
                Path(directory).mkdir(parents=True, exist_ok=True)
                atomic_save(frozen, Path(directory) / FROZEN_FILE)
            del frozen
        # each rank writes its shards; DCP's save ends in a collective, so every rank returns after the frozen
        # file above is complete
        dcp.save(self._dcp_state(), checkpoint_id=str(directory))

    def load(self, directory: Path) -> None:
        # DCP unpickles its .metadata with pickle.load and its non-tensor items with weights_only=False: the
        # first is proved to hold only DCP's own metadata classes, the second are loaded weights-only
        metadata = Path(directory) / ".metadata"
        if not metadata.is_file():
            raise CheckpointError(f"{directory} holds no torch.distributed.checkpoint (.metadata): not written by "
                                  f"the fsdp2 engine")
        refuse_unsafe_pickle(metadata, _dcp_metadata_class)
        frozen_file = Path(directory) / FROZEN_FILE
        if frozen_file.is_file() != bool(self._replicated):
            raise CheckpointError(
                f"{directory} was written with engine.replicate_frozen={str(frozen_file.is_file()).lower()}, this "
                f"run has {str(bool(self._replicated)).lower()}: set it as the checkpoint was written to resume it")
        state = self._dcp_state()  # the layout to load into (this rank's shards)
        dcp.load(state, checkpoint_id=str(directory), planner=_WeightsOnlyLoadPlanner())
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(strict=not self._replicated))
        if self._replicated:
            self._load_replicated(torch.load(frozen_file, map_location="cpu", weights_only=True, mmap=True))

    @torch.no_grad()
    def _load_replicated(self, frozen: Dict[str, torch.Tensor]) -> None:
        """Every rank sets its whole copy of each replicated frozen parameter (and, under bf16, its fp32 rows)
        from ``frozen`` (fp32, memory-mapped: the ranks of a node read one page-cache copy)."""
        if frozen.keys() != self._replicated.keys():
            raise CheckpointError(f"{FROZEN_FILE} holds {sorted(frozen)}, this stage replicates "
                                  f"{sorted(self._replicated)}")
        for key, param in self._replicated.items():
            param.copy_(frozen[key])
            if key in self._frozen_fp32:
                start, stop = self._shard_rows(param)
                self._frozen_fp32[key] = frozen[key][start:stop].to(torch.float32, copy=True)


_DCP_METADATA = {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"}


def _dcp_metadata_class(module: str, name: str) -> bool:
    """What a DCP ``.metadata`` pickle may reconstruct, by exact name (a dotted name would let pickle reach any
    attribute of an allowed module, e.g. its ``os``): DCP's own metadata classes, torch dtypes, sizes and
    layouts, and a path."""
    if "." in name:
        return False
    if module == "torch.distributed.checkpoint.metadata":
        return name in _DCP_METADATA
    if module == "torch.distributed.checkpoint.filesystem":
        return name == "_StorageInfo"
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format))
    return (module, name) in {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                              ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but its non-tensor items (the optimiser's param-group values, the queues' extra
    state) are unpickled weights-only: DefaultLoadPlanner.load_bytes uses weights_only=False."""

    def load_bytes(self, read_item, value) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class _Full:
    """A pending source holding a whole tensor (a replicated frozen parameter handed on)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.shape, self.dtype = tensor, tensor.shape, tensor.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop]

    def full(self) -> torch.Tensor:
        return self.tensor


class _GatheredOnUse:
    """A pending source that all-gathers its tensor when read (collective): a replicated frozen parameter whose
    fp32 values are spread over the ranks' rows (bf16 runs). It holds this rank's rows and the group only, not the
    engine that made it (which is closed before the next one reads its sources)."""

    def __init__(self, local, shape, group, shard_size, device):
        self._args = (local, torch.Size(shape), group, shard_size, device)
        self.shape, self.dtype = torch.Size(shape), torch.float32

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return _all_gather_rows(*self._args)[start:stop]

    def full(self) -> torch.Tensor:
        return _all_gather_rows(*self._args)


def _padded_rows(local: torch.Tensor, shape, shard_size: int, device) -> torch.Tensor:
    """``local`` (a shard rank's rows of a tensor of ``shape``, as ``FSDPEngine._shard_rows`` cuts them) zero-padded
    to the common row count, on ``device`` (what the collectives send)."""
    size = -(-shape[0] // shard_size)
    padded = torch.zeros((size,) + tuple(shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    return padded


def _all_gather_rows(local: torch.Tensor, shape, group, shard_size: int, device) -> torch.Tensor:
    """The full tensor of ``shape`` from every shard rank's rows, on every rank of ``group`` (collective)."""
    padded = _padded_rows(local, shape, shard_size, device)
    flat = padded.new_empty((padded.shape[0] * shard_size,) + tuple(shape[1:]))
    dist.all_gather_into_tensor(flat, padded, group=group)
    return flat[: shape[0]]


class _OwnShard:
    """A pending source for ``FSDPEngine._materialise`` that holds this rank's shard only (the previous engine's):
    asked for exactly those rows, it gives them."""

    def __init__(self, local: torch.Tensor, shape):
        self.local, self.shape, self.dtype = local, torch.Size(shape), local.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if stop - start != self.local.shape[0]:
            raise RuntimeError(f"a handed-on shard holds {self.local.shape[0]} rows, asked for {start}..{stop}: "
                               f"the next engine must shard over the same ranks")
        return self.local

    def full(self):
        raise RuntimeError("a handed-on shard is not the full tensor")
