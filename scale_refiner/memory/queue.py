"""The nearest-neighbour queue: a FIFO of L2-normalised projections with their dataset index, label and step.

In-process form (every rank holds the whole global queue); the sharded form builds on the same semantics:
- empty slots are masked until filled: index -1 (``EMPTY``). Optionally (``queue.init=random``, the released
  code's way) every slot starts filled with a random unit vector instead: index -2 (``RANDOM_FILL``), label -1,
  valid for lookups until the FIFO overwrites it;
- entries with the query's own dataset index are excluded;
- cosine top-k, then one of the k picked uniformly, independently per query, from the queue's own generator
  (its state is part of ``state_dict``, so a resumed run picks the same neighbours). Every rank draws the
  uniforms of the whole global batch and uses its slice, so the picks do not depend on how the global
  batch is split over ranks (a 2-rank run picks what a 1-process run on the same global batch picks);
- while fewer than k valid entries exist, the pick is uniform among the valid ones; a query with no valid
  entry at all (the very first step) is its own neighbour, which turns that term into plain contrastive.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from scale_refiner.precision import as_fp32, fp32_island, to_device_async

EMPTY = -1  # the index of a slot never written: masked
RANDOM_FILL = -2  # the index of a slot holding a random initial vector: searchable, matches no dataset index


def random_rows(size: int, dim: int, seed: int, chunk: int = 1 << 16):
    """The random initial fill of a queue of ``size`` x ``dim``: (first slot, unit rows) chunks, the same
    stream whatever the caller keeps of it (a sharded queue keeps its own slots)."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, size, chunk):
        rows = torch.randn(min(chunk, size - start), dim, generator=generator)
        yield start, rows / rows.norm(dim=1, keepdim=True)


class NNQueue(nn.Module):
    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and dim must be positive, got {size} and {dim}")
        self.size = size
        self.register_buffer("vectors", torch.zeros(size, dim))
        self.register_buffer("indices", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("steps", torch.zeros(size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.generator = torch.Generator().manual_seed(seed)

    # The generator's state travels with the buffers.
    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state):
        self.generator.set_state(state["generator"])

    @property
    def num_filled(self) -> int:
        return int((self.indices != EMPTY).sum())

    @torch.no_grad()
    def random_fill(self, seed: int) -> None:
        """Fill every slot with a random unit vector (``RANDOM_FILL``); the pointer stays at slot 0."""
        for start, rows in random_rows(self.size, self.vectors.shape[1], seed):
            self.vectors[start:start + len(rows)] = rows
        self.indices.fill_(RANDOM_FILL)
        self.labels.fill_(-1)
        self.steps.zero_()

    @torch.no_grad()
    def lookup(self, query: torch.Tensor, query_index: torch.Tensor, k: int,
               query_label: Optional[torch.Tensor] = None, step: int = 0, global_queries: Optional[int] = None,
               offset: int = 0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """query: (Q, d) L2-normalised, rows ``offset .. offset + Q`` of a global batch of ``global_queries``;
        or (V, Q, d): V views of the same Q samples (same ``query_index``), looked up in one search and picked
        exactly as V successive (Q, d) calls would pick (the generator draws view 0's global uniforms first).

        Returns the picked neighbours (Q, d) (or (V, Q, d)) and per-query metrics of shape (Q,) (or (V, Q)):
        similarity, age, found, slot, accuracy (with labels) and ``topk_slots`` (Q, k) (or (V, Q, k)).
        """
        if not 1 <= k <= self.size:
            raise ValueError(f"k={k} must be in 1..{self.size} (the queue size)")
        with fp32_island(query.device):  # similarities and top-k in fp32 whatever the autocast
            return self._lookup(as_fp32(query), query_index, k, query_label, step, global_queries, offset)

    def _lookup(self, query, query_index, k, query_label, step, global_queries, offset):
        views = query.shape[0] if query.dim() == 3 else 0
        flat = query.reshape(-1, query.shape[-1])  # (V*Q, d): one matmul, one top-k for every view
        num = query.shape[-2]
        # one exclusion mask for all views: empty slots and the query's own dataset index
        invalid = (self.indices == EMPTY).unsqueeze(0) | (self.indices.unsqueeze(0) == query_index.unsqueeze(1))
        sims = (flat @ self.vectors.T).view(max(views, 1), num, self.size)
        sims.masked_fill_(invalid, float("-inf"))  # in place: sims is this call's own buffer
        top_sim, top_slot = sims.topk(k, dim=-1)  # sorted, invalid entries last
        num_valid = torch.isfinite(top_sim).sum(-1)
        total = global_queries or num
        draws = torch.stack([torch.rand(total, generator=self.generator) for _ in range(max(views, 1))])
        uniform = to_device_async(draws[:, offset:offset + num], query.device)
        pick = (uniform * num_valid.clamp(min=1)).long().clamp(max=k - 1).unsqueeze(-1)
        slot = top_slot.gather(-1, pick).squeeze(-1)
        found = num_valid > 0
        neighbours = torch.where(found.unsqueeze(-1), self.vectors[slot], query.reshape(max(views, 1), num, -1))
        sim = torch.where(found, top_sim.gather(-1, pick).squeeze(-1), 1.0)
        age = torch.where(found, step - self.steps[slot], 0)
        # the picked and the top-k global slots (-1: none), as the sharded queue reports them
        metrics = {"similarity": sim, "age": age, "found": found, "slot": torch.where(found, slot, -1),
                   "topk_slots": torch.where(torch.isfinite(top_sim), top_slot, -1)}
        if query_label is not None:
            metrics["accuracy"] = (self.labels[slot] == query_label) & found
        if not views:
            neighbours = neighbours.squeeze(0)
            metrics = {key: value.squeeze(0) for key, value in metrics.items()}
        return neighbours, metrics

    @torch.no_grad()
    def enqueue(self, vectors: torch.Tensor, indices: torch.Tensor, labels: Optional[torch.Tensor] = None,
                step: int = 0) -> None:
        """Append (n, d) L2-normalised vectors FIFO, overwriting the oldest entries."""
        n = vectors.shape[0]
        if n > self.size:  # only the newest `size` survive
            vectors, indices = vectors[-self.size:], indices[-self.size:]
            labels = labels[-self.size:] if labels is not None else None
            n = self.size
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.vectors[slots] = vectors.to(self.vectors.dtype)
        self.indices[slots] = indices
        # index_fill_ takes the scalar as a kernel argument; `t[slots] = scalar` would first copy the scalar to
        # the device from pageable memory, a host synchronisation every step (found by tests/test_gpu.py on an H200)
        if labels is not None:
            self.labels[slots] = labels
        else:
            self.labels.index_fill_(0, slots, -1)
        self.steps.index_fill_(0, slots, step)
        self.ptr.copy_((self.ptr + n) % self.size)
