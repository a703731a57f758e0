"""MIM-Refiner, one training step, in one readable place.

    crops (2 global + n local) --encoder--> CLS after each tapped block, and after the final norm
        --per head--> projector z (global crops) and predictor p (every crop), one head call for all crops
        --queues--> NN(z) among each head's queued projections of global view g1 (top-k, uniform pick), every
                    head and both views in one lookup
        --objective--> NNA loss per head, summed over heads with weight 1
    then this step's g1 projections (of every rank) are enqueued.

The module holds the encoder, one ID head per tap and a bank of queues, one per head (``memory/bank.py``:
replicated or sharded, one interface). Its forward takes a process-group handle and knows nothing else of
distribution: predictions are gathered with gradient inside the objective, and the queue bank does its own
collectives (a fixed number per step, whatever the number of heads). ``build_refiner`` reads the world size and
rank once, to lay out the sharded queues.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scale_refiner.heads.async_bn import attach, coordinator_of
from scale_refiner.heads.id_head import IDHead
from scale_refiner.memory.bank import build_queues
from scale_refiner.models.vit import VisionTransformer, build_vit, resolve_model_dims
from scale_refiner.objective.nna import nna_loss
from scale_refiner.precision import to_device_async


class MIMRefiner(nn.Module):
    def __init__(self, encoder: VisionTransformer, tap_blocks: Sequence[int], temperature: float,
                 objective: str = "nna", proj_hidden_dim: int = 2048, proj_out_dim: int = 256,
                 pred_hidden_dim: int = 4096, norm: str = "bn", queue_size: int = 65536, seed: int = 0,
                 queue_sharded: bool = False, queue_search: str = "torch", world: int = 1, rank: int = 0,
                 queue_block: int = 1, pairing: str = "intended", queue_init: str = "empty"):
        super().__init__()
        self.encoder = encoder
        self.tap_blocks = list(tap_blocks)
        self.temperature = temperature
        self.objective = objective
        self.pairing = pairing  # which (anchor, predicted view) pairs the loss sums (objective/nna.py)
        # Head 0 reads the final-norm output; heads 1.. read the raw residual stream after tap_blocks[h-1].
        self.head_names = ["final"] + [f"block{b}" for b in self.tap_blocks]
        self.heads = nn.ModuleList(
            IDHead(encoder.embed_dim, proj_hidden_dim, proj_out_dim, pred_hidden_dim, norm)
            for _ in self.head_names
        )
        if norm == "async":
            # this refiner's async-BN layers share one bucket: one non-blocking all-reduce per step
            attach(self.heads)
        # one queue per head, replicated or sharded behind one interface (sharded: rank r stores 1/W of each
        # FIFO; block = per-rank batch keeps the enqueue local); both pick the same neighbours
        self.queues = build_queues(len(self.head_names), queue_size, proj_out_dim, seed=seed, sharded=queue_sharded,
                                   world=world, rank=rank, block=queue_block, search=queue_search, init=queue_init)

    def finish_stage(self) -> None:
        """After a stage's last step (the trainer calls it): fold the last step's async-BN statistics into the
        running ones, so the end state holds them."""
        coordinator = coordinator_of(self)
        if coordinator is not None:
            coordinator.sync()

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor, index: torch.Tensor,
                label: Optional[torch.Tensor] = None, topk: int = 20, step: int = 0,
                group: Optional[dist.ProcessGroup] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """global_crops: (2, B, C, H, W); local_crops: (n, B, C, h, w), n may be 0; index: dataset indices (B,).

        Returns the loss (summed over heads) and detached scalar metrics named "<head>/<metric>". A plain
        tuple, so engine hooks (ZeRO-3, FSDP2) can walk the outputs.
        """
        num_global, batch = global_crops.shape[:2]
        num_local = local_crops.shape[0]
        if num_global != 2:
            raise ValueError(f"MIM-Refiner needs exactly 2 global crops, got {num_global}")
        crops = [global_crops.flatten(0, 1)] + ([local_crops.flatten(0, 1)] if num_local else [])
        outs = self.encoder(crops, self.tap_blocks)

        per_head = []  # (z, p) of each head: projections of the 2 global crops, predictions of every crop
        for h, head in enumerate(self.heads):
            feats = [out["final"] if h == 0 else out["taps"][:, h - 1] for out in outs]
            z_all, p_all = head(torch.cat(feats) if len(feats) > 1 else feats[0])  # BN statistics mix all crops
            per_head.append((z_all[: 2 * batch].view(2, batch, -1), p_all.view(2 + num_local, batch, -1)))
        z_unit = F.normalize(torch.stack([z for z, _ in per_head]).detach().float(), dim=-1)  # (heads, 2, B, d)
        # every head's neighbours for both views in one lookup (sharded: a fixed number of collectives)
        neighbours, info = self.queues.lookup(z_unit, index, topk, label, step, group)
        losses, metrics = [], {}
        for h, (z, p) in enumerate(per_head):
            name = self.head_names[h]
            for key in self.reported_lookup_metrics:
                if key in info:
                    metrics[f"{name}/nn_{key}"] = info[key][h].float().mean()  # mean over both views' queries
            loss, extra = nna_loss(z, neighbours[h], p.float(), self.temperature, self.objective, group,
                                   self.pairing)
            losses.append(loss)
            metrics[f"{name}/loss"] = loss.detach()
            metrics[f"{name}/positive_prob"] = extra["positive_prob"]
        self.queues.enqueue(z_unit[:, 0], index, label, step, group)  # the g1 projections of every head
        total = torch.stack(losses).sum()
        metrics["loss"] = total.detach()
        return total, metrics

    reported_lookup_metrics = ("similarity", "age", "accuracy")  # logged per head as nn_<key>

    def shard_units(self) -> List[nn.Module]:
        """The modules an FSDP2 engine shards one by one (then the root takes the rest)."""
        return [*self.encoder.blocks, *self.heads]

    heads_prefix = "heads"  # the parameter groups' name for the non-encoder part

    def set_stage(self, stage: str, freeze_blocks: int) -> None:
        """``heads``: encoder frozen whole and kept in eval mode. ``refine``: the configured prefix frozen."""
        if stage == "heads":
            self.encoder.freeze(0, whole=True)
        elif stage == "refine":
            self.encoder.freeze(freeze_blocks)
        else:
            raise ValueError(f"stage {stage!r} is not one of heads, refine")
        self.stage = stage

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "stage", None) == "heads":
            self.encoder.eval()  # frozen encoder: no dropout / stochastic behaviour, as in the paper
        return self


def build_refiner(cfg, load_weights: bool = True, partitioned: bool = False) -> MIMRefiner:
    """Encoder (with pre-trained weights when configured) + heads + queues from a ``RefineConfig``.

    ``partitioned``: build it so that no rank ever holds the whole model, where the engine shards it.
    ZeRO-3 (``engine.kind=deepspeed``, stage 3), partitioned over the ranks from the start:
    - the encoder is constructed under ``deepspeed.zero.Init`` (``engine.zero.zero_init``, fp32 partitions): a
      layer's full parameters exist only while it is built and initialised;
    - the weights file is checked against a meta-built twin (``plan_pretrained``: the errors of
      ``load_pretrained``) and read partition by partition from its memory map (``load_state_partitioned``):
      each rank reads only its part of each tensor, and a value the key mapping computes (a concatenation, a
      resampled position embedding) is the only full tensor, one at a time;
    - heads and queues are built as usual (small; the same on every rank under the same seed), then the heads'
      parameters are partitioned too.
    FSDP2 (``engine.kind=fsdp2``), when there are weights to come (a weights file, or ``load_weights=False``: the
    previous stage's or a checkpoint's, through ``FSDPEngine.hand_off`` / ``load_refiner_state``): the encoder on
    the meta device, its weights pending as lazy sources (``encoder.pending_weights``) that ``FSDPEngine`` reads
    shard by shard after ``fully_shard``; heads and queues built as usual. A random initialisation (no weights
    file) is built as usual.
    The weights and the random stream afterwards are those of the plain build (a meta encoder makes the plain
    build's random draws, ``VisionTransformer.draw_init``). Needs the process group.
    """
    from scale_refiner.engine.zero import zero3_config
    zero_config = zero3_config(cfg) if partitioned else None
    meta = (partitioned and cfg.engine.kind == "fsdp2" and (bool(cfg.model.weights) or not load_weights))
    if meta:
        encoder = build_vit(cfg.model, device="meta", train=True)
        encoder.draw_init()
        encoder.pending_weights = None  # this stage's weights: the file's here, or set by whoever builds it
        if cfg.model.weights and load_weights:
            from scale_refiner.models.weights import plan_pretrained
            encoder.pending_weights = plan_pretrained(build_vit(cfg.model, device="meta"), cfg.model.weights,
                                                      cfg.model.weights_format).tensors
    elif zero_config is None:
        encoder = build_vit(cfg.model, train=True)
        if cfg.model.weights and load_weights:
            from scale_refiner.models.weights import load_pretrained
            load_pretrained(encoder, cfg.model.weights, cfg.model.weights_format)
    else:
        encoder = build_vit(cfg.model, zero_init_config=zero_config, train=True)
        if cfg.model.weights and load_weights:
            from scale_refiner.engine.zero import load_state_partitioned
            from scale_refiner.models.weights import plan_pretrained
            plan = plan_pretrained(build_vit(cfg.model, device="meta"), cfg.model.weights, cfg.model.weights_format)
            load_state_partitioned(encoder, plan.tensors)
    encoder.set_grad_checkpointing(cfg.model.checkpointing)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    refiner = MIMRefiner(encoder, cfg.heads.blocks, cfg.heads.temperature, cfg.heads.objective,
                         cfg.heads.proj_hidden_dim, cfg.heads.proj_out_dim, cfg.heads.pred_hidden_dim,
                         cfg.heads.norm, cfg.queue.size, seed=cfg.run.seed, queue_sharded=cfg.queue.sharded,
                         queue_search=cfg.queue.search, world=world, rank=rank,
                         queue_block=max(1, cfg.data.batch_size // world), pairing=cfg.heads.pairing,
                         queue_init=cfg.queue.init)
    if zero_config is not None:
        from scale_refiner.engine.zero import zero_init
        zero_init(zero_config, module=refiner)  # the heads' parameters: the encoder's are partitioned already
    return refiner


def is_partitioned_build(refiner: MIMRefiner) -> bool:
    """Built by ``build_refiner(..., partitioned=True)`` and not given to an engine yet: ZeRO-3 partitions, or an
    encoder on the meta device awaiting its FSDP2 shards."""
    from scale_refiner.engine.zero import is_partitioned
    return any(is_partitioned(p) or p.is_meta for p in refiner.parameters())


def load_refiner_state(refiner: MIMRefiner, state, strict: bool = False):
    """``load_state_dict`` for a partitioned build (``model_state.pt``, memory-mapped, on resume): ZeRO-3
    partitions read their slices (``load_state_partitioned``); a meta encoder takes its tensors as pending
    sources, read shard by shard by the FSDP2 engine. Returns ``(missing, unexpected)``."""
    from scale_refiner.engine.zero import load_state_partitioned
    encoder = refiner.encoder
    if not any(p.is_meta for p in encoder.parameters()):
        return load_state_partitioned(refiner, state, strict=strict)
    from scale_refiner.models.weights import TensorSource, TensorView
    shapes = {n: p.shape for n, p in encoder.named_parameters()}
    pending, rest = {}, {}
    for key, value in state.items():
        name = key[len("encoder."):] if key.startswith("encoder.") else None
        if name in shapes:
            source = value if isinstance(value, TensorSource) else TensorView(value)
            if tuple(source.shape) != tuple(shapes[name]):
                raise RuntimeError(f"size mismatch for {key}: {tuple(source.shape)} in the state, "
                                   f"{tuple(shapes[name])} in the model")
            pending[name] = source
        else:
            rest[key] = value.full() if isinstance(value, TensorSource) else value
    missing, unexpected = refiner.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not (k.startswith("encoder.") and k[len("encoder."):] in pending)]
    if strict and (missing or unexpected):
        raise RuntimeError(f"state does not match the model: missing {missing}, unexpected {unexpected}")
    encoder.pending_weights = pending
    return missing, unexpected


def starting_encoder_state(refiner: MIMRefiner, cfg) -> Dict[str, torch.Tensor]:
    """The full state of the encoder a run starts from, on every rank (for the k-NN before refinement).

    A plain build: its own state dict. A partitioned one (``build_refiner(partitioned=True)``) holds no full
    tensor, so: with a weights file, the checked, mapped tensors of the file itself (for FSDP2: the pending
    sources its shards are filled from) -- memory-mapped torch files are used as they are, one page-cache copy
    for all the ranks of a node; a value the mapping computes, a tensor stored in another dtype than fp32 (cast
    here) and a safetensors file (read here) are per-rank copies; without one (random initialisation, the demo
    and test sizes; ZeRO-3 only, FSDP2 builds those plainly), gathered from the partitions: a full copy on every
    rank. Either way it is exactly what the partitions or shards hold (collective in the last case)."""
    if not is_partitioned_build(refiner):
        return refiner.encoder.state_dict()
    if any(p.is_meta for p in refiner.encoder.parameters()):  # FSDP2: what its shards will be filled from
        pending = refiner.encoder.pending_weights
        return {k: v if v.dtype == torch.float32 else v.float() for k, v in
                ((name, source.full()) for name, source in pending.items())}
    if cfg.model.weights:
        from scale_refiner.models.weights import plan_pretrained
        plan = plan_pretrained(build_vit(cfg.model, device="meta"), cfg.model.weights, cfg.model.weights_format)
        return {k: v if v.dtype == torch.float32 else v.float() for k, v in plan.state_dict().items()}
    from scale_refiner.engine.zero import gather_partitioned_state
    return gather_partitioned_state(refiner.encoder)


def refiner_signature(cfg) -> Dict:
    """What a refiner checkpoint must match to be resumed: architecture, dimensions, taps and head sizes."""
    return dict(resolve_model_dims(cfg.model), arch=cfg.model.arch, img_size=cfg.model.img_size,
                heads=list(cfg.heads.blocks), proj_out_dim=cfg.heads.proj_out_dim, queue_size=cfg.queue.size)


def refiner_inputs(batch: Dict[str, torch.Tensor], device: torch.device, stage, step: int, micro: int = 0):
    """A stream (micro-)batch as ``MIMRefiner.forward`` arguments: (positional, keyword), for ``run_stage``.
    ``micro``: the micro-batch's index within the step (the refiner draws nothing per micro-batch of its own)."""
    # asynchronous copies (through pinned memory on a GPU): the host queues the step without waiting for them
    return (tuple(to_device_async(batch[key], device) for key in ("global", "local", "index", "label")),
            {"topk": stage.topk, "step": step})
