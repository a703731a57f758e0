"""One nearest-neighbour queue per ID head, behind one interface whether the queues are replicated or sharded.

    queues = build_queues(heads=8, size=65536, dim=256, seed=0, sharded=True, world=W, rank=r, block=B)
    neighbours, metrics = queues.lookup(z, index, k, label, step, group)   # z: (H, V, B, d) unit rows
    queues.enqueue(z[:, 0], index, label, step, group)                      # (H, B, d): view 0 of each head

Both kinds take the same shapes, return the same metric keys (similarity, age, found, slot, topk_slots and,
with labels, accuracy; each (H, V, B), ``topk_slots`` (H, V, B, k)), pick the same neighbours (same seeds,
same global uniforms) and keep the same state-dict keys (``<h>.vectors``, ...: the bank is the ``ModuleList``
of its queues). What differs is where the entries live and so what a step communicates:

    replicated  every rank holds each whole queue (``queue.NNQueue``). Lookup: none. Enqueue: one all-gather
                of every head's rows with their index and label (packed in one tensor).
    sharded     rank r holds 1/W of each queue (``sharded_queue.ShardedNNQueue``). Lookup: four collectives for
                all heads and both views together (``sharded_lookup``). Enqueue: none when the block layout
                keeps every row on its rank, else one all_to_all for all heads.

So a step's collectives do not grow with the number of heads; ``launch/bench_queue.py`` counts and times them.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from scale_refiner.memory.queue import NNQueue
from scale_refiner.memory.sharded_queue import ShardedNNQueue, _pack_long, _unpack_long, sharded_enqueue, \
    sharded_lookup

Lookup = Tuple[torch.Tensor, Dict[str, torch.Tensor]]


def _group_world(group) -> Tuple[int, int]:
    """The replicated queues' view of the group: no group means one process (the refiner's convention)."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class QueueBank(nn.ModuleList):
    """The queues of all heads (``self[h]`` is head h's). ``sharded`` says which kind it is."""
    sharded = False

    def lookup(self, query: torch.Tensor, query_index: torch.Tensor, k: int,
               query_label: Optional[torch.Tensor] = None, step: int = 0, group=None) -> Lookup:
        """query: (H, V, B, d) L2-normalised, this rank's B rows (rank-major in the global batch) of V views of
        the same samples; ``query_index`` / ``query_label``: (B,). Collective for the sharded kind."""
        raise NotImplementedError

    def enqueue(self, vectors: torch.Tensor, indices: torch.Tensor, labels: Optional[torch.Tensor] = None,
                step: int = 0, group=None) -> None:
        """vectors: (H, B, d), this rank's rows for each head's queue; every rank's rows are enqueued (global
        batch order: rank-major). Collective when ``group`` spans more than one rank."""
        raise NotImplementedError

    def _check(self, query: torch.Tensor) -> None:
        if query.dim() != 4 or query.shape[0] != len(self):
            raise ValueError(f"query must be (heads={len(self)}, views, batch, dim), got {tuple(query.shape)}")


class ReplicatedQueues(QueueBank):
    @torch.no_grad()
    def lookup(self, query, query_index, k, query_label=None, step=0, group=None):
        self._check(query)
        world, rank = _group_world(group)
        batch = query.shape[2]
        results = [queue.lookup(query[h], query_index, k, query_label, step, global_queries=world * batch,
                                offset=rank * batch) for h, queue in enumerate(self)]
        return (torch.stack([neighbours for neighbours, _ in results]),
                {key: torch.stack([metrics[key] for _, metrics in results]) for key in results[0][1]})

    @torch.no_grad()
    def enqueue(self, vectors, indices, labels=None, step=0, group=None):
        labels = labels if labels is not None else torch.full_like(indices, -1)
        world, _ = _group_world(group)
        if world > 1:  # one all-gather: every head's rows, the index and the label side by side
            heads, batch, dim = vectors.shape
            row = torch.cat([vectors.float().permute(1, 0, 2).reshape(batch, heads * dim),
                             _pack_long(torch.stack([indices.long(), labels.long()], 1))], dim=1)
            parts = [torch.empty_like(row) for _ in range(world)]
            dist.all_gather(parts, row.contiguous(), group=group)
            rows = torch.cat(parts)
            vectors = rows[:, :heads * dim].reshape(world * batch, heads, dim).transpose(0, 1)
            indices, labels = _unpack_long(rows[:, heads * dim:]).unbind(1)
        for h, queue in enumerate(self):
            queue.enqueue(vectors[h], indices, labels, step)


class ShardedQueues(QueueBank):
    sharded = True

    def lookup(self, query, query_index, k, query_label=None, step=0, group=None):
        self._check(query)
        return sharded_lookup(list(self), query, query_index, k, query_label, step, group)

    def enqueue(self, vectors, indices, labels=None, step=0, group=None):
        sharded_enqueue(list(self), vectors, indices, labels, step, group)


INITS = ("empty", "random")


def build_queues(heads: int, size: int, dim: int, seed: int = 0, sharded: bool = False, world: int = 1,
                 rank: int = 0, block: int = 1, search: str = "torch", init: str = "empty") -> QueueBank:
    """Head h's queue draws its picks from seed ``seed + 1000 h`` in both kinds (so they pick alike).
    ``world`` / ``rank`` / ``block`` / ``search``: the sharded layout and shard search (``sharded_queue``).
    ``init``: ``empty`` (slots masked until written) or ``random`` (every slot a random unit vector, the
    released code's fill, drawn from seed ``seed + 1000 h + 500``: the same global fill in both kinds)."""
    if init not in INITS:
        raise ValueError(f"queue init {init!r} is not one of {', '.join(INITS)}")
    if sharded:
        bank = ShardedQueues(ShardedNNQueue(size, dim, seed=seed + 1000 * h, world=world, rank=rank, block=block,
                                            search=search) for h in range(heads))
    else:
        bank = ReplicatedQueues(NNQueue(size, dim, seed=seed + 1000 * h) for h in range(heads))
    if init == "random":
        for h, queue in enumerate(bank):
            queue.random_fill(seed + 1000 * h + 500)
    return bank
