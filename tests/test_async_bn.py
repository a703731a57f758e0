"""Async-statistics BN (heads/async_bn.py): forward value, gradient, buffers, collectives, resume, recomputation.

Distributed cases run on 2 real gloo ranks (the ``gloo`` fixture); each rank function asserts inside.
"""
import copy

import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from scale_refiner.heads.async_bn import (AsyncBatchNorm1d, async_bn_scope, attach, coordinator_of,
                                          flush_async_bn)
from scale_refiner.heads.id_head import IDHead
from scale_refiner.heads.norms import GlobalBatchNorm1d, make_norm

D, H, P, Q = 12, 24, 8, 32  # head: in, projector hidden, out, predictor hidden


def _heads(norm, count=1, seed=0, auto_flush=True):
    torch.manual_seed(seed)
    with async_bn_scope(auto_flush=auto_flush):
        heads = torch.nn.ModuleList(IDHead(D, H, P, Q, norm=norm) for _ in range(count)).double()
    with torch.no_grad():  # non-trivial affine parameters
        g = torch.Generator().manual_seed(seed + 1)
        for m in heads.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5, generator=g), m.bias.uniform_(-0.5, 0.5, generator=g)
    return heads


def _copy_weights(dst, src):
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in dst.state_dict()}, strict=False)


def _run(heads, x):
    return torch.cat([torch.cat(head(x), 1) for head in heads], 1)


def _gather(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


# 1. repeated global batch: after the lag the forward is full-batch BN ------------------------------------
def _repeated(rank, world, first_step):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, D, generator=g, dtype=torch.float64) * 2 + 0.5
    part = slice(8 * rank, 8 * rank + 8)
    ours = _heads("async", 2)
    for m in ours.modules():
        if isinstance(m, AsyncBatchNorm1d):
            m.first_step = first_step
            m.rmax = m.dmax = 1e9  # 8 rows per rank: r leaves the default clip range [1/3, 3] in some channels
    full = _heads("bn", 2)  # one process, the whole global batch
    sync = _heads("syncbn", 2)
    _copy_weights(full, ours), _copy_weights(sync, ours)
    with torch.no_grad():
        expected = _run(full, x)[part]
        # the lag: "sync" is exact from step 0; "local" normalises step 0 locally, which changes the inputs of
        # the next layer, so BN layer j of the chain (5 per head) is exact from step j on: all from step 5
        lag = 0 if first_step == "sync" else 5
        for step in range(lag + 2):
            got, by_sync = _run(ours, x[part]), _run(sync, x[part])
            assert torch.allclose(by_sync, expected, atol=1e-10)
            if step < lag:
                assert not torch.allclose(got, expected, atol=1e-3), step
            else:
                assert torch.allclose(got, expected, atol=1e-10), (step, (got - expected).abs().max())
    coordinator_of(ours).sync()


@pytest.mark.parametrize("first_step", ["sync", "local"])
def test_repeated_batch_forward_is_full_batch_bn(gloo, first_step):
    gloo(_repeated, 2, first_step)


def test_single_process_corrections_are_identity():
    """No dist: global = local of the previous step; on a repeated batch r = 1, d = 0 up to float."""
    heads = _heads("async", 1)
    ref = _heads("bn", 1)
    _copy_weights(ref, heads)
    x = torch.randn(10, D, dtype=torch.float64) * 3 + 1
    seen = []

    def probe(module, inputs, output):
        (inp,) = inputs
        mu, var = inp.mean(0), inp.var(0, unbiased=False)
        total = module.stats_global
        c = module.num_features
        mu_g = total[:c] / total[-1]
        var_g = total[c:2 * c] / total[-1] - mu_g ** 2
        seen.append((torch.sqrt(var + module.eps) / torch.sqrt(var_g + module.eps), (mu - mu_g) / var_g.sqrt()))

    for m in heads.modules():
        if isinstance(m, AsyncBatchNorm1d):
            m.register_forward_hook(probe)
    for step in range(3):
        seen.clear()
        assert torch.allclose(_run(heads, x), _run(ref, x), atol=1e-10)
        for r, d in seen:
            assert torch.allclose(r, torch.ones_like(r), atol=1e-10) and d.abs().max() < 1e-8


