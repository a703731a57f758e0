"""MAE pre-training (He et al., 2022), the masked-image model MIM-Refiner starts from, in one readable place.

    image --patchify--> L patches; a random (1 - mask_ratio) of them, plus the CLS token, go through the
    encoder (the same ``VisionTransformer`` the refiner refines) --decoder_embed--> mask tokens fill the hidden
    positions --decoder blocks--> per-patch pixel predictions; loss = mean squared error on the hidden patches
    against per-patch normalised pixels (``norm_pix_loss``).

The module's encoder is our ViT and its decoder holds MAE's own parameter names, so ``mae_state_dict`` is a
checkpoint in the layout of the official MAE release (``{"model": {...}}``, decoder included), and the refiner
loads it through the same ``weights_format=mae`` path as a downloaded ``mae_pretrain_vit_large.pth``.

Masks come from a generator seeded by (seed, step) over the whole global batch, each rank taking its rows: a
run on W ranks draws the masks of a 1-process run, and a resumed run those of an uninterrupted one.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from timm.models.vision_transformer import Block

from scale_refiner.models.vit import LN_EPS, VisionTransformer, build_vit, sincos_pos_embed
from scale_refiner.precision import as_fp32, fp32_island, to_device_async

ENCODER_PREFIX, DECODER_PREFIX = "encoder.", "decoder."


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder; attribute names are those of MAE's ``MaskedAutoencoderViT``."""

    def __init__(self, embed_dim: int, num_patches: int, patch_pixels: int, decoder_dim: int = 512,
                 depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0):
        super().__init__()
        grid = int(num_patches ** 0.5)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # fixed sin-cos, as in MAE (a parameter that is never trained, so checkpoints carry it)
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_dim, grid).unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=LN_EPS))
            for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=LN_EPS)
        self.decoder_pred = nn.Linear(decoder_dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """latent: (B, 1 + K, D) encoder output (CLS first); restore: (B, L) the inverse of the shuffle.
        Returns (B, L, patch_pixels) predictions for every patch."""
        x = self.decoder_embed(latent)
        batch, visible = x.shape[0], x.shape[1] - 1
        masked = self.mask_token.expand(batch, restore.shape[1] - visible, -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)
        patches = torch.gather(patches, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, patch * patch * C), rows in raster order, pixels (p, q, c) as in MAE."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def mask_noise(views: int, batch: int, num_patches: int, seed: int, step: int, rank: int, world: int,
               device, micro: int = 0) -> torch.Tensor:
    """This rank's rows of the global batch's masking noise, (views * batch, num_patches), drawn from
    (seed, step, micro-batch) alone: view v of the rank's sample i gets global row (v, rank * batch + i)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step + micro * 7_919_000_017)
    noise = torch.rand(views, world * batch, num_patches, generator=generator)
    return to_device_async(noise[:, rank * batch:(rank + 1) * batch].reshape(views * batch, num_patches), device)


class MAEPretrainer(nn.Module):
    def __init__(self, encoder: VisionTransformer, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, mask_ratio: float = 0.75, norm_pix_loss: bool = True, seed: int = 0):
        super().__init__()
        self.encoder = encoder
        self.num_patches = encoder.grid ** 2
        in_chans = encoder.patch_embed.proj.in_channels
        self.decoder = MAEDecoder(encoder.embed_dim, self.num_patches, encoder.patch_size ** 2 * in_chans,
                                  decoder_dim, decoder_depth, decoder_heads)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.seed = seed
        self.queues = None  # nothing per rank beyond parameters and RNG (the trainer's client state)

    # -------------------------------------------------------------------------------- engine interface
    def shard_units(self) -> List[nn.Module]:
        """The modules an FSDP2 engine shards one by one (then the root takes the rest)."""
        return [*self.encoder.blocks, *self.decoder.decoder_blocks]

    @property
    def heads(self) -> nn.Module:
        """What the parameter groups call the non-encoder part: here the decoder (no layer decay)."""
        return self.decoder

    heads_prefix = "decoder"

    def set_stage(self, stage: str, freeze_blocks: int = 0) -> None:
        if stage != "mae":
            raise ValueError(f"stage {stage!r} is not mae")
        self.encoder.freeze(0)
        self.encoder.pos_embed.requires_grad_(False)  # MAE's encoder position embedding is fixed sin-cos
        self.stage = stage

    # ---------------------------------------------------------------------------------------- the step
    def encode_visible(self, images: torch.Tensor, noise: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
        """Encoder on the kept patches. Returns latent (B, 1 + K, D), mask (B, L; 1 = hidden) and restore."""
        enc = self.encoder
        x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
        batch, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise is kept
        restore = torch.argsort(shuffle, dim=1)
        kept = torch.gather(x, 1, shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(batch, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(batch, -1, -1)
        x = enc.norm_pre(enc.residual_cast(torch.cat([cls, kept], dim=1)))  # model.residual_dtype, as embed
        for block in enc.blocks:
            x = block(x)  # each block checkpoints itself as model.checkpointing says (models/vit.py)
        return enc.norm(x), mask, restore

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with fp32_island(pred.device):  # targets, their normalisation and the squared error in fp32
            return self._loss_fp32(as_fp32(images), as_fp32(pred), mask)

    def _loss_fp32(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = patchify(images, self.encoder.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, step: int = 0, micro: int = 0,
                group: Optional[dist.ProcessGroup] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """images: (V, B, C, H, W), V views of B images (or (B, C, H, W)), at the encoder's stored resolution.
        Returns the loss and detached metrics.

        The loss is this rank's mean over its hidden patches; every rank hides the same number, so the mean
        over ranks that data-parallel engines take is the global mean."""
        if images.ndim == 4:
            images = images.unsqueeze(0)
        if images.shape[-1] != self.encoder.img_size or images.shape[-2] != self.encoder.img_size:
            raise ValueError(f"MAE pre-training needs {self.encoder.img_size} px images (model.img_size), got "
                             f"{tuple(images.shape[-2:])}")
        views, batch = images.shape[:2]
        world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        noise = mask_noise(views, batch, self.num_patches, self.seed, step, rank, world, images.device, micro)
        images = images.flatten(0, 1)
        latent, mask, restore = self.encode_visible(images, noise)
        pred = self.decoder(latent, restore)
        loss = self.loss(images, pred, mask)
        return loss, {"loss": loss.detach()}


def build_mae(cfg) -> MAEPretrainer:
    """Encoder (``cfg.model``) + MAE decoder (``cfg.mae``) from a ``PretrainConfig``."""
    encoder = build_vit(cfg.model, train=True)
    encoder.set_grad_checkpointing(cfg.model.checkpointing)
    m = cfg.mae
    return MAEPretrainer(encoder, m.decoder_dim, m.decoder_depth, m.decoder_heads, m.mask_ratio,
                         m.norm_pix_loss, seed=cfg.run.seed)


def mae_state_dict(full_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An ``MAEPretrainer`` state dict in the official MAE layout: encoder keys at the top level
    (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``) beside the decoder's
    (``mask_token``, ``decoder_embed.*``, ``decoder_pos_embed``, ``decoder_blocks.N.*``, ...)."""
    out = {}
    for key, value in full_state.items():
        for prefix in (ENCODER_PREFIX, DECODER_PREFIX):
            if key.startswith(prefix):
                out[key[len(prefix):]] = value
                break
        else:
            raise KeyError(f"unexpected key {key!r} in an MAE pre-training state")
    return out
