"""Parameter and buffer counts of a recipe's refiner, read from the model itself built on the meta device (no
memory, no weights read): what is trained and frozen in each stage, per block, per optimiser group."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

import torch


@dataclass
class ModelCounts:
    stage: str
    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch: int
    frozen_blocks: int
    block_params: int           # one transformer block
    embed_params: int           # patch embedding, cls, pos
    norm_params: int            # final norm (and norm_pre)
    encoder_params: int
    heads_params: int           # every ID head
    total_params: int
    trainable: int              # of all: what the optimiser owns in this stage
    trainable_encoder: int      # of the encoder: what the EMA shadows (refine stage)
    frozen: int
    largest_group: int          # the largest optimiser group (DeepSpeed's largest sub-group)
    largest_param: int          # the largest single parameter
    buffer_bytes: Dict[str, int] = field(default_factory=dict)  # queues, head norms' statistics
    # every parameter's (numel, trained in this stage): what ZeRO-3's persistence threshold keeps whole
    param_sizes: List[Tuple[int, bool]] = field(default_factory=list)

    def persistent(self, threshold: int) -> Tuple[int, int]:
        """(trained, frozen) elements in parameters under ``threshold`` elements: ZeRO-3 keeps those whole."""
        small = [(n, t) for n, t in self.param_sizes if n < threshold]
        return sum(n for n, t in small if t), sum(n for n, t in small if not t)

    def as_dict(self) -> Dict:
        out = asdict(self)
        out.pop("param_sizes")
        return out


def meta_refiner(cfg):
    """The recipe's refiner built on the meta device: the exact modules the trainer builds, without storage."""
    from scale_refiner.refiner import build_refiner
    cfg = copy.deepcopy(cfg)
    cfg.model.weights = None  # counts need no weights file (and none is read on the meta device)
    with torch.device("meta"):
        return build_refiner(cfg, load_weights=False)


def model_counts(cfg, stage: str, refiner=None) -> ModelCounts:
    """Counts of ``stage`` (``heads``: the encoder frozen whole; ``refine``: ``model.freeze_blocks`` frozen)."""
    from scale_refiner.engine.optim import param_groups
    from scale_refiner.models.vit import resolve_model_dims
    refiner = refiner if refiner is not None else meta_refiner(cfg)
    refiner.set_stage(stage, cfg.model.freeze_blocks)
    enc = refiner.encoder
    dims = resolve_model_dims(cfg.model)
    numel = lambda params: sum(p.numel() for p in params)  # noqa: E731
    st = getattr(cfg.stages, stage)
    groups = param_groups(enc, refiner.heads, enc.depth, st.weight_decay, st.head_weight_decay, st.layer_decay,
                          heads_prefix=refiner.heads_prefix)
    trainable = [p for p in refiner.parameters() if p.requires_grad]
    buffers = {"queues": sum(b.numel() * b.element_size() for b in refiner.queues.buffers()),
               "head_norms": sum(b.numel() * b.element_size() for b in refiner.heads.buffers())}
    return ModelCounts(
        stage=stage, dim=dims["embed_dim"], depth=dims["depth"], num_heads=dims["num_heads"],
        mlp_ratio=dims.get("mlp_ratio", 4.0), patch=dims["patch_size"],
        frozen_blocks=enc.frozen_blocks,
        block_params=numel(enc.blocks[0].parameters()),
        embed_params=numel([enc.cls_token, enc.pos_embed, *enc.patch_embed.parameters()]),
        norm_params=numel([*enc.norm.parameters(), *enc.norm_pre.parameters()]),
        encoder_params=numel(enc.parameters()), heads_params=numel(refiner.heads.parameters()),
        total_params=numel(refiner.parameters()), trainable=numel(trainable),
        trainable_encoder=numel(p for p in enc.parameters() if p.requires_grad),
        frozen=numel(p for p in refiner.parameters() if not p.requires_grad),
        largest_group=max((numel(g["params"]) for g in groups), default=0),
        largest_param=max(p.numel() for p in refiner.parameters()),
        buffer_bytes=buffers, param_sizes=[(p.numel(), p.requires_grad) for p in refiner.parameters()])