# 2. gradient vs SyncBN on random partitions: error ~ n^(-1/2) ---------------------------------------------
def _grad_rate(rank, world, sizes, partitions):
    errors = []
    for n in sizes:
        total_err = 0.0
        for trial in range(partitions):
            g = torch.Generator().manual_seed(1000 * n + trial)
            x = torch.randn(world * n, 6, generator=g, dtype=torch.float64) * 2 + 1
            x = x + x ** 2 / 4  # skewed, so the per-rank moments vary
            upstream = torch.randn(world * n, 6, generator=g, dtype=torch.float64)
            rows = torch.randperm(world * n, generator=g)[rank * n:(rank + 1) * n]
            with async_bn_scope() as coordinator:
                ours = AsyncBatchNorm1d(6, rmax=1e9, dmax=1e9).double()  # no clip: same value as SyncBN
            sync = GlobalBatchNorm1d(6).double()
            with torch.no_grad():
                ours(x[rows])  # step 0; the reduce of this batch is in flight
            xa, xs = x[rows].clone().requires_grad_(True), x[rows].clone().requires_grad_(True)
            ya = ours(xa)  # normalised with the previous (= this) global batch's statistics
            ys = sync(xs)
            assert torch.allclose(ya, ys, atol=1e-10)  # same forward value: only the gradient differs
            (ya * upstream[rows]).sum().backward()
            (ys * upstream[rows]).sum().backward()
            coordinator.sync()
            # gamma and beta gradients equal SyncBN's (same value, same upstream); input gradients differ
            assert torch.allclose(ours.weight.grad, sync.weight.grad, atol=1e-9)
            sums = torch.stack([((xa.grad - xs.grad) ** 2).sum(), (xs.grad ** 2).sum()])
            dist.all_reduce(sums)
            total_err += (sums[0] / sums[1]).sqrt().item()
        errors.append(total_err / partitions)
    if rank == 0:
        print("relative input-gradient error vs SyncBN, per-rank batch", sizes, ":", errors)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # expected rate: the input gradients differ by the local-vs-global means of the upstream gradient (and of
    # its product with xhat), sampling errors of n rows, so the relative error is ~ n^(-1/2): 4x the per-rank
    # batch halves it, 16x quarters it
    for a, b in zip(errors, errors[1:]):
        assert 0.35 < b / a < 0.72, errors
    assert 0.15 < errors[-1] / errors[0] < 0.4, errors


def test_gradient_approaches_syncbn_as_batch_grows(gloo):
    gloo(_grad_rate, 2, (8, 32, 128), 24)


