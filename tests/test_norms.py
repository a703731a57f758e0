"""Global-batch BN (syncbn) on 2 gloo ranks equals plain BN on the whole batch: output, gradient, buffers."""
import torch

from scale_refiner.heads.norms import GlobalBatchNorm1d


def _check(rank, world):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64) * 3 + 1
    upstream = torch.randn(8, 5, generator=g, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(5).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=g), ref.bias.uniform_(-1, 1, generator=g)
    ours = GlobalBatchNorm1d(5).double()
    ours.load_state_dict(ref.state_dict())
    xr = x.clone().requires_grad_(True)
    (ref(xr) * upstream).sum().backward()
    part = slice(4 * rank, 4 * rank + 4)
    xl = x[part].clone().requires_grad_(True)
    y = ours(xl)
    with torch.no_grad():
        expected = torch.nn.functional.batch_norm(x, None, None, ref.weight, ref.bias, training=True)
    assert torch.allclose(y, expected[part], atol=1e-10)
    (y * upstream[part]).sum().backward()
    # the loss is a sum over samples, so the local input gradient is the slice of the full-batch one
    assert torch.allclose(xl.grad, xr.grad[part], atol=1e-10), (xl.grad, xr.grad[part])
    # parameter gradients: summed over ranks they equal full-batch BN's
    for mine, theirs in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
        total = mine.grad.clone()
        torch.distributed.all_reduce(total)
        assert torch.allclose(total, theirs.grad, atol=1e-10)
    assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-12)
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-12)


def test_syncbn_two_ranks_equal_full_batch_bn(gloo):
    gloo(_check, 2)


def test_single_process_is_plain_bn():
    x = torch.randn(6, 3)
    ref, ours = torch.nn.BatchNorm1d(3), GlobalBatchNorm1d(3)
    assert torch.allclose(ours(x), ref(x))
