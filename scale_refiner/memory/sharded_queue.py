"""The NN queue sharded across ranks: each rank stores ~1/W of the global FIFO, with the semantics of the
replicated ``NNQueue`` (queue.py) fed the same enqueue history.

Global slot layout (fixed, independent of the step):
    the global FIFO has ``size`` slots written exactly as ``NNQueue`` writes them (``ptr`` advances by the
    global batch, wraps, a global batch larger than the queue keeps its newest ``size`` rows). Slots are cut
    into blocks of ``block`` consecutive slots dealt round-robin to the ranks:
        owner(s) = (s // block) % W,   local(s) = (s // (block * W)) * block + s % block
    so a rank stores ``capacity = ceil(ceil(size / block) / W) * block`` rows (the unused tail rows, when the
    size is not a multiple of ``block * W``, stay empty). With ``block`` = the per-rank batch and
    ``W * batch`` dividing ``size`` (the usual case), every rank's own rows land in its own shard and the
    enqueue needs no communication; otherwise one ``all_to_all`` sends each row to its owner (B rows per
    rank, against the W*B rows per rank of the replicated all-gather).

Lookup (collective; Q = W * B queries, B per rank, equal on every rank):
    1. all-gather the queries with their dataset indices (one packed fp32 tensor);
    2. search the shard for all Q queries (``search.py``). The torch search scores every row and masks empty
       rows and the query's own dataset index to -inf before one top-k: fixed shapes, no host read. faiss and
       ivf search only the filled rows and drop the query's own index by asking for k + e results and growing
       e for the rows that lost too many (exact: a row is accepted once it keeps k results or the shard is
       exhausted; a row count and a retry loop on the host);
    3. ``all_to_all`` the per-shard top-k (score, global slot) to the rank that owns each query;
    4. merge into the global top-k ordered by score descending, then global slot ascending;
    5. pick one of them with the uniforms the replicated queue draws (the whole global batch from the
       queue's own generator, this rank's slice): ``pick = floor(u * num_valid)``;
    6. fetch the picked vectors with their step and label from their owners (two ``all_to_all``: requests,
       answers) and return them with the metrics (similarity, age, accuracy, found).
Warm-up (empty slots masked, fewer than k valid entries: pick among the valid ones, none: the query itself)
and exclusion behave as in ``NNQueue`` because both work on the same global candidate set.

No host sync in a steady-state step (torch search): where a global batch goes depends only on the pointer and
the batch sizes, so the pointer has a host mirror (``host_ptr``; read from the buffer only when something else
wrote it, e.g. a load) from which the host routes rows (local or ``all_to_all``, the split sizes); the rows'
destinations are computed on the device, the index check is a device-side assert, and the pick, fetch and
write use device indices only (``tests/test_hostsync.py`` checks it on the CPU, ``tests/test_gpu.py`` on a GPU).

Equivalence with ``NNQueue``: identical top-k sets, order and picks, except (a) exactly tied scores, whose
order ``torch.topk`` leaves unspecified (this queue uses the slot order), and (b) dot products that differ
in the last bit between two BLAS calls and so reorder two candidates within one ulp. Neither happens in the
tests; for float projections both are measure-zero events and either pick is a valid uniform pick.

Checkpoints: ``state_dict`` holds this rank's shard, the global ``ptr`` and the generator (extra state, with
the layout). Loading checks the layout; resuming at another world size goes through ``global_state`` (a
world-independent state identical to ``NNQueue.state_dict``) and ``reshard_states`` / ``from_global_state``;
``load_state_dict`` also accepts a replicated ``NNQueue`` state and takes this rank's slots from it.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from scale_refiner.memory.queue import EMPTY, RANDOM_FILL, random_rows
from scale_refiner.memory.search import Search, TorchMatmul, make_search
from scale_refiner.precision import fp32_island, to_device_async


def _world(group) -> Tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _pack_long(t: torch.Tensor) -> torch.Tensor:
    """int64 (..., n) -> float32 (..., 2n) by reinterpreting the bytes (exact through any copy collective)."""
    return t.long().contiguous().view(torch.float32)


def _unpack_long(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64)


def _all_gather(t: torch.Tensor, group, world: int) -> torch.Tensor:
    if world == 1:
        return t.unsqueeze(0)
    t = t.contiguous()  # first: empty_like keeps a permuted tensor's strides, and the collective writes flat
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return torch.stack(out)


def _all_to_all(t: torch.Tensor, group, world: int) -> torch.Tensor:
    """t: (W, ...) where row s goes to rank s; returns (W, ...) where row s came from rank s."""
    if world == 1:
        return t
    t = t.contiguous()  # first: empty_like keeps a permuted tensor's strides, and the collective writes flat
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t, group=group)
    return out


class ShardedNNQueue(nn.Module):
    def __init__(self, size: int, dim: int, seed: int = 0, world: int = 1, rank: int = 0, block: int = 1,
                 search: str = "faiss", search_kwargs: Optional[Dict] = None):
        super().__init__()
        if size <= 0 or dim <= 0 or block <= 0:
            raise ValueError(f"queue size, dim and block must be positive, got {size}, {dim} and {block}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside 0..{world - 1}")
        self.size, self.dim, self.world, self.rank, self.block = size, dim, world, rank, block
        blocks = -(-size // block)
        self.capacity = -(-blocks // world) * block
        # rows [0, n_slots) map to global slots < size (the mapping is increasing in the local row)
        self.n_slots = int((self.global_slot(torch.arange(self.capacity)) < size).sum())
        self.register_buffer("vectors", torch.zeros(self.capacity, dim))
        self.register_buffer("indices", torch.full((self.capacity,), -1, dtype=torch.long))
        self.register_buffer("labels", torch.full((self.capacity,), -1, dtype=torch.long))
        self.register_buffer("steps", torch.zeros(self.capacity, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # global, the same on every rank
        # the pointer's host mirror: where a batch goes depends only on the batch sizes, so the host knows it
        # without reading the device; re-read (one sync) only when something else wrote the buffer (a load)
        self._ptr_host, self._ptr_key = 0, None
        self.generator = torch.Generator().manual_seed(seed)
        self.search_name, self.search_kwargs = search, dict(search_kwargs or {})
        self.searcher: Search = make_search(search, dim, **self.search_kwargs)

    # ---------------------------------------------------------------------------------------- layout
    def owner(self, slot: torch.Tensor) -> torch.Tensor:
        return (slot // self.block) % self.world

    def local(self, slot: torch.Tensor) -> torch.Tensor:
        return (slot // (self.block * self.world)) * self.block + slot % self.block

    def global_slot(self, row: torch.Tensor, rank: Optional[int] = None) -> torch.Tensor:
        rank = self.rank if rank is None else rank
        return (row // self.block) * self.block * self.world + rank * self.block + row % self.block

    def _ptr_buffer_key(self):
        return id(self.ptr), self.ptr._version, self.ptr.data_ptr()

    def host_ptr(self) -> int:
        """The global pointer, from its host mirror (read from the buffer only after another writer)."""
        if self._ptr_key != self._ptr_buffer_key():
            self._ptr_host = int(self.ptr)
            self._ptr_key = self._ptr_buffer_key()
        return self._ptr_host

    def _set_ptr(self, value: int) -> None:
        self.ptr.fill_(value)  # a kernel argument: no host-to-device copy
        self._ptr_host, self._ptr_key = value, self._ptr_buffer_key()

    @property
    def num_filled(self) -> int:
        """Filled rows of this rank's shard (the global count is the sum over ranks)."""
        return int((self.indices != EMPTY).sum())

    @torch.no_grad()
    def random_fill(self, seed: int) -> None:
        """This rank's slots of ``NNQueue.random_fill(seed)``'s global fill (the global stream is drawn chunk by
        chunk on every rank; each keeps its own rows)."""
        for start, rows in random_rows(self.size, self.dim, seed):
            slots = torch.arange(start, start + len(rows))
            mine = self.owner(slots) == self.rank
            local = self.local(slots[mine])
            self.vectors[local] = rows[mine]
            self.indices[local] = RANDOM_FILL
            self.labels[local] = -1
            self.steps[local] = 0
        if self.searcher.stateful:
            rows = (self.indices != EMPTY).nonzero().squeeze(1)
            self.searcher.update(rows, self.vectors[rows])

    # ---------------------------------------------------------------------------------------- state
    def get_extra_state(self):
        return {"generator": self.generator.get_state(), "layout": torch.tensor(
            [self.size, self.dim, self.world, self.rank, self.block])}

    def set_extra_state(self, state):
        self.generator.set_state(state["generator"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None and "layout" not in extra and prefix + "vectors" in state_dict:
            # a replicated NNQueue state: take this rank's slots from it
            full = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if full["vectors"].shape[0] != self.size:
                error_msgs.append(f"{prefix}: replicated queue of {full['vectors'].shape[0]} entries cannot load "
                                  f"into a queue of {self.size}")
                return
            mine = from_global_state(full, self.world, self.rank, self.block)
            state_dict = dict(state_dict)
            state_dict.update({prefix + k: v for k, v in mine.items()})
        elif extra is not None:
            layout = [int(x) for x in extra["layout"]]
            want = [self.size, self.dim, self.world, self.rank, self.block]
            if layout != want and layout[:3] + layout[4:] == want[:3] + want[4:]:
                # another rank's shard of the same layout: what an engine's rank-0 / deduplicated model state
                # holds; the trainer then restores each rank's own shard from its client file
                warnings.warn(f"{prefix or 'queue'}: loading rank {layout[3]}'s shard into rank {self.rank}; "
                              f"restore this rank's own shard (client state) before training", stacklevel=2)
            elif layout != want:
                raise ValueError(
                    f"{prefix or 'queue'}: shard written with (size, dim, world, rank, block)={tuple(layout)} cannot "
                    f"load into {tuple(want)}; re-shard the per-rank states offline with "
                    f"scale_refiner.memory.sharded_queue.reshard_states(states, world={self.world}, "
                    f"block={self.block}) (or load their global_state())")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.searcher.stateful:  # rebuild the approximate index from the loaded shard
            self.searcher = make_search(self.search_name, self.dim, **self.search_kwargs)
            rows = (self.indices != EMPTY).nonzero().squeeze(1)
            if len(rows):
                self.searcher.update(rows, self.vectors[rows])

    def global_state(self, group=None) -> Dict[str, torch.Tensor]:
        """Collective: the whole queue as ``NNQueue.state_dict()`` would hold it (world-size independent)."""
        if group is None and self.world > 1:
            group = dist.group.WORLD
        world, _ = _world(group)
        if world != self.world:
            raise ValueError(f"queue laid out for {self.world} ranks, group has {world}")
        shards = [{k: v for k, v in self.state_dict().items() if k != "_extra_state"}]
        if world > 1:
            shards = [None] * world
            dist.all_gather_object(shards, {k: v.cpu() for k, v in self.state_dict().items()
                                            if k != "_extra_state"}, group=group)
        return _merge_shards(shards, self.size, self.dim, self.world, self.block,
                             {"generator": self.generator.get_state()})

    # ---------------------------------------------------------------------------------------- enqueue
    @torch.no_grad()
    def enqueue(self, vectors: torch.Tensor, indices: torch.Tensor, labels: Optional[torch.Tensor] = None,
                step: int = 0, group=None) -> None:
        """Collective. This rank's (B, d) rows of a global batch of W*B (rank-major, as the all-gather orders
        them); B must be the same on every rank."""
        sharded_enqueue([self], vectors.unsqueeze(0), indices, labels, step, group)

    def _write(self, rows: torch.Tensor, vectors, indices, labels, steps) -> None:
        self.vectors[rows] = vectors.to(self.vectors.dtype)
        self.indices[rows] = indices
        self.labels[rows] = labels
        self.steps[rows] = steps
        if self.searcher.stateful:
            self.searcher.update(rows, self.vectors[rows])

    # ---------------------------------------------------------------------------------------- lookup
    @torch.no_grad()
    def _search_shard(self, queries: torch.Tensor, query_index: torch.Tensor, k: int):
        """Top-k of this shard for every query, own dataset index and empty rows excluded, ordered by score
        descending then global slot ascending. Returns scores (Q, k) (-inf pad) and global slots (Q, k) (-1)."""
        nq = queries.shape[0]
        device = self.vectors.device
        out_s = torch.full((nq, k), float("-inf"), device=device)
        out_g = torch.full((nq, k), -1, dtype=torch.long, device=device)
        if isinstance(self.searcher, TorchMatmul):
            return self._search_shard_masked(queries, query_index, k, out_s, out_g)
        valid = self.indices != EMPTY
        nvalid = int(valid.sum())
        if nvalid == 0:
            return out_s, out_g
        if self.searcher.stateful:
            base, rowmap = None, None
        elif nvalid == self.n_slots and bool(valid[:self.n_slots].all()):
            base, rowmap = self.vectors[:self.n_slots], None  # a view: no copy once the queue is full
        else:
            rowmap = valid.nonzero().squeeze(1)
            base = self.vectors[rowmap]
        todo = torch.arange(nq, device=device)
        extra = 1
        while len(todo):
            kk = min(k + extra, nvalid)
            scores, ids = self.searcher.search(queries[todo], base, kk)
            scores, ids = scores.to(device), ids.to(device)
            missing = ids < 0
            rows = ids.clamp(min=0) if rowmap is None else rowmap[ids.clamp(min=0)]
            bad = missing | (self.indices[rows] == query_index[todo].unsqueeze(1))
            kept = (~bad).sum(1)
            done = (kept >= k) | (kk >= nvalid)  # exact: the filtered top-kk holds the top-k
            if not self.searcher.exact:
                done |= missing.any(1)  # the index found fewer than asked: asking for more gives no more
            d = done.nonzero().squeeze(1)
            if len(d):
                s = scores[d].masked_fill(bad[d], float("-inf"))
                g = torch.where(bad[d], torch.full_like(rows[d], -1), self.global_slot(rows[d]))
                # order: score desc, then global slot asc (stable sorts); invalid last
                order = torch.sort(torch.where(g < 0, torch.full_like(g, self.size), g), dim=1, stable=True).indices
                s, g = s.gather(1, order), g.gather(1, order)
                order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
                s, g = s.gather(1, order), g.gather(1, order)
                width = s.shape[1]
                out_s[todo[d], :width] = s
                out_g[todo[d], :width] = g
            todo = todo[~done]
            extra *= 4
        return out_s, out_g

    def _search_shard_masked(self, queries, query_index, k, out_s, out_g):
        """``_search_shard`` for the torch search, with fixed shapes and no host read: every row of the shard is
        scored, empty rows and the query's own dataset index are masked to -inf before one top-k (what
        ``NNQueue`` does), so no row count, ``nonzero`` or retry loop depends on the data. The same top-k sets
        and order as the filtered search; rows of the shard are in global-slot order."""
        n = self.n_slots
        kk = min(k, n)
        base, stored = self.vectors[:n], self.indices[:n]
        rows_per = max(1, self.searcher.chunk_elems // max(1, n))
        for start in range(0, queries.shape[0], rows_per):
            stop = min(start + rows_per, queries.shape[0])
            scores = queries[start:stop] @ base.T
            invalid = (stored == EMPTY).unsqueeze(0) | (stored.unsqueeze(0) == query_index[start:stop].unsqueeze(1))
            scores.masked_fill_(invalid, float("-inf"))
            s, rows = scores.topk(kk, dim=1)
            g = torch.where(torch.isfinite(s), self.global_slot(rows), torch.full_like(rows, -1))
            # order: score desc, then global slot asc (stable sorts); invalid last
            order = torch.sort(torch.where(g < 0, torch.full_like(g, self.size), g), dim=1, stable=True).indices
            s, g = s.gather(1, order), g.gather(1, order)
            order = torch.sort(s, dim=1, descending=True, stable=True).indices
            out_s[start:stop, :kk] = s.gather(1, order)
            out_g[start:stop, :kk] = g.gather(1, order)
        return out_s, out_g

    @torch.no_grad()
    def lookup(self, query: torch.Tensor, query_index: torch.Tensor, k: int,
               query_label: Optional[torch.Tensor] = None, step: int = 0, global_queries: Optional[int] = None,
               offset: Optional[int] = None, group=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Collective. query: (B, d) L2-normalised, this rank's rows of the global batch (rank-major).
        Same returns as ``NNQueue.lookup``. ``global_queries`` / ``offset`` are checked, not needed (k, the group
        and the layout are checked by ``sharded_lookup``)."""
        batch = query.shape[0]
        if global_queries is not None and global_queries != self.world * batch:
            raise ValueError(f"sharded lookup needs equal batches: global_queries={global_queries} != "
                             f"{self.world}x{batch}")
        if offset is not None and offset != self.rank * batch:
            raise ValueError(f"offset {offset} != rank * batch = {self.rank * batch}")
        neighbours, metrics = sharded_lookup([self], query.unsqueeze(0).unsqueeze(0), query_index, k, query_label,
                                             step, group)
        return neighbours[0, 0], {key: value[0, 0] for key, value in metrics.items()}


def _check_one_layout(queues: Sequence[ShardedNNQueue], group, what: str):
    """The queues' common (world, rank) and the group they run on; they must share one layout."""
    q0 = queues[0]
    for q in queues[1:]:
        if (q.size, q.dim, q.world, q.rank, q.block, q.host_ptr()) != (q0.size, q0.dim, q0.world, q0.rank, q0.block,
                                                                       q0.host_ptr()):
            raise ValueError(f"{what} needs queues of one layout and pointer")
    if group is None and q0.world > 1:
        group = dist.group.WORLD
    world, rank = _world(group)
    if (world, rank) != (q0.world, q0.rank):
        raise ValueError(f"queue laid out for rank {q0.rank} of {q0.world}, called on {rank} of {world}")
    return group, world, rank


@torch.no_grad()
def sharded_lookup(queues: Sequence[ShardedNNQueue], query: torch.Tensor, query_index: torch.Tensor, k: int,
                   query_label: Optional[torch.Tensor] = None, step: int = 0,
                   group=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Collective: the lookups of several queues of one layout (one per head) for V views of this rank's B
    queries, in four collectives whatever the number of queues and views (the steps of the module docstring,
    each done once for all of them). query: (H, V, B, d), ``query[h]`` looked up in ``queues[h]``; the views
    share ``query_index`` (B,). Picks are those of H x V successive single lookups (each queue's generator
    draws view 0's global uniforms first). Returns neighbours (H, V, B, d) and metrics (H, V, B)
    (``topk_slots``: (H, V, B, k))."""
    if query.dim() != 4 or query.shape[0] != len(queues):
        raise ValueError(f"query must be (queues={len(queues)}, views, batch, dim), got {tuple(query.shape)}")
    if not 1 <= k <= queues[0].size:
        raise ValueError(f"k={k} must be in 1..{queues[0].size} (the queue size)")
    group, world, rank = _check_one_layout(queues, group, "sharded_lookup")
    device = queues[0].vectors.device
    with fp32_island(device):  # the shard search (a matmul for queue.search=torch) in fp32 under autocast
        return _sharded_lookup(queues, query, query_index, k, query_label, step, group, world, rank, device)


def _sharded_lookup(queues, query, query_index, k, query_label, step, group, world, rank, device):
    q0 = queues[0]
    heads, views, batch, dim = query.shape
    q = query.detach().to(device, torch.float32)
    # 1. every query of the global batch (all heads and views in one row per sample), with its dataset index
    packed = torch.cat([q.permute(2, 0, 1, 3).reshape(batch, heads * views * dim),
                        _pack_long(query_index.to(device).unsqueeze(1))], dim=1)
    allq = _all_gather(packed, group, world).view(world * batch, -1)
    gq = allq[:, :heads * views * dim].reshape(world * batch, heads, views, dim)
    gidx = _unpack_long(allq[:, heads * views * dim:]).squeeze(1)
    # 2. each head's shard top-k for the global queries of every view (one search per head)
    scores, slots = [], []
    for h, queue in enumerate(queues):
        s, g = queue._search_shard(gq[:, h].transpose(0, 1).reshape(views * world * batch, dim).contiguous(),
                                   gidx.repeat(views), k)
        scores.append(s.view(views, world, batch, k))
        slots.append(g.view(views, world, batch, k))
    # 3. send each rank the candidates of its queries: (W to, H, V, B, 3k)
    cand = torch.cat([torch.stack(scores), _pack_long(torch.stack(slots))], dim=-1).permute(2, 0, 1, 3, 4)
    cand = _all_to_all(cand, group, world)  # (W from, H, V, B, 3k)
    cs = cand[..., :k].permute(1, 2, 3, 0, 4).reshape(heads, views, batch, world * k)
    cg = _unpack_long(cand[..., k:]).permute(1, 2, 3, 0, 4).reshape(heads, views, batch, world * k)
    # 4. global top-k: score desc, then global slot asc
    order = torch.sort(torch.where(cg < 0, torch.full_like(cg, q0.size), cg), dim=-1, stable=True).indices
    cs, cg = cs.gather(-1, order), cg.gather(-1, order)
    order = torch.sort(cs, dim=-1, descending=True, stable=True).indices[..., :k]
    top_s, top_g = cs.gather(-1, order), cg.gather(-1, order)
    # 5. the replicated queue's uniforms: per queue, view 0's global draws first
    num_valid = torch.isfinite(top_s).sum(-1)
    draws = torch.stack([torch.stack([torch.rand(world * batch, generator=queue.generator) for _ in range(views)])
                         for queue in queues])
    uniform = to_device_async(draws[..., rank * batch:(rank + 1) * batch], device)
    pick = (uniform * num_valid.clamp(min=1)).long().clamp(max=k - 1).unsqueeze(-1)
    slot = top_g.gather(-1, pick).squeeze(-1)
    sim = top_s.gather(-1, pick).squeeze(-1)
    found = num_valid > 0
    # 6. fetch the picked entries from their owners: requests (W to, H, V, B) of local rows, -1 for none
    owner = torch.where(found, q0.owner(slot), torch.full_like(slot, -1))
    ranks = torch.arange(world, device=device).view(world, 1, 1, 1)
    req = torch.where(owner.unsqueeze(0) == ranks, q0.local(slot.clamp(min=0)).unsqueeze(0),
                      torch.full_like(slot, -1).unsqueeze(0))
    rows = _all_to_all(req, group, world).clamp(min=0)  # (W from, H, V, B): rows of my shards rank s asks for
    ans = torch.stack([torch.cat([queue.vectors[rows[:, h]], _pack_long(torch.stack(
        [queue.steps[rows[:, h]], queue.labels[rows[:, h]]], -1))], -1) for h, queue in enumerate(queues)], dim=1)
    ans = _all_to_all(ans, group, world)  # (W owner, H, V, B, d + 4)
    mine = ans.gather(0, owner.clamp(min=0).unsqueeze(0).unsqueeze(-1).expand(1, heads, views, batch,
                                                                              ans.shape[-1])).squeeze(0)
    entry_step, entry_label = _unpack_long(mine[..., dim:]).unbind(-1)
    neighbours = torch.where(found.unsqueeze(-1), mine[..., :dim], q).to(query.dtype)
    sim = torch.where(found, sim, torch.ones_like(sim)).to(query.dtype)
    metrics = {"similarity": sim, "age": torch.where(found, step - entry_step, torch.zeros_like(entry_step)),
               "found": found, "slot": torch.where(found, slot, torch.full_like(slot, -1)), "topk_slots": top_g}
    if query_label is not None:
        metrics["accuracy"] = (entry_label == query_label.to(device)) & found
    return neighbours, metrics

@torch.no_grad()
def sharded_enqueue(queues: Sequence[ShardedNNQueue], vectors: torch.Tensor, indices: torch.Tensor,
                    labels: Optional[torch.Tensor] = None, step: int = 0, group=None) -> None:
    """Collective: enqueue this rank's rows into several queues of one layout (e.g. one per head) with at most
    one ``all_to_all`` for all of them. vectors: (H, B, d), one row block per queue; indices/labels: (B,)."""
    q0 = queues[0]
    group, world, rank = _check_one_layout(queues, group, "sharded_enqueue")
    # checked on the device (raises at once on the CPU, a device-side assert on a GPU): no host read
    torch._assert_async((indices >= 0).all(), "dataset indices must be >= 0 (-1 marks an empty slot)")
    heads, batch, dim = vectors.shape
    device = q0.vectors.device
    size, ptr = q0.size, q0.host_ptr()
    labels = labels if labels is not None else torch.full_like(indices, -1)
    n = world * batch
    kept = min(n, size)
    first = n - kept  # rows of the global batch before this one are overwritten within the batch itself
    # where every row of the global batch goes (every rank computes the same table)
    g = torch.arange(n)
    dest = (ptr + g - first) % size
    keep = g >= first
    dest_owner = torch.where(keep, q0.owner(dest), torch.full_like(dest, -1)).view(world, batch)
    # this rank's rows of that table, computed on the device from the same integers (no host-to-device copy)
    my_g = torch.arange(rank * batch, (rank + 1) * batch, device=device)
    my_dest = (my_g + (ptr - first)) % size
    my_owner = torch.where(my_g >= first, q0.owner(my_dest), torch.full_like(my_dest, -1))
    payload = torch.cat([vectors.to(device, torch.float32).permute(1, 0, 2).reshape(batch, heads * dim),
                         _pack_long(torch.stack([indices.to(device), labels.to(device),
                                                 torch.full_like(indices, step, device=device),
                                                 my_dest], 1))], 1)  # (B, H*d + 8)
    local_only = bool((dest_owner[dest_owner >= 0] == torch.arange(world).unsqueeze(1).expand(world, batch)[
        dest_owner >= 0]).all())
    if world == 1 or local_only:
        # every kept row stays on its rank: this rank's kept rows, a suffix (rows before ``first`` are dropped)
        recv = payload[max(0, first - rank * batch):]
    else:
        order = torch.sort(torch.where(my_owner < 0, torch.full_like(my_owner, world), my_owner), stable=True).indices
        send = payload[order]
        send_counts = [int((dest_owner[rank] == s).sum()) for s in range(world)]
        recv_counts = [int((dest_owner[s] == rank).sum()) for s in range(world)]
        send = send[:sum(send_counts)]
        recv = torch.empty(sum(recv_counts), payload.shape[1], device=device)
        dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=group)
    if len(recv):
        meta = _unpack_long(recv[:, heads * dim:])
        rows = q0.local(meta[:, 3])
        for h, q in enumerate(queues):
            q._write(rows, recv[:, h * dim:(h + 1) * dim], meta[:, 0], meta[:, 1], meta[:, 2])
    for q in queues:
        q._set_ptr((ptr + kept) % size)


# -------------------------------------------------------------------------------------------- re-sharding
def _merge_shards(shards: List[Dict], size: int, dim: int, world: int, block: int, extra: Dict) -> Dict:
    layout = ShardedNNQueue.__new__(ShardedNNQueue)
    layout.size, layout.world, layout.block = size, world, block
    out = {"vectors": torch.zeros(size, dim), "indices": torch.full((size,), -1, dtype=torch.long),
           "labels": torch.full((size,), -1, dtype=torch.long), "steps": torch.zeros(size, dtype=torch.long),
           "ptr": shards[0]["ptr"].detach().cpu().clone(), "_extra_state": extra}
    for r, shard in enumerate(shards):
        rows = torch.arange(shard["vectors"].shape[0])
        slots = ShardedNNQueue.global_slot(layout, rows, r)
        ok = slots < size
        for key in ("vectors", "indices", "labels", "steps"):
            out[key][slots[ok]] = shard[key].detach().cpu()[ok]
    return out


def from_global_state(state: Dict, world: int, rank: int, block: int = 1) -> Dict:
    """This rank's shard state from a global (``NNQueue``-format) state."""
    size, dim = state["vectors"].shape
    q = ShardedNNQueue(size, dim, world=world, rank=rank, block=block, search="torch")
    rows = torch.arange(q.capacity)
    slots = q.global_slot(rows)
    ok = slots < size
    out = {k: v.clone() for k, v in q.state_dict().items() if k != "_extra_state"}
    for key in ("vectors", "indices", "labels", "steps"):
        out[key][rows[ok]] = state[key].detach().cpu()[slots[ok]]
    out["ptr"] = state["ptr"].detach().cpu().clone()
    gen = state["_extra_state"]["generator"] if "_extra_state" in state else torch.Generator().get_state()
    out["_extra_state"] = {"generator": gen, "layout": torch.tensor([size, dim, world, rank, block])}
    return out


def global_state_from_shards(states: Sequence[Dict]) -> Dict:
    """Offline: the ``NNQueue``-format state from every rank's ``state_dict`` (ordered by rank)."""
    size, dim, world, _, block = [int(x) for x in states[0]["_extra_state"]["layout"]]
    if len(states) != world:
        raise ValueError(f"{len(states)} shard states given, the queue was laid out for {world}")
    return _merge_shards(states, size, dim, world, block, {"generator": states[0]["_extra_state"]["generator"]})


def reshard_states(states: Sequence[Dict], world: int, block: int = 1) -> List[Dict]:
    """Offline: re-split the per-rank states of one queue for another world size (or block)."""
    full = global_state_from_shards(states)
    return [from_global_state(full, world, r, block) for r in range(world)]
