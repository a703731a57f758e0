"""NNA / NNCLR against a naive per-sample loop of the paper's Eq. 1, in one process and on 2 gloo ranks."""
import math

import pytest
import torch

from scale_refiner.objective.nna import nna_loss, view_pairs


def unit(v):
    return v / v.norm()


def naive_loss(z, nn_z, p, tau, variant, official=False):
    """Loop over pairs and samples; B is the global batch. Uses only python floats and per-sample dots.
    ``official``: each anchor predicts views 0 .. n_local - 1 (the released code's indexing)."""
    num_views, batch = p.shape[0], p.shape[1]
    terms = []
    for i in (0, 1):
        for v in (range(num_views - 2) if official else [1 - i] + list(range(2, num_views))):
            for b in range(batch):
                positive = unit(nn_z[i, b]) @ unit(p[v, b]) / tau
                anchor = unit(nn_z[i, b]) if variant == "nnclr" else unit(z[i, b])
                logits = [positive] + [anchor @ unit(p[v, j]) / tau for j in range(batch) if j != b]
                terms.append(-(positive - torch.logsumexp(torch.stack(logits), 0)))
    return torch.stack(terms).mean()


def make_inputs(num_local=3, batch=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, batch, dim, generator=g, dtype=torch.float64)
    nn_z = torch.randn(2, batch, dim, generator=g, dtype=torch.float64)
    p = torch.randn(2 + num_local, batch, dim, generator=g, dtype=torch.float64)
    return z, nn_z, p


def test_pairs_are_the_intended_ones():
    pairs = view_pairs(10)
    assert len(pairs) == 22
    assert all(i != v for i, v in pairs)
    assert sorted(v for i, v in pairs if i == 0) == [1] + list(range(2, 12))
    assert sorted(v for i, v in pairs if i == 1) == [0] + list(range(2, 12))


def test_official_pairs_are_the_released_codes():
    pairs = view_pairs(10, "official")
    assert len(pairs) == 20
    assert (0, 0) in pairs and (1, 1) in pairs  # a self-pair per anchor
    assert {v for _, v in pairs} == set(range(10))  # g1, g2, l1..l8: the last two local views unused
    with pytest.raises(ValueError, match="at least 2 local views"):
        view_pairs(1, "official")


@pytest.mark.parametrize("num_local", [2, 4])
def test_official_pairing_matches_naive_loop(num_local):
    z, nn_z, p = make_inputs(num_local)
    p1 = p.clone().requires_grad_(True)
    p2 = p.clone().requires_grad_(True)
    loss, _ = nna_loss(z, nn_z, p1, 0.2, "nna", pairing="official")
    ref = naive_loss(z, nn_z, p2, 0.2, "nna", official=True)
    loss.backward(), ref.backward()
    assert torch.allclose(loss, ref, atol=1e-10)
    assert torch.allclose(p1.grad, p2.grad, atol=1e-10)
    assert torch.equal(p1.grad[-2:], torch.zeros_like(p1.grad[-2:]))  # the last two local views get no gradient
    assert not torch.allclose(loss, nna_loss(z, nn_z, p, 0.2, "nna")[0])


@pytest.mark.parametrize("variant", ["nna", "nnclr"])
@pytest.mark.parametrize("num_local", [0, 3])
def test_matches_naive_loop(variant, num_local):
    z, nn_z, p = make_inputs(num_local)
    p1 = p.clone().requires_grad_(True)
    p2 = p.clone().requires_grad_(True)
    loss, metrics = nna_loss(z, nn_z, p1, 0.2, variant)
    ref = naive_loss(z, nn_z, p2, 0.2, variant)
    loss.backward(), ref.backward()
    assert torch.allclose(loss, ref, atol=1e-10)
    assert torch.allclose(p1.grad, p2.grad, atol=1e-10)
    assert 0 < metrics["positive_prob"] < 1


def test_variants_differ_and_no_gradient_to_z():
    z, nn_z, p = make_inputs()
    z.requires_grad_(True)
    p.requires_grad_(True)
    a, _ = nna_loss(z, nn_z, p, 0.2, "nna")
    b, _ = nna_loss(z, nn_z, p, 0.2, "nnclr")
    assert not torch.allclose(a, b)
    a.backward()
    assert z.grad is None  # z is an anchor only: the gradient flows through p
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_perfect_alignment_gives_low_loss():
    # p_v == nn_z for every view and well separated samples: the positive dominates.
    z, nn_z, _ = make_inputs(num_local=2, batch=4, dim=16)
    nn_z[:] = torch.eye(16, dtype=torch.float64)[:4]
    p = nn_z[:1].expand(4, -1, -1).clone()
    loss, _ = nna_loss(nn_z, nn_z, p, 0.05, "nna")
    assert loss < 1e-6 and math.isfinite(loss.item())


def _two_rank_check(rank, world, variant):
    import torch.distributed as dist
    z, nn_z, p = make_inputs(num_local=3, batch=8)
    ref_p = p.clone().requires_grad_(True)
    ref = naive_loss(z, nn_z, ref_p, 0.3, variant)
    ref.backward()
    part = slice(rank * 4, rank * 4 + 4)
    local_p = p[:, part].clone().requires_grad_(True)
    loss, _ = nna_loss(z[:, part], nn_z[:, part], local_p, 0.3, variant, group=dist.group.WORLD)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    assert torch.allclose(mean_loss, ref.detach(), atol=1e-10), (mean_loss, ref)
    # all_gather's backward sums every rank's contribution: the sum over ranks of the local losses,
    # i.e. world x the global mean. An engine that averages gradients over ranks recovers the reference.
    assert torch.allclose(local_p.grad, world * ref_p.grad[:, part], atol=1e-10)


@pytest.mark.parametrize("variant", ["nna", "nnclr"])
def test_two_ranks_match_global_naive(gloo, variant):
    gloo(_two_rank_check, 2, variant)
