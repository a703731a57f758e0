"""Vision Transformer, pre-norm (MAE) and post-norm (data2vec 2.0), with CLS taps on intermediate blocks.

Parameter names follow timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.{norm1,attn,norm2,mlp}``, ``norm_pre``, ``norm``), so a state dict moves between the two with no
renaming: the pre-norm form is timm's default ViT, the post-norm form is timm's ViT with ``pre_norm=True``
(the embedding LayerNorm data2vec 2.0 applies before the first block), ``final_norm=False`` and
``block_fn=PostNormBlock``.

One ``forward`` takes every crop resolution at once and returns, per resolution, the CLS token after each
tapped block (raw residual stream) and after the final norm. It is a single module call so that ZeRO-3 and
FSDP see one forward, and the blocks accept a list of token tensors so each block runs (and, under FSDP2, is
gathered) once per step for all resolutions.

Activation checkpointing (``model.checkpointing``) is decided per block and applied inside the block's own
``forward``, so that ``torch.compile`` of a block (``model.compile``) traces the checkpoint with it (checkpoint
first, compile around it: the compiled graph then knows what it may drop and recompute):

- ``false``: nothing checkpointed; ``true``: every trained block saves only its input and recomputes its
  forward in the backward;
- an integer N: the first N trained blocks are checkpointed, the rest save everything. The first ones, because
  their saved tensors live longest: the backward runs from the last block, so the un-checkpointed tail's
  activations are freed before any block is recomputed, and the recomputation never adds to the peak at the
  start of the backward (checkpointing the last N instead would recompute a block while every other block's
  activations are still alive);
- ``selective``: every trained block runs under an op-level policy (``SELECTIVE_SAVE_OPS``) that keeps the outputs
  of the matmuls and of the attention and recomputes the rest (LayerNorms, GELU, residual adds, casts, views):
  the expensive FLOPs are never repeated, and the memory saved is what the pointwise ops' outputs took.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from timm.layers import Mlp, PatchEmbed, resample_abs_pos_embed
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block

# Registered sizes. mlp_ratio 4 everywhere: ViT-2B/14 is 2560 wide with an MLP of 10240.
VIT_SIZES: Dict[str, dict] = {
    "vit_test_patch4": dict(patch_size=4, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4.0),
    "vit_mini_patch4": dict(patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0),
    "vit_tiny_patch4": dict(patch_size=4, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "vit_small_patch4": dict(patch_size=4, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0),
    "vit_2b_patch14": dict(patch_size=14, embed_dim=2560, depth=24, num_heads=32, mlp_ratio=4.0),
}

LN_EPS = 1e-6  # MAE, data2vec 2.0 and timm's ViTs all use 1e-6


def resolve_model_dims(model_cfg) -> dict:
    """Registered size of ``model_cfg.name`` with any explicitly set dimension overriding it."""
    if model_cfg.name not in VIT_SIZES:
        raise KeyError(f"{model_cfg.name!r} is not a registered ViT; known: {', '.join(VIT_SIZES)}")
    dims = dict(VIT_SIZES[model_cfg.name])
    for key in dims:
        value = getattr(model_cfg, key, None)
        if value is not None:
            dims[key] = value
    return dims


# ---------------------------------------------------------------------------------- activation checkpointing
CHECKPOINT_POLICIES = ("none", "full", "selective")


def checkpointing_plan(value, trained: int) -> Tuple[str, int]:
    """``model.checkpointing`` -> (policy, how many of the ``trained`` blocks it covers, counted from the first
    trained block). ``value``: false, true, an integer N >= 0 (the first N trained blocks, at most all) or
    ``'selective'``."""
    if value is None or value is False:
        return "none", 0
    if value is True:
        return ("full", trained) if trained else ("none", 0)
    if value == "selective":
        return ("selective", trained) if trained else ("none", 0)
    if isinstance(value, int) and value >= 0:
        count = min(value, trained)
        return ("full", count) if count else ("none", 0)
    raise ValueError(f"checkpointing must be false, true, an integer >= 0 or 'selective', got {value!r}")


def _aten_ops(*names):
    """The default overloads of the aten ops among ``names`` that this torch has (the attention kernels differ
    between versions and devices)."""
    out = set()
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None and hasattr(packet, "default"):
            out.add(packet.default)
    return frozenset(out)


# What a selectively checkpointed block keeps: every matmul's output (qkv, projection, fc1, fc2; a Linear on a
# token tensor reaches the dispatcher as addmm or mm) and the attention's outputs (its output and log-sum-exp,
# which its backward needs anyway). Everything else in a block is pointwise or a view and is recomputed.
SELECTIVE_SAVE_OPS = _aten_ops(
    "mm", "addmm", "bmm", "baddbmm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
    "_scaled_mm")  # model.float8's FP8 matmuls (models/float8.py)


def _selective_policy(ctx, op, *args, **kwargs):
    # MUST_SAVE: kept even where torch.compile's partitioner would rather recompute a matmul; PREFER_RECOMPUTE:
    # the partitioner may still keep a pointwise output if that is cheaper (eager always recomputes it)
    return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SELECTIVE_CONTEXT = partial(create_selective_checkpoint_contexts, _selective_policy)


class CheckpointedBlock(nn.Module):
    """A block that checkpoints itself when its encoder says so (``checkpoint_policy``: none, full, selective).

    Only where grad is enabled: a frozen block runs under ``no_grad`` and has nothing to save. Non-reentrant
    only: the reentrant variant drops the gradient of the first trainable block when its input comes from a
    frozen (no-grad) prefix: no input requires grad, so the reentrant function is never part of the graph
    (tests/test_vit.py checks the gradient). Subclasses implement ``forward_one`` (one crop's tokens)."""

    checkpoint_policy = "none"

    def forward(self, x):
        policy = self.checkpoint_policy
        if policy == "none" or not torch.is_grad_enabled():
            return self.forward_crops(x)
        if policy == "selective":
            return checkpoint(self.forward_crops, x, use_reentrant=False, context_fn=_SELECTIVE_CONTEXT)
        return checkpoint(self.forward_crops, x, use_reentrant=False)

    def forward_crops(self, x):
        if isinstance(x, (list, tuple)):
            return [self.forward_one(t) for t in x]
        return self.forward_one(x)


class ListBlock(CheckpointedBlock, Block):
    """timm's pre-norm block that also takes a list of token tensors (one per crop resolution)."""

    def forward_one(self, x):
        return Block.forward(self, x)


class PostNormBlock(CheckpointedBlock):
    """Post-norm block as in data2vec 2.0: x = norm1(x + attn(x)); x = norm2(x + mlp(x)).

    Same submodule names as timm's ``Block`` so weights map one to one; constructor mirrors timm's so it can
    be passed to timm's ``VisionTransformer`` as ``block_fn`` (extra keyword arguments are accepted and unused).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer=None, act_layer=None, **unused):
        super().__init__()
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=LN_EPS)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm1 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer or nn.GELU)
        self.norm2 = norm_layer(dim)

    def forward_one(self, x):
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class BiasedPatchEmbed(PatchEmbed):
    """timm's PatchEmbed that keeps its bias: timm drops it when ``pre_norm=True``, data2vec 2.0 has one."""

    def __init__(self, *args, bias: bool = True, **kwargs):
        super().__init__(*args, bias=True, **kwargs)


class VisionTransformer(nn.Module):
    def __init__(self, patch_size: int = 16, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, img_size: int = 224, in_chans: int = 3, arch: str = "prenorm",
                 learn_pos_embed: Optional[bool] = None):
        super().__init__()
        if arch not in ("prenorm", "postnorm"):
            raise ValueError(f"arch must be prenorm or postnorm, got {arch!r}")
        self.arch = arch
        self.residual_dtype = "compute"  # model.residual_dtype (build_vit): the stream's dtype under autocast
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.img_size = img_size
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, strict_img_size=False, dynamic_img_pad=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
        # data2vec 2.0 keeps a fixed sin-cos position embedding; MAE's is a parameter (initialised sin-cos).
        self.learn_pos_embed = (arch == "prenorm") if learn_pos_embed is None else learn_pos_embed
        block_fn = ListBlock if arch == "prenorm" else PostNormBlock
        self.norm_pre = nn.LayerNorm(embed_dim, eps=LN_EPS) if arch == "postnorm" else nn.Identity()
        self.blocks = nn.ModuleList([
            block_fn(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                     norm_layer=partial(nn.LayerNorm, eps=LN_EPS))
            for _ in range(depth)
        ])
        # Post-norm blocks end normalised already; data2vec 2.0 has no final norm.
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS) if arch == "prenorm" else nn.Identity()
        self.frozen_blocks = 0
        self.frozen_all = False
        self.grad_checkpointing = False  # model.checkpointing: false | true | N | 'selective'
        self.compiled = False
        self._init_weights()
        if not self.learn_pos_embed:
            self.pos_embed.requires_grad_(False)

    # ----------------------------------------------------------------------------------------------- set-up
    @torch.no_grad()
    def _init_weights(self):
        # On the meta device there is nothing to initialise: such a model gets its weights assigned, or, built for
        # FSDP2, its shards filled (``draw_init`` makes the random draws of a plain build)
        if self.pos_embed.is_meta:
            return
        self._initialise()

    @torch.no_grad()
    def draw_init(self) -> None:
        """On a model built on the meta device: make exactly the random draws a plain build makes -- each layer's
        own initialisation as it is constructed, then ``_init_weights`` -- one layer or tensor at a time on the
        host, keeping nothing. The random stream afterwards is the plain build's, so what is built next (the
        heads) comes out the same."""
        if not self.pos_embed.is_meta:
            raise RuntimeError("draw_init is for a model built on the meta device")
        for module in self.modules():  # construction order: every layer registers its children as it builds them
            if hasattr(module, "reset_parameters") and next(module.parameters(recurse=False), None) is not None:
                module.to_empty(device="cpu", recurse=False)
                module.reset_parameters()
                module.to_empty(device="meta", recurse=False)
        self._initialise()  # on meta parameters: the draws of full host tensors, dropped

    def _initialise(self):
        _init_(self.pos_embed, lambda t: t.copy_(sincos_pos_embed(self.embed_dim, self.grid).unsqueeze(0)))
        _init_(self.cls_token, lambda t: nn.init.normal_(t, std=0.02))
        _init_(self.patch_embed.proj.weight, lambda w: nn.init.xavier_uniform_(w.view(w.shape[0], -1)))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _init_(m.weight, nn.init.xavier_uniform_)
                if m.bias is not None:
                    _init_(m.bias, nn.init.zeros_)
            elif isinstance(m, nn.LayerNorm):
                _init_(m.weight, nn.init.ones_)
                _init_(m.bias, nn.init.zeros_)

    def freeze(self, num_blocks: int, whole: bool = False) -> None:
        """Freeze patch embedding, cls, pos and the first ``num_blocks`` blocks (or, ``whole``, everything).

        Frozen parts run under ``no_grad``: no activations kept, no backward, and (under ZeRO-3) no gradient
        partitions. The flags are plain attributes so an engine wrapper sees the same model.
        """
        if not 0 <= num_blocks <= self.depth:
            raise ValueError(f"cannot freeze {num_blocks} blocks of a {self.depth}-block model")
        self.frozen_all = whole
        self.frozen_blocks = self.depth if whole else num_blocks
        self._assign_checkpointing()  # "the first N trained blocks" moves with the frozen prefix
        for p in self.parameters():
            p.requires_grad_(True)
        if not self.learn_pos_embed:
            self.pos_embed.requires_grad_(False)
        if whole:
            self.requires_grad_(False)
            return
        if num_blocks > 0:
            for module in (self.patch_embed, self.norm_pre, *self.blocks[:num_blocks]):
                module.requires_grad_(False)
            self.cls_token.requires_grad_(False)
            self.pos_embed.requires_grad_(False)

    def set_grad_checkpointing(self, enable=True) -> None:
        """``model.checkpointing``: ``False``, ``True`` (every trained block), an integer N (the first N trained
        blocks) or ``'selective'`` (every trained block keeps its matmul and attention outputs only)."""
        checkpointing_plan(enable, self.depth)  # refuses a bad value here rather than at the first step
        self.grad_checkpointing = enable
        self._assign_checkpointing()

    def checkpointing_plan(self) -> Tuple[str, int]:
        """(policy, checkpointed blocks) for the current frozen prefix."""
        return checkpointing_plan(self.grad_checkpointing, self.depth - self.frozen_blocks)

    def _assign_checkpointing(self) -> None:
        policy, count = self.checkpointing_plan()
        for i, block in enumerate(self.blocks):
            block.checkpoint_policy = policy if 0 <= i - self.frozen_blocks < count else "none"

    def compile_blocks(self) -> None:
        """``torch.compile`` every block in place (``nn.Module.compile``: parameter names, state dicts and the
        engines' per-block wrapping stay as they are), frozen and trained alike. Each block's checkpointing runs
        inside its compiled forward. The blocks have one structure, so one compiled graph serves them all per
        (grad mode, checkpoint policy, input shapes); compilation happens at the first call."""
        for block in self.blocks:
            block.compile()
        self.compiled = True

    # -------------------------------------------------------------------------------------------- forward
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # B, N, D (timm flattens)
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        pos = self.pos_embed
        if (h, w) != (self.grid, self.grid):
            # Bicubic without antialiasing, the convention of MAE / DINO for smaller crops.
            pos = resample_abs_pos_embed(pos, new_size=[h, w], old_size=[self.grid, self.grid],
                                         num_prefix_tokens=1, interpolation="bicubic", antialias=False)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls + pos[:, :1], x + pos[:, 1:]], dim=1)
        return self.norm_pre(self.residual_cast(x))

    def residual_cast(self, x: torch.Tensor) -> torch.Tensor:
        """The stream in ``residual_dtype`` under autocast: ``compute``, autocast's dtype (where the weights are
        fp32, the single engine, the position embedding's add would otherwise promote the whole stream to fp32:
        twice the bytes of every saved block input and residual add); ``fp32``, fp32 whatever the weights."""
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return x
        dtype = torch.get_autocast_dtype(device) if self.residual_dtype == "compute" else torch.float32
        return x.to(dtype)

    def forward(self, crops: Sequence[torch.Tensor], tap_blocks: Sequence[int] = ()) -> List[Dict[str, torch.Tensor]]:
        """``crops``: one (B, C, H, W) tensor per resolution.

        Returns one dict per resolution: ``final`` (B, D), the CLS token after the final norm, and ``taps``
        (B, T, D), the raw CLS token after each block in ``tap_blocks`` (in that order).
        """
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        for images in crops:
            if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
                raise ValueError(f"crop size {tuple(images.shape[-2:])} is not a multiple of the patch size "
                                 f"{self.patch_size}")
        tap_set = {i: n for n, i in enumerate(tap_blocks)}
        taps: List[List[Optional[torch.Tensor]]] = [[None] * len(tap_blocks) for _ in crops]

        def record(block_idx, xs):
            if block_idx in tap_set:
                for c, x in enumerate(xs):
                    taps[c][tap_set[block_idx]] = x[:, 0]

        frozen = self.frozen_blocks
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_all and frozen == 0):
            xs = [self.embed(images) for images in crops]
        if frozen:
            with torch.no_grad():
                for i in range(frozen):
                    xs = self.blocks[i](xs)
                    record(i, xs)
        for i in range(frozen, self.depth):
            xs = self.blocks[i](xs)  # checkpointed or not as _assign_checkpointing set it
            record(i, xs)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_all):
            finals = [self.norm(x[:, 0]) if self.arch == "prenorm" else x[:, 0] for x in xs]
        out = []
        for c, final in enumerate(finals):
            stacked = torch.stack(taps[c], dim=1) if tap_blocks else final.new_zeros(final.shape[0], 0, final.shape[1])
            out.append({"final": final, "taps": stacked})
        return out

    def timm_kwargs(self) -> dict:
        """Keyword arguments for ``timm.models.vision_transformer.VisionTransformer`` that give a model whose
        state dict is exactly this one's (``num_classes=0``: no classifier)."""
        kwargs = dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.patch_embed.proj.in_channels,
                      embed_dim=self.embed_dim, depth=self.depth, num_heads=self.blocks[0].attn.num_heads,
                      mlp_ratio=self.blocks[0].mlp.fc1.out_features / self.embed_dim, qkv_bias=True,
                      num_classes=0, global_pool="token")
        if self.arch == "postnorm":
            kwargs.update(pre_norm=True, final_norm=False, block_fn=PostNormBlock, embed_layer=BiasedPatchEmbed)
        return kwargs

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm (B, 1 + N, D), as timm's ``forward_features``."""
        xs = [self.embed(images)]
        for block in self.blocks:
            xs = block(xs)
        return self.norm(xs[0])


