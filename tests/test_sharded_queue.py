"""Sharded NN queue: exactly the replicated NNQueue's neighbours on 2 real gloo ranks (wrap-around, exclusion,
warm-up, truncation, both layouts), state_dict round trip, re-sharding, search backends."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
import pytest

from scale_refiner.memory.queue import NNQueue
from scale_refiner.memory.search import FaissFlat, IVFFlat, TorchMatmul
from scale_refiner.memory.sharded_queue import (ShardedNNQueue, global_state_from_shards, reshard_states,
                                                sharded_enqueue)


def unit_rows(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def global_batch(step, n, d, dataset):
    vecs = unit_rows(n, d, 1000 + step)
    idx = (torch.arange(n) * 7 + step * n) % dataset  # indices recur: own-index exclusion bites
    return vecs, idx, idx % 3


def brute_force_topk(ref, query, qidx, k):
    """Top-k slots of the replicated queue: masked scores, ordered by score desc then slot asc."""
    sims = (query @ ref.vectors.T).masked_fill((ref.indices < 0) | (ref.indices == qidx.unsqueeze(1)), float("-inf"))
    out = []
    for row in sims:
        order = sorted(range(len(row)), key=lambda j: (-float(row[j]), j))[:k]
        out.append([j for j in order if torch.isfinite(row[j])])
    return out


def check_equivalence(rank, world, size, dim, batch, k, block, steps, dataset, search, group=None):
    group = group or dist.group.WORLD
    ref = NNQueue(size, dim, seed=11)
    sq = ShardedNNQueue(size, dim, seed=11, world=world, rank=rank, block=block, search=search)
    n = world * batch
    mine = slice(rank * batch, (rank + 1) * batch)
    for step in range(steps):
        queries, qidx, qlab = global_batch(10_000 + step, n, dim, dataset)
        for view in range(2):
            q = unit_rows(n, dim, 50_000 + 2 * step + view)
            a, ia = ref.lookup(q[mine], qidx[mine], k, qlab[mine], step, global_queries=n, offset=rank * batch)
            b, ib = sq.lookup(q[mine], qidx[mine], k, qlab[mine], step, global_queries=n, offset=rank * batch,
                              group=group)
            assert torch.equal(a, b), (step, view, (a - b).abs().max())
            for key in ("found", "age", "accuracy"):
                assert torch.equal(ia[key], ib[key]), (step, key)
            assert torch.allclose(ia["similarity"], ib["similarity"], atol=1e-6)
            expected = brute_force_topk(ref, q[mine], qidx[mine], k)
            for row, want in zip(ib["topk_slots"].tolist(), expected):
                assert [s for s in row if s >= 0] == want, (step, row, want)
        vecs, idx, lab = global_batch(step, n, dim, dataset)
        ref.enqueue(vecs, idx, lab, step)
        sq.enqueue(vecs[mine], idx[mine], lab[mine], step, group=group)
        full = sq.global_state(group)
        for key in ("vectors", "indices", "labels", "steps", "ptr"):
            assert torch.equal(full[key], getattr(ref, key)), (step, key)
    return ref, sq


def _equivalence(rank, world, size, dim, batch, k, block, steps, dataset, search):
    check_equivalence(rank, world, size, dim, batch, k, block, steps, dataset, search)


@pytest.mark.parametrize("size,batch,k,block,steps,dataset,search", [
    (24, 4, 5, 4, 9, 20, "faiss"),   # W*B divides the size, block = batch: enqueue stays local; wraps 3 times
    (21, 3, 4, 1, 10, 17, "faiss"),  # size not a multiple: round-robin slots, all_to_all enqueue, odd wrap
    (6, 4, 3, 1, 4, 9, "torch"),     # global batch of 8 > queue of 6: only the newest 6 kept
    (40, 5, 12, 5, 10, 23, "torch"),  # k larger than the filled part for several steps (warm-up)
    (16, 2, 1, 3, 12, 6, "faiss"),   # k = 1 (head stage); dataset of 6: many own-index duplicates per shard
])
def test_sharded_equals_replicated_2_ranks(gloo, size, batch, k, block, steps, dataset, search):
    gloo(_equivalence, 2, size, 8, batch, k, block, steps, dataset, search)


def _state_roundtrip(rank, world, tmp):
    ref, sq = check_equivalence(rank, world, 30, 8, 4, 4, 4, 6, 25, "faiss")
    q = unit_rows(world * 4, 8, 7)
    idx = torch.arange(world * 4)
    mine = slice(rank * 4, rank * 4 + 4)
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in sq.state_dict().items()}
    torch.save(state, f"{tmp}/shard{rank}.pt")
    if rank == 0:  # the replicated queue at the same point (same generator state)
        torch.save(ref.state_dict(), f"{tmp}/ref.pt")
    other = ShardedNNQueue(30, 8, seed=99, world=world, rank=rank, block=4)
    other.load_state_dict(torch.load(f"{tmp}/shard{rank}.pt", weights_only=True))
    a, _ = sq.lookup(q[mine], idx[mine], 4)
    b, _ = other.lookup(q[mine], idx[mine], 4)
    c, _ = ref.lookup(q[mine], idx[mine], 4, global_queries=world * 4, offset=rank * 4)
    assert torch.equal(a, b) and torch.equal(a, c)
    # a replicated NNQueue state loads into a shard (this rank's slots are taken from it)
    from_ref = ShardedNNQueue(30, 8, seed=5, world=world, rank=rank, block=4)
    from_ref.load_state_dict(ref.state_dict())
    for key in ("vectors", "indices", "labels", "steps", "ptr"):
        assert torch.equal(from_ref.state_dict()[key], other.state_dict()[key]), key
    # a shard of another layout is refused with the way out named
    wrong = ShardedNNQueue(30, 8, world=world, rank=rank, block=2)
    with pytest.raises(ValueError, match="reshard_states"):
        wrong.load_state_dict(state)


def test_state_dict_roundtrip_and_reshard(gloo, tmp_path):
    gloo(_state_roundtrip, 2, str(tmp_path))
    states = [torch.load(tmp_path / f"shard{r}.pt", weights_only=True) for r in range(2)]
    ref_state = torch.load(tmp_path / "ref.pt", weights_only=True)
    full = global_state_from_shards(states)
    for key in ("vectors", "indices", "labels", "steps", "ptr"):
        assert torch.equal(full[key], ref_state[key]), key
    # resume on 1 rank (re-sharded): picks equal the replicated queue's
    one = ShardedNNQueue(30, 8, world=1, rank=0, block=1)
    one.load_state_dict(reshard_states(states, world=1, block=1)[0])
    ref = NNQueue(30, 8)
    ref.load_state_dict(ref_state)
    q, idx = unit_rows(8, 8, 3), torch.arange(8)
    a, _ = one.lookup(q, idx, 4)
    b, _ = ref.lookup(q, idx, 4)
    assert torch.equal(a, b)
    # and on 3 ranks the shards hold the same global state
    three = reshard_states(states, world=3, block=2)
    back = global_state_from_shards(three)
    for key in ("vectors", "indices", "labels", "steps", "ptr"):
        assert torch.equal(back[key], ref_state[key]), key


def test_single_process_matches_replicated_and_multi_queue_enqueue():
    ref = [NNQueue(50, 16, seed=s) for s in (0, 1)]
    sq = [ShardedNNQueue(50, 16, seed=s, block=7, search="torch") for s in (0, 1)]
    for step in range(8):
        vecs = torch.stack([unit_rows(16, 16, 10 * step + h) for h in range(2)])
        idx = torch.arange(16) + 16 * step
        for h in range(2):
            q = unit_rows(16, 16, 777 + step)
            a, _ = ref[h].lookup(q, idx, 6, step=step)
            b, _ = sq[h].lookup(q, idx, 6, step=step)
            assert torch.equal(a, b)
            ref[h].enqueue(vecs[h], idx, step=step)
        sharded_enqueue(sq, vecs, idx, step=step)
    assert sq[0].capacity == 56 and sq[0].n_slots == 50


def test_search_backends_agree():
    base, q = unit_rows(5000, 32, 0), unit_rows(300, 32, 1)
    s1, i1 = FaissFlat().search(q, base, 10)
    s2, i2 = TorchMatmul(chunk_elems=100_000).search(q, base, 10)
    assert torch.equal(i1, i2) and torch.allclose(s1, s2, atol=1e-5)
    ivf = IVFFlat(32, nlist=16, nprobe=16, train_size=2000)
    ivf.update(torch.arange(5000), base)
    s3, i3 = ivf.search(q, None, 10)
    assert torch.equal(i3, i1)  # nprobe = nlist: exhaustive


def test_ivf_queue_tracks_the_fifo():
    """The IVF index follows every overwrite: probing every list it equals exact search after 1.5 turns."""
    ref = ShardedNNQueue(4096, 32, search="faiss")
    full = ShardedNNQueue(4096, 32, search="ivf", search_kwargs=dict(nlist=32, nprobe=32, train_size=2048))
    part = ShardedNNQueue(4096, 32, search="ivf", search_kwargs=dict(nlist=32, nprobe=8, train_size=2048))
    for step in range(6):
        vecs, idx = unit_rows(1024, 32, step), torch.arange(1024) + 1024 * step
        for q in (ref, full, part):
            q.enqueue(vecs, idx, step=step)
    q, idx = unit_rows(200, 32, 99), torch.arange(200) + 10 ** 6
    _, a = ref.lookup(q, idx, 10)
    _, b = full.lookup(q, idx, 10)
    _, c = part.lookup(q, idx, 10)
    assert torch.equal(a["topk_slots"], b["topk_slots"])
    recall = sum(len(set(x) & set(y)) for x, y in zip(a["topk_slots"].tolist(), c["topk_slots"].tolist())) / 2000
    assert recall > 0.5, recall  # uniform random vectors: the hardest case for IVF


def _refiner_equivalence(rank, world):
    from scale_refiner.config import load_config
    from scale_refiner.refiner import build_refiner
    out = {}
    for sharded in (False, True):
        cfg = load_config("configs/demo.yaml", ["queue.size=48", f"queue.sharded={str(sharded).lower()}",
                                                f"queue.search={'faiss' if sharded else 'torch'}",
                                                "data.batch_size=8"])
        torch.manual_seed(0)
        refiner = build_refiner(cfg, load_weights=False)
        refiner.train()
        assert all(isinstance(q, ShardedNNQueue) for q in refiner.queues) == sharded
        runs = []
        for step in range(8):  # 48 / 8: wraps after 6 steps; indices recur (exclusion)
            g = torch.Generator().manual_seed(100 * step + rank)
            crops = torch.randn(2, 4, 3, 32, 32, generator=g), torch.randn(4, 4, 3, 16, 16, generator=g)
            index = (torch.arange(4) + rank * 4 + step * 8) % 30
            with torch.no_grad():
                loss, metrics = refiner(*crops, index, label=index % 10, topk=5, step=step, group=dist.group.WORLD)
            runs.append({"loss": float(loss), **{k: float(v) for k, v in metrics.items()}})
        out[sharded] = runs
    for a, b in zip(out[False], out[True]):
        assert a["loss"] == b["loss"]  # the same neighbours: bitwise the same loss
        assert a.keys() == b.keys()
        for key in a:  # nn_similarity: faiss and matmul round the dot products differently
            assert abs(a[key] - b[key]) < 1e-6, (key, a[key], b[key])


def test_refiner_with_sharded_queues_equals_replicated(gloo):
    gloo(_refiner_equivalence, 2)


def _banks_agree(rank, world, heads, size, batch, k, init):
    """Both kinds of queue bank, fed the same global batches: the same neighbours, metrics, keys and global
    state; the sharded bank's lookup makes 4 collectives whatever the number of heads, the replicated none."""
    from scale_refiner.bench.collectives import CollectiveCounter
    from scale_refiner.memory.bank import build_queues
    group = dist.group.WORLD
    dim, n = 8, world * batch
    mine = slice(rank * batch, (rank + 1) * batch)
    replicated = build_queues(heads, size, dim, seed=3, init=init)
    sharded = build_queues(heads, size, dim, seed=3, sharded=True, world=world, rank=rank, block=batch,
                           search="faiss", init=init)
    if init == "random":  # the same global fill: every slot searchable, no dataset index, no label
        for h in range(heads):
            full = sharded[h].global_state(group)
            assert torch.equal(full["vectors"], replicated[h].vectors) and bool((full["indices"] == -2).all())
            assert torch.allclose(full["vectors"].norm(dim=1), torch.ones(size))
        assert len({float(replicated[h].vectors[0, 0]) for h in range(heads)}) == heads  # a fill per head
    counts = []
    for step in range(9):
        query = torch.stack([torch.stack([unit_rows(n, dim, 100 * step + 10 * h + v)[mine] for v in range(2)])
                             for h in range(heads)])  # (heads, 2 views, B, d)
        _, qidx, qlab = global_batch(10_000 + step, n, dim, 19)
        with CollectiveCounter() as rep_lookup:
            a, ia = replicated.lookup(query, qidx[mine], k, qlab[mine], step, group)
        with CollectiveCounter() as shard_lookup:
            b, ib = sharded.lookup(query, qidx[mine], k, qlab[mine], step, group)
        assert a.shape == b.shape == (heads, 2, batch, dim) and ia.keys() == ib.keys()
        assert torch.equal(a, b), (step, (a - b).abs().max())
        if init == "random":
            assert bool(ib["found"].all())  # from the first step: the random entries are neighbours
        for key in ("found", "age", "accuracy", "slot", "topk_slots"):
            assert torch.equal(ia[key], ib[key]), (step, key)
        assert torch.allclose(ia["similarity"], ib["similarity"], atol=1e-6)
        vecs = torch.stack([global_batch(step + 50 * h, n, dim, 19)[0] for h in range(heads)])
        with CollectiveCounter() as rep_enqueue:
            replicated.enqueue(vecs[:, mine], qidx[mine], qlab[mine], step, group)
        with CollectiveCounter() as shard_enqueue:
            sharded.enqueue(vecs[:, mine], qidx[mine], qlab[mine], step, group)
        counts.append((rep_lookup.total, shard_lookup.total, rep_enqueue.total, shard_enqueue.total))
    for h in range(heads):
        full = sharded[h].global_state(group)
        for key in ("vectors", "indices", "labels", "steps", "ptr"):
            assert torch.equal(full[key], getattr(replicated[h], key)), (h, key)
    return counts


