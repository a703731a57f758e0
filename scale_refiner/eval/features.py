"""Feature extraction for the evaluation protocols, in eval mode, batched, optionally spread over ranks.

- ``extract_cls``: the CLS token after the final norm (what k-NN, low-shot and k-means read).
- ``extract_block_features``: per batch one pass over the blocks that keeps, for every block, the raw CLS
  token (the model's taps, the per-block k-NN of the paper's Fig. 3b) and, for the last ``last_n`` blocks,
  the CLS token after the final norm plus the mean of the last block's normed patch tokens (the linear probe's
  inputs, as DINOv2's ``get_intermediate_layers(n, norm=True)`` + ``avgpool``).
- ``extract_distributed``: any of the above over ranks. The data is cut into batches of ``batch_size`` in
  order; rank r runs a contiguous run of whole batches, and the results are all-gathered in rank order. Every
  sample therefore goes through the model in exactly the batch it would be in on one process, so features
  (and every metric computed from them) are bit-identical on 1 and N ranks. Each rank runs the same number of
  forward calls (a rank past the end repeats its first batch and discards it), so the same code is safe with
  an encoder whose forward is itself collective (ZeRO-3, FSDP2).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist


@torch.no_grad()
def extract_cls(encoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    was_training = encoder.training
    encoder.eval()
    feats = [encoder([images[i:i + batch_size]])[0]["final"].float() for i in range(0, len(images), batch_size)]
    encoder.train(was_training)
    return torch.cat(feats)


def _final_norm(encoder):
    return encoder.norm  # Identity for post-norm models (their blocks end normalised)


FEATURE_KEYS = frozenset({"taps", "final", "last_cls", "mean_patch"})


@torch.no_grad()
def block_features_batch(encoder, images: torch.Tensor, last_n: int = 4) -> Dict[str, torch.Tensor]:
    """One batch through the blocks of a ``VisionTransformer``; returns (float32, on the model's device)

    ``taps`` (B, depth, D)    raw CLS after every block (== ``encoder(x, tap_blocks=range(depth))[0]['taps']``)
    ``final`` (B, D)          CLS after the final norm (== ``encoder(x)[0]['final']``)
    ``last_cls`` (B, n, D)    final-norm CLS of the last n = min(last_n, depth) blocks, in block order
    ``mean_patch`` (B, D)     mean over patch tokens of the last block, after the final norm
    """
    depth = len(encoder.blocks)
    n = min(last_n, depth)
    norm = _final_norm(encoder)
    x = encoder.embed(images)
    taps, last_cls = [], []
    for i, block in enumerate(encoder.blocks):
        x = block(x)
        taps.append(x[:, 0])
        if i >= depth - n:
            last_cls.append(norm(x[:, 0]))
    normed = norm(x)
    return {"taps": torch.stack(taps, 1).float(), "final": last_cls[-1].float(),
            "last_cls": torch.stack(last_cls, 1).float(), "mean_patch": normed[:, 1:].mean(1).float()}


def extract_distributed(fn: Callable[[torch.Tensor], Dict[str, torch.Tensor]], images: torch.Tensor,
                        batch_size: int = 256, rank: int = 0, world: int = 1,
                        device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
    """``fn(batch) -> {name: (B, ...) tensor}`` over all of ``images`` (every rank passes the same images);
    returns the full outputs in order, float32 on the CPU, on every rank. With ``world == 1`` no collective
    is used."""
    if len(images) == 0:
        raise ValueError("no images to extract features from (empty split)")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    n = len(images)
    num_batches = math.ceil(n / batch_size)
    per_rank = math.ceil(num_batches / world)
    mine = range(rank * per_rank, min((rank + 1) * per_rank, num_batches))
    outputs, template = [], None
    for step in range(per_rank):
        b = mine.start + step
        real = b < mine.stop
        batch = images[b * batch_size:(b + 1) * batch_size] if real else images[:batch_size]
        out = template = fn(batch.to(device, non_blocking=True))
        if real:
            outputs.append(out)
    if world == 1:
        return {k: torch.cat([o[k] for o in outputs]).float().cpu() for k in outputs[0]}
    # A rank with no real batch (more ranks than batches) takes names and shapes from its discarded batch.
    rows = per_rank * batch_size
    result = {}
    for key in sorted(template):
        local = (torch.cat([o[key] for o in outputs]) if outputs
                 else template[key][:0]).float().to(device)
        padded = local.new_zeros((rows,) + tuple(local.shape[1:]))
        padded[:len(local)] = local
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        parts = []
        for r in range(world):
            start = r * per_rank * batch_size
            count = max(0, min(n - start, rows))
            parts.append(gathered[r][:count])
        result[key] = torch.cat(parts).cpu()
    return result


def extract_features(encoder, images: torch.Tensor, batch_size: int = 256, last_n: int = 4,
                     rank: Optional[int] = None, world: Optional[int] = None,
                     device: Optional[torch.device] = None,
                     keys: Optional[Sequence[str]] = None,
                     autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """``block_features_batch`` over ``images``; distributed over the default process group when one is
    initialised with more than one rank (``rank``/``world`` default to it). ``keys`` keeps only those outputs
    (the per-block taps are depth times the size of the rest: drop them when no per-block k-NN is run).
    ``autocast_dtype`` (bf16 on a GPU) runs the forward under autocast; the features come back fp32."""
    wanted = None if keys is None else set(keys)
    if wanted is not None and not wanted <= FEATURE_KEYS:
        raise ValueError(f"unknown feature keys {sorted(wanted - FEATURE_KEYS)}; known: {sorted(FEATURE_KEYS)}")
    if rank is None or world is None:
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = 0, 1
    if device is None:
        device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    try:
        def fn(x):
            with (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype not in (None, torch.float32)
                  else contextlib.nullcontext()):
                out = block_features_batch(encoder, x, last_n)
            return out if wanted is None else {k: v for k, v in out.items() if k in wanted}
        return extract_distributed(fn, images, batch_size, rank, world, device)
    finally:
        encoder.train(was_training)