def _init_(param: torch.Tensor, init) -> None:
    """``init(param)`` in place. A parameter already partitioned by ``deepspeed.zero.Init`` (the layers inside the
    ViT are, when it is built under it) is initialised as a full fp32 tensor on the host, the same random draws as
    in a plain build, of which this rank keeps its partition: one full tensor at a time, no communication (every
    rank draws the same numbers from the same seed). A meta parameter only has the draws made."""
    from scale_refiner.partition import fill_partition, is_partitioned
    if param.is_meta:  # draw_init: the draws of the full tensor, kept nowhere
        init(torch.empty(param.shape, dtype=torch.float32))
        return
    if not is_partitioned(param):
        init(param)
        return
    full = torch.empty(param.ds_shape, dtype=torch.float32)
    init(full)
    flat = full.view(-1)
    fill_partition(param, lambda start, stop: flat[start:stop])


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """2-D sin-cos position embedding (1 + grid^2, dim), zero for the CLS slot, as MAE initialises it."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def emb(pos):
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    table = torch.cat([emb(xx), emb(yy)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0).float()


def build_vit(model_cfg, device=None, zero_init_config: Optional[dict] = None,
              train: bool = False) -> VisionTransformer:
    """Build from a ``ModelConfig``.

    ``train``: a build that an engine will train (the refiner's and MAE's encoders): ``model.float8`` applies
    to it. Every other build (evaluation, exports, the meta twins that check a weights file) is the plain model,
    whatever the config says.

    ``device='meta'`` constructs without allocating weights; ``zero_init_config`` (a DeepSpeed config dict)
    constructs under ``deepspeed.zero.Init`` (``partition.zero_init``: fp32 partitions), so each rank keeps only
    its partition of every parameter, and a full one exists only while its layer is built and initialised. The
    initial weights are those of a plain build under the same seed.
    """
    dims = resolve_model_dims(model_cfg)
    kwargs = dict(dims, img_size=model_cfg.img_size, in_chans=model_cfg.in_chans, arch=model_cfg.arch)
    if zero_init_config is not None:
        from scale_refiner.partition import zero_init
        with zero_init(zero_init_config):
            model = VisionTransformer(**kwargs)
    elif device is not None:
        with torch.device(device):
            model = VisionTransformer(**kwargs)
    else:
        model = VisionTransformer(**kwargs)
    model.residual_dtype = getattr(model_cfg, "residual_dtype", "compute")
    # model.float8: the trained blocks' linears become float8 before anything compiles them (models/float8.py);
    # the frozen prefix is model.freeze_blocks' blocks, as the refine stage freezes them
    if train and getattr(model_cfg, "float8", False):
        from scale_refiner.models.float8 import convert_trained_linears
        convert_trained_linears(model, first_trained=model_cfg.freeze_blocks)
    # model.compile: here rather than in each method's builder, so the refiner and MAE pre-training get it alike
    # (compiling is lazy: a meta-built model is only wrapped, nothing is traced until a block runs)
    if getattr(model_cfg, "compile", False):
        model.compile_blocks()
    return model


def vit_from_state(model_cfg, state: Dict[str, torch.Tensor]) -> VisionTransformer:
    """A ``VisionTransformer`` holding ``state`` (a full state dict, strictly matched) as its weights: built on
    the meta device and given the tensors as they are, with no random initialisation first (for a 2B encoder
    that alone takes a while on a CPU) and no copy."""
    model = build_vit(model_cfg, device="meta")
    model.load_state_dict(state, assign=True)
    return model