@pytest.mark.parametrize("heads,init", [(1, "empty"), (4, "empty"), (4, "random")])
def test_queue_banks_agree_with_fixed_collectives(gloo, heads, init):
    # queue of 21 with 2 x 3 rows a step: wraps, and rows cross ranks (one all_to_all per enqueue)
    counts = gloo(_banks_agree, 2, heads, 21, 3, 4, init)
    # lookups: replicated none, sharded 4; enqueue: replicated one all-gather, sharded one all_to_all unless
    # every row of the step lands on its own rank (steps where the FIFO pointer aligns with the blocks)
    assert {c[:3] for c in counts} == {(0, 4, 1)}, counts
    assert {c[3] for c in counts} == {0, 1}, counts


def _bench_patterns(rank, world):
    from scale_refiner.cli.bench_queue import PATTERNS, queue_step
    return {p: queue_step(rank, world, 256, 16, 3, 4, 5, 1, p) for p in PATTERNS}


def test_bench_queue_counts_the_collectives_of_each_pattern(gloo):
    """The benchmark's before/after rows: per head and view 4 collectives each (3 heads x 2 views = 24), the
    bank 4; plus the enqueue (replicated: its all-gather; sharded with block = batch: local, none)."""
    rows = gloo(_bench_patterns, 2)
    assert {p: r["collectives"] for p, r in rows.items()} == {"replicated": 1, "sharded-per-head": 24, "sharded": 4}
    # the same data in fewer messages (the bank sends each query's dataset index once, not once per head and view)
    assert 0.95 * rows["sharded-per-head"]["bytes"] < rows["sharded"]["bytes"] < rows["sharded-per-head"]["bytes"]
