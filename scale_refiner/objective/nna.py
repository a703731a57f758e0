"""Nearest-neighbour alignment (NNA) and the NNCLR ("swap negatives") variant, for multi-crop views.

For an anchor global view i and a predicted view v, with B samples per rank and predictions gathered over
all W ranks (with gradient), row b of the logits is

    positive  (j = own sample):  NN(z_i[b]) . p_v[j] / tau
    negatives (j != own sample): z_i[b] . p_v[j] / tau     (NNA: negatives are not swapped)
                                 NN(z_i[b]) . p_v[j] / tau (NNCLR: swapped as well)

and the loss is the cross-entropy with the own sample as target. z and NN(z) carry no gradient; p does.
Pairs: each global view with the other global view, and each global view with every local view
(2 + 2 * n_local terms), averaged; or the released code's indexing (``view_pairs(..., "official")``). All vectors are L2-normalised before any product.
"""
from __future__ import annotations

from functools import cache
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from scale_refiner.precision import as_fp32, fp32_island

VARIANTS = ("nna", "nnclr")


PAIRINGS = ("intended", "official")


def view_pairs(num_local: int, pairing: str = "intended") -> List[Tuple[int, int]]:
    """(anchor global view, predicted view) pairs: views 0, 1 are global, 2.. are local.

    ``intended`` (default): each global view with the other global view and with every local view, no
    self-pairs (2 + 2 n_local pairs). ``official``: the view indexing of the authors' released code, for exact
    comparison with published numbers: each anchor is paired with views 0 .. n_local - 1 (g1, g2, l1 ..
    l_{n-2}), so a self-pair is included and the last two local views are predicted but never used (2 n_local
    pairs; needs n_local >= 2).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing {pairing!r} is not one of {', '.join(PAIRINGS)}")
    pairs = []
    for i in (0, 1):
        if pairing == "official":
            if num_local < 2:
                raise ValueError(f"pairing 'official' needs at least 2 local views, got {num_local}")
            pairs.extend((i, v) for v in range(num_local))
        else:
            pairs.append((i, 1 - i))
            pairs.extend((i, 2 + l) for l in range(num_local))
    return pairs


@cache
def _pair_index(num_local: int, pairing: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors, targets) of ``view_pairs(num_local, pairing)`` as index tensors, built (and copied to the
    device) once."""
    pairs = view_pairs(num_local, pairing)
    index = torch.tensor(pairs, dtype=torch.long).T.contiguous().to(device)
    return index[0], index[1]


def gather_with_grad(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> Tuple[torch.Tensor, int]:
    """Concatenate ``x`` (dim 1 is the batch) over ranks, keeping the gradient; returns (gathered, offset)."""
    if group is None or dist.get_world_size(group) == 1:
        return x, 0
    parts = dist_fn.all_gather(x.contiguous(), group=group)
    return torch.cat(parts, dim=1), dist.get_rank(group) * x.shape[1]


def nna_loss(z: torch.Tensor, nn_z: torch.Tensor, p: torch.Tensor, temperature: float,
             variant: str = "nna", group: Optional[dist.ProcessGroup] = None,
             pairing: str = "intended") -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """z: (2, B, d) projector outputs of the global views; nn_z: (2, B, d) their neighbours from the queue;
    p: (V, B, d) predictor outputs of every view (V = 2 + n_local). Unnormalised inputs are fine.

    Returns the loss (mean over the pairs of ``view_pairs(n_local, pairing)`` and the local batch) and
    detached metrics.

    Computed in fp32 whatever the autocast (precision.py): the inputs are cast up (fp64 stays fp64), so a
    bf16 step's loss, softmax and gradient into ``p`` are those of fp32 logits.
    """
    if variant not in VARIANTS:
        raise ValueError(f"objective variant {variant!r} is not one of {', '.join(VARIANTS)}")
    with fp32_island(p.device):
        return _nna_loss_fp32(as_fp32(z), as_fp32(nn_z), as_fp32(p), temperature, variant, group, pairing)


def _nna_loss_fp32(z, nn_z, p, temperature, variant, group, pairing):
    num_views, batch = p.shape[0], p.shape[1]
    z = F.normalize(z.detach(), dim=-1)
    nn_z = F.normalize(nn_z.detach(), dim=-1)
    p = F.normalize(p, dim=-1)
    p_all, offset = gather_with_grad(p, group)  # (V, W*B, d)
    own = torch.arange(batch, device=p.device) + offset

    anchors, targets = _pair_index(num_views - 2, pairing, p.device)
    neg_query = nn_z if variant == "nnclr" else z
    p_targets = p_all[targets]  # (pairs, W*B, d)
    # logits for every pair at once: (pairs, B, W*B)
    logits = torch.einsum("pbd,pjd->pbj", neg_query[anchors], p_targets) / temperature
    # the own-sample column, from the local p: its gradient is summed apart from the gathered one (reusing
    # p_targets' own rows would change the gradient's summation order, and Adam turns that into drift)
    positive = (nn_z[anchors] * p[targets]).sum(-1) / temperature  # (pairs, B)
    index = own.view(1, batch, 1).expand(len(anchors), batch, 1)
    logits.scatter_(2, index, positive.unsqueeze(-1))  # in place: logits is a fresh tensor no backward reads
    loss = F.cross_entropy(logits.flatten(0, 1), index.flatten())
    with torch.no_grad():
        prob = logits.softmax(-1).gather(2, index).mean()
    return loss, {"positive_prob": prob}
