"""In-process NN queue: FIFO, masking, exclusion, top-k pick, metrics, state_dict."""
import torch
import torch.nn.functional as F

from scale_refiner.memory.queue import NNQueue


def unit_rows(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_fifo_wraps_and_overwrites_oldest():
    q = NNQueue(5, 4)
    q.enqueue(unit_rows(3, 4, 0), torch.tensor([0, 1, 2]), step=0)
    q.enqueue(unit_rows(4, 4, 1), torch.tensor([3, 4, 5, 6]), step=1)
    assert q.indices.tolist() == [5, 6, 2, 3, 4]  # 0 and 1 overwritten
    assert q.steps.tolist() == [1, 1, 0, 1, 1]
    assert int(q.ptr) == 2
    q.enqueue(unit_rows(12, 4, 2), torch.arange(100, 112), step=2)  # more than the queue: newest survive
    assert sorted(q.indices.tolist()) == list(range(107, 112))


def test_empty_slots_masked_and_first_step_is_self():
    q = NNQueue(8, 4)
    query = unit_rows(3, 4, 0)
    nn_z, info = q.lookup(query, torch.tensor([0, 1, 2]), k=3)
    assert torch.equal(nn_z, query)  # nothing queued: own vector
    assert not info["found"].any()
    q.enqueue(unit_rows(1, 4, 1), torch.tensor([7]))
    nn_z, info = q.lookup(query, torch.tensor([0, 1, 2]), k=3)  # one valid entry, k = 3
    assert info["found"].all()
    assert torch.equal(nn_z, q.vectors[0].expand(3, -1))  # zero vectors of empty slots never picked


def test_own_index_excluded():
    q = NNQueue(4, 4)
    vecs = unit_rows(2, 4, 0)
    q.enqueue(vecs, torch.tensor([10, 11]), labels=torch.tensor([1, 2]))
    nn_z, info = q.lookup(vecs[:1], torch.tensor([10]), k=1, query_label=torch.tensor([1]))
    assert torch.equal(nn_z[0], vecs[1])  # identical entry 10 is excluded, 11 is what is left
    assert not info["accuracy"].item()  # label 2 != 1


def test_topk_uniform_pick_matches_brute_force():
    q = NNQueue(64, 8, seed=3)
    bank = unit_rows(64, 8, 1)
    q.enqueue(bank, torch.arange(64), labels=torch.arange(64) % 4, step=0)
    query = unit_rows(200, 8, 2)
    k = 5
    nn_z, info = q.lookup(query, torch.full((200,), -5), k, query_label=torch.zeros(200, dtype=torch.long), step=9)
    topk = (query @ bank.T).topk(k, dim=1).indices
    picked = (nn_z @ bank.T).argmax(1)  # the picked vector's slot
    assert all(picked[i] in topk[i] for i in range(200))
    # The pick is uniform over the k: each rank position gets roughly 1/k of the picks.
    rank_pos = torch.stack([(topk[i] == picked[i]).nonzero()[0, 0] for i in range(200)])
    counts = torch.bincount(rank_pos, minlength=k).float()
    assert counts.min() > 200 / k * 0.4, counts
    assert torch.allclose(info["similarity"], (query * nn_z).sum(1), atol=1e-6)
    assert (info["age"] == 9).all()
    assert torch.equal(info["accuracy"], (picked % 4 == 0))


def test_state_dict_roundtrip_gives_same_picks():
    q = NNQueue(32, 4, seed=1)
    q.enqueue(unit_rows(20, 4, 0), torch.arange(20), step=3)
    q.lookup(unit_rows(5, 4, 1), torch.arange(5), 4)  # advance the generator
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in q.state_dict().items()}
    r = NNQueue(32, 4, seed=99)
    r.load_state_dict(state)
    query = unit_rows(50, 4, 2)
    a, _ = q.lookup(query, torch.arange(50), 4)
    b, _ = r.lookup(query, torch.arange(50), 4)
    assert torch.equal(a, b)
    assert torch.equal(q.indices, r.indices) and int(q.ptr) == int(r.ptr)


def test_picks_do_not_depend_on_how_the_batch_is_split():
    bank, query = unit_rows(40, 8, 1), unit_rows(12, 8, 2)
    whole, halves = NNQueue(64, 8, seed=5), NNQueue(64, 8, seed=5)
    for q in (whole, halves):
        q.enqueue(bank, torch.arange(40))
    a, _ = whole.lookup(query, torch.arange(100, 112), 6)
    # a "rank" holding rows 6..11 of the same global batch of 12 draws all 12 uniforms and takes its slice
    b, _ = halves.lookup(query[6:], torch.arange(106, 112), 6, global_queries=12, offset=6)
    assert torch.equal(a[6:], b)