# 3. buffers identical across ranks ------------------------------------------------------------------------
def _buffers_identical(rank, world):
    heads = _heads("async", 2)
    opt = torch.optim.SGD(heads.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(10 + rank)  # different data per rank
    for step in range(5):
        x = torch.randn(6 + rank, D, generator=g, dtype=torch.float64) * (1 + step) + step
        loss = _run(heads, x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for p in heads.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
    coordinator_of(heads).sync()
    shared = 0
    for name, buf in heads.named_buffers():
        if name.endswith(("stats_sent", "stats_acc")):
            continue  # this rank's own local sums (sent / not yet sent), by definition per rank
        a, b = _gather(buf)
        assert torch.equal(a, b), name
        shared += 1
    assert shared == 10 * 5  # running mean, var, count, global statistics, pending flag of 10 layers
    bn = heads[0].projector[1]
    assert bn.num_batches_tracked.item() == 5 and not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_buffers_identical_across_ranks(gloo):
    gloo(_buffers_identical, 2)


# 4. collectives per step ------------------------------------------------------------------------------------
class _Counter:
    def __init__(self):
        self.calls, self.original = [], dist.all_reduce

    def __enter__(self):
        def counting(tensor, *args, **kwargs):
            self.calls.append((bool(kwargs.get("async_op", False)), tensor.numel()))
            return self.original(tensor, *args, **kwargs)
        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.original

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def _count(rank, world):
    layers_per_head, count = 5, 2
    x = torch.randn(8, D, dtype=torch.float64)
    for norm in ("async", "syncbn"):
        heads = _heads(norm, count)
        with _Counter() as counter:
            for step in range(4):
                _run(heads, x).pow(2).mean().backward()
                calls = counter.take()
                if norm == "syncbn":  # forward + backward, every layer, blocking
                    assert calls == [(False, c) for c in [2 * w + 1 for w in (H, H, P, Q, P)] * count] * 1 + \
                        [(False, 2 * w + 1) for w in reversed([H, H, P, Q, P] * count)], calls
                    assert len(calls) == 2 * layers_per_head * count
                elif step == 0:  # one blocking forward-only reduce per layer, then the first bucket
                    assert [a for a, _ in calls].count(False) == layers_per_head * count
                    assert [a for a, _ in calls].count(True) == 0  # nothing new to send yet
                else:  # exactly one non-blocking reduce for all layers of all heads
                    bucket = sum(2 * w + 1 for w in (H, H, P, Q, P)) * count
                    assert calls == [(True, bucket)], calls
            heads.eval()
            with torch.no_grad():
                _run(heads, x)
            assert counter.take() == []  # eval: no collective
        if norm == "async":
            coordinator_of(heads).sync()


def test_one_async_reduce_per_step_vs_two_per_layer_for_syncbn(gloo):
    gloo(_count, 2)


# 5. resume is exact ----------------------------------------------------------------------------------------
def _train(heads, opt, steps, start, rank):
    outs = []
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(7, D, generator=g, dtype=torch.float64) * 2 + 1
        out = _run(heads, x)
        outs.append(out.detach().clone())
        opt.zero_grad()
        out.pow(2).mean().backward()
        if dist.is_initialized():
            for p in heads.parameters():
                dist.all_reduce(p.grad)
        opt.step()
    return outs


def _resume(rank, world, how):
    total, k = 6, 3
    straight = _heads("async", 2)
    opt = torch.optim.SGD(straight.parameters(), lr=0.05, momentum=0.9)
    ref = _train(straight, opt, total, 0, rank)

    first = _heads("async", 2)
    opt1 = torch.optim.SGD(first.parameters(), lr=0.05, momentum=0.9)
    outs = _train(first, opt1, k, 0, rank)
    assert any(m.pending.item() == 1 for m in first.modules() if isinstance(m, AsyncBatchNorm1d))
    if how == "state_dict":  # saved while the reduce of step k is in flight; no collective needed to save
        saved = copy.deepcopy(first.state_dict())
    else:  # what the trainer's client state does: copy named_buffers and parameters
        saved = {n: t.detach().clone() for n, t in list(first.named_parameters()) + list(first.named_buffers())}
    saved_opt = copy.deepcopy(opt1.state_dict())
    del first, opt1

    fresh = _heads("async", 2, seed=99)  # different initial weights, overwritten by the load
    if how == "state_dict":
        fresh.load_state_dict(saved)
    else:
        with torch.no_grad():
            for n, t in list(fresh.named_parameters()) + list(fresh.named_buffers()):
                t.copy_(saved[n])
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(saved_opt)
    outs += _train(fresh, opt2, total - k, k, rank)
    for step, (a, b) in enumerate(zip(ref, outs)):
        assert torch.equal(a, b), (step, (a - b).abs().max())
    for (n, a), (_, b) in zip(straight.named_buffers(), fresh.named_buffers()):
        assert torch.equal(a, b), n
    for h in (straight, fresh):
        if dist.is_initialized():
            coordinator_of(h).sync()


@pytest.mark.parametrize("how", ["state_dict", "buffers"])
def test_resume_is_exact_two_ranks(gloo, how):
    gloo(_resume, 2, how)


def test_resume_is_exact_single_process():
    _resume(0, 1, "state_dict")


# 6. checkpoint recomputation does not double-update ----------------------------------------------------------
def _recompute(rank, world):
    results = {}
    for mode in ("plain", "nonreentrant", "reentrant"):
        heads = _heads("async", 2)
        coordinator = coordinator_of(heads)
        with _Counter() as counter:
            grads, outs = [], []
            for step in range(3):
                g = torch.Generator().manual_seed(step + 10 * rank)
                x = torch.randn(6, D, generator=g, dtype=torch.float64).requires_grad_(True)
                if mode == "plain":
                    out = _run(heads, x)
                else:
                    out = checkpoint(_run, heads, x, use_reentrant=mode == "reentrant")
                out.pow(2).sum().backward()
                outs.append(out.detach()), grads.append(x.grad)
            calls = counter.take()
        state = {n: b.clone() for n, b in heads.named_buffers()}
        results[mode] = (outs, grads, calls, coordinator.launched, state,
                         [p.grad.clone() for p in heads.parameters()])
        coordinator.sync()
    base = results["plain"]
    assert base[3] == 2  # steps 1 and 2 launched a bucket (step 0: blocking per layer)
    for mode in ("nonreentrant", "reentrant"):
        outs, grads, calls, launched, state, pgrads = results[mode]
        assert calls == base[2] and launched == base[3], mode  # no extra collective in the recomputation
        for n in state:
            assert torch.equal(state[n], base[4][n]), (mode, n)  # no double update / double contribution
        for a, b in zip(outs + grads + pgrads, base[0] + base[1] + base[5]):
            assert torch.allclose(a, b, atol=1e-12), mode


def test_checkpoint_recomputation_does_not_double_update(gloo):
    gloo(_recompute, 2)


def test_checkpoint_recomputation_single_process():
    _recompute(0, 1)


def test_corrections_are_clipped():
    with async_bn_scope():
        layer = AsyncBatchNorm1d(3, rmax=2.0, dmax=0.5).double()
    base = torch.randn(20, 3, dtype=torch.float64)
    with torch.no_grad():
        layer(base)  # statistics of base become the previous ones
        x = base[:10] * torch.tensor([5.0, 0.1, 1.0], dtype=torch.float64) + torch.tensor([0, 0, 3.0], dtype=torch.float64)
        y = layer(x)
    c = 3
    total = layer.stats_acc * 0 + torch.cat([base.sum(0), (base * base).sum(0), base.new_tensor([20])])
    mu_g = total[:c] / 20
    sig_g = torch.sqrt(total[c:2 * c] / 20 - mu_g ** 2 + layer.eps)
    mu, sig = x.mean(0), torch.sqrt(x.var(0, unbiased=False) + layer.eps)
    r = (sig / sig_g).clamp(0.5, 2.0)
    d = ((mu - mu_g) / sig_g).clamp(-0.5, 0.5)
    assert r[0] == 2.0 and r[1] == 0.5 and d[2] == 0.5
    assert torch.allclose(y, (x - mu) / sig * r + d, atol=1e-12)


# the rest: accumulation, eval, copies, make_norm ------------------------------------------------------------
def test_manual_flush_accumulates_micro_steps():
    """auto_flush=False: statistics accumulate over micro-steps; one flush; the next step uses all of them."""
    with async_bn_scope(auto_flush=False) as coordinator:
        layer = AsyncBatchNorm1d(D, rmax=1e9, dmax=1e9).double()
    a, b = torch.randn(5, D, dtype=torch.float64), torch.randn(7, D, dtype=torch.float64) * 2 + 1
    with torch.no_grad():
        layer(a)  # step 0: statistics of a (blocking in a distributed run)
        layer(a), layer(b)  # two micro-steps of step 1, then one flush
        assert coordinator.launched == 0 and layer.num_batches_tracked.item() == 1
        flush_async_bn(layer)
        assert coordinator.launched == 1
        # step 2 normalises with the statistics of a and b together, i.e. full-batch BN over cat(a, b)
        both = torch.cat([a, b])
        expected = torch.nn.functional.batch_norm(both, None, None, layer.weight, layer.bias, training=True)
        assert torch.allclose(layer(both), expected, atol=1e-10)
        assert layer.num_batches_tracked.item() == 2  # one running-statistics update per reduce


def test_eval_uses_running_statistics_and_leaves_state_alone():
    heads = _heads("async", 1)
    x = torch.randn(9, D, dtype=torch.float64)
    for _ in range(3):
        _run(heads, x)
    state = {n: b.clone() for n, b in heads.named_buffers()}
    heads.eval()
    ref = _heads("bn", 1).eval()
    _copy_weights(ref, heads)
    assert torch.equal(_run(heads, x), _run(ref, x))
    for n, b in heads.named_buffers():
        assert torch.equal(b, state[n]), n


def test_copies_and_attach_get_their_own_coordinator():
    heads = _heads("async", 2)
    coordinator = coordinator_of(heads)
    assert len(coordinator.layers()) == 10
    twin = copy.deepcopy(heads)
    assert coordinator_of(twin) is not coordinator and len(coordinator_of(twin).layers()) == 10
    assert len(coordinator.layers()) == 10
    fresh = attach(heads)
    assert coordinator_of(heads) is fresh and coordinator.layers() == [] and len(fresh.layers()) == 10


def test_make_norm_async():
    assert isinstance(make_norm("async", 4), AsyncBatchNorm1d)
    with pytest.raises(ValueError):
        make_norm("nope", 4)
