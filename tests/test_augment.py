"""Multi-crop augmentation: shapes, ranges, seeding, the per-view op probabilities, collate and dataset.

Probabilities are checked on pixels where the op leaves a signature (greyscale: equal channels; solarize:
a bright constant image turns dark) and against the per-view flags ``MultiCropAugment.sample`` reports, with
a 4.5-sigma binomial tolerance (a false failure about once in 150,000 runs; the seeds are fixed anyway).
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from scale_refiner.data.augment import (IMAGENET_MEAN, IMAGENET_STD, ArrayDataset, EvalTransform,
                                        MultiCropAugment, blur_kernel_size, collate_multicrop)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(autouse=True)
def one_thread():
    """Run the per-image ops single-threaded, as they run in DataLoader workers (which torch sets to 1 thread).

    The ops are tiny (32 px): intra-op threads only add synchronisation, and on a busy 2-core box a 2-thread
    pool measured 100 ms per sample against 6 ms with one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_aug(**kw):
    """The CPU demo's geometry: 32 px globals and 16 px locals."""
    args = dict(global_size=32, global_scale=(0.25, 1.0), local_size=16, local_scale=(0.05, 0.25), num_local=2)
    args.update(kw)
    return MultiCropAugment(**args)


def grey_digit():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (28, 28), dtype=torch.uint8, generator=g)


def colourful_rgb(h=64, w=64):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def assert_binomial(count, n, p, z=4.5):
    sd = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= z * sd, f"{count}/{n} = {count / n:.3f}, expected p = {p}"


def is_grey(view):
    return bool((view[0] - view[1]).abs().max() < 1e-6 and (view[1] - view[2]).abs().max() < 1e-6)


def test_blur_kernel_sizes():
    assert blur_kernel_size(224) == 23  # BYOL's kernel
    assert blur_kernel_size(96) == 11 and blur_kernel_size(98) == 11
    assert blur_kernel_size(32) == 3 and blur_kernel_size(16) == 3 and blur_kernel_size(1) == 3
    assert all(blur_kernel_size(s) % 2 == 1 for s in range(1, 400))


@pytest.mark.parametrize("as_pil", [False, True])
def test_grey_28px_shapes(as_pil):
    img = grey_digit()
    if as_pil:
        img = Image.fromarray(img.numpy(), mode="L")
    views = small_aug(num_local=4)(img)
    assert len(views) == 6
    for v, view in enumerate(views):
        size = 32 if v < 2 else 16
        assert view.shape == (3, size, size) and view.dtype == torch.float32


def test_rgb_224_96_shapes():
    img = Image.fromarray(colourful_rgb(300, 250).permute(1, 2, 0).numpy(), mode="RGB")
    aug = MultiCropAugment(224, (0.25, 1.0), 96, (0.05, 0.25), num_local=3)
    views = aug(img)
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 3
    assert all(v.dtype == torch.float32 for v in views)


def test_normalised_range():
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD  # the [0, 1] range after normalisation, per channel
    aug = small_aug(num_local=4)
    torch.manual_seed(0)
    for img in (grey_digit(), colourful_rgb()):
        for _ in range(50):
            for view in aug(img):
                assert torch.isfinite(view).all()
                assert (view >= lo - 1e-5).all() and (view <= hi + 1e-5).all()
    # Normalisation is really applied, with ImageNet's per-channel mean and std.
    views = small_aug(color=False)(torch.full((3, 20, 20), 124, dtype=torch.uint8))
    torch.testing.assert_close(views[0], ((124 / 255 - MEAN) / STD).expand(3, 32, 32))


def test_seed_reproducibility():
    aug, img = small_aug(num_local=4), colourful_rgb()
    torch.manual_seed(123)
    a, flags_a = aug.sample(img)
    torch.manual_seed(123)
    b, flags_b = aug.sample(img)
    torch.manual_seed(124)
    c = aug(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and flags_a == flags_b
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    # The two globals of one call are different views, not copies.
    assert not torch.equal(a[0], a[1])


def test_greyscale_fraction_on_pixels():
    aug, img = small_aug(normalize=False), colourful_rgb()
    torch.manual_seed(0)
    grey = total = 0
    for _ in range(500):  # 4 views each: 2000 views
        views, flags = aug.sample(img)
        for view, f in zip(views, flags):
            assert is_grey(view) == f["grayscale"]  # the flag tells the truth about the pixels
            grey += is_grey(view)
            total += 1
    assert total == 2000
    assert_binomial(grey, total, 0.2)


def test_solarize_only_on_g2_and_blur_always_on_g1():
    # A bright constant grey: jitter keeps it >= 0.6 * 250 / 255 = 0.59 (brightness is the only op that
    # moves a constant grey), greyscale and blur leave it alone, so a view with max < 0.5 was solarized.
    aug, img = small_aug(normalize=False), torch.full((3, 40, 40), 250, dtype=torch.uint8)
    torch.manual_seed(1)
    n = 1000
    solarized = np.zeros((n, 4), bool)
    blurred = np.zeros((n, 4), bool)
    jittered = np.zeros((n, 4), bool)
    for i in range(n):
        views, flags = aug.sample(img)
        for v, (view, f) in enumerate(zip(views, flags)):
            dark = bool(view.max() < 0.5)
            assert dark == (view.min() < 0.5)  # constant stays constant: solarized or not, never mixed
            assert dark == f["solarize"]
            solarized[i, v], blurred[i, v], jittered[i, v] = dark, f["blur"], f["jitter"]
    assert not solarized[:, 0].any()  # never on g1
    assert_binomial(solarized[:, 1].sum(), n, 0.2)
    assert not solarized[:, 2:].any()  # never on locals
    assert blurred[:, 0].all()  # always on g1
    assert_binomial(blurred[:, 1].sum(), n, 0.1)
    assert_binomial(blurred[:, 2:].sum(), 2 * n, 0.5)
    assert_binomial(jittered.sum(), 4 * n, 0.8)


class Spy:
    """Wraps a transform and records what it returned."""

    def __init__(self, fn):
        self.fn, self.outputs = fn, []

    def __call__(self, x):
        out = self.fn(x)
        self.outputs.append(out.clone())
        return out


def test_g1_is_the_blur_output():
    # The flags say blur ran on g1; check the global blur transform really produced g1's pixels (no solarize
    # on g1, so the returned view is the blur's output, normalised).
    aug, img = small_aug(), colourful_rgb()
    spy = Spy(aug._blur["global"])
    aug._blur["global"] = spy
    torch.manual_seed(2)
    for _ in range(20):
        spy.outputs.clear()
        views, flags = aug.sample(img)
        assert len(spy.outputs) == 1 + flags[1]["blur"]
        torch.testing.assert_close(views[0], (spy.outputs[0] - MEAN) / STD)


def test_color_false_is_crop_and_flip_only():
    # Constant colour: crop and resize keep it exactly, and no colour op may change it.
    colour = torch.tensor([200, 30, 90], dtype=torch.uint8)
    const = colour.view(3, 1, 1).expand(3, 40, 40).contiguous()
    aug = small_aug(color=False, normalize=False, num_local=4)
    torch.manual_seed(3)
    for _ in range(200):
        views, flags = aug.sample(const)
        for view, f in zip(views, flags):
            assert torch.allclose(view, colour.float().view(3, 1, 1).expand_as(view) / 255, atol=1e-6)
            assert not (f["jitter"] or f["grayscale"] or f["blur"] or f["solarize"])
    # Full-image crops at the image's size: every view is exactly the image or its mirror, flipped half the time.
    img = colourful_rgb(32, 32)
    aug = MultiCropAugment(32, (1.0, 1.0), 32, (1.0, 1.0), num_local=2, color=False, normalize=False)
    base = img.float() / 255
    flips = 0
    for _ in range(250):
        for view in aug(img):
            if torch.allclose(view, base.flip(-1), rtol=0, atol=1e-6):
                flips += 1
            else:
                torch.testing.assert_close(view, base, rtol=0, atol=1e-6)
    assert_binomial(flips, 1000, 0.5)


def test_input_validation():
    aug = small_aug()
    with pytest.raises(TypeError, match="uint8"):
        aug(torch.rand(3, 28, 28))
    with pytest.raises(ValueError, match="shape"):
        aug(torch.zeros(4, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="local_scale"):
        small_aug(local_scale=(0.3, 0.2))


def test_eval_transform():
    t = EvalTransform(32, 32)
    out = t(grey_digit())
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, t(grey_digit()))  # deterministic
    raw = EvalTransform(32, 32, normalize=False)(grey_digit())
    assert is_grey(raw) and raw.min() >= 0 and raw.max() <= 1  # grey in, 3 equal channels out
    torch.testing.assert_close(out, (raw - MEAN) / STD)
    rgb = Image.fromarray(colourful_rgb(300, 200).permute(1, 2, 0).numpy(), mode="RGB")
    assert EvalTransform(256, 224)(rgb).shape == (3, 224, 224)
    # Centre crop: an image with a bright centre pixel block keeps it in the middle.
    img = torch.zeros(1, 40, 40, dtype=torch.uint8)
    img[:, 18:22, 18:22] = 255
    raw = EvalTransform(40, 20, normalize=False)(img)
    assert raw[0, 8:12, 8:12].min() > 0.9 and raw[0, :4].max() == 0
    with pytest.raises(ValueError, match="crop_size"):
        EvalTransform(32, 64)


def test_array_dataset_and_collate():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 10)
    aug = small_aug(num_local=3)
    ds = ArrayDataset(images, labels, aug)
    assert len(ds) == 10
    views, label, index = ds[7]
    assert index == 7 and label == labels[7] and len(views) == 5
    assert ds[-1][2] == 9
    with pytest.raises(IndexError):
        ds[10]
    raw = ArrayDataset(images, labels)[4][0]  # no transform: the uint8 [1, H, W] image
    assert raw.dtype == torch.uint8 and torch.equal(raw[0], torch.from_numpy(images[4]))

    batch = [ds[i] for i in (3, 1, 4)]
    out = collate_multicrop(batch)
    assert out["global"].shape == (2, 3, 3, 32, 32)
    assert out["local"].shape == (3, 3, 3, 16, 16)
    assert out["label"].dtype == torch.long and out["label"].tolist() == [labels[i] for i in (3, 1, 4)]
    assert out["index"].tolist() == [3, 1, 4]
    for b, (views, _, _) in enumerate(batch):  # view-major: out[group][v][b] is sample b's view v
        assert torch.equal(out["global"][1, b], views[1])
        assert torch.equal(out["local"][2, b], views[4])


def test_collate_without_locals():
    aug = small_aug(num_local=0)
    ds = ArrayDataset(np.zeros((4, 28, 28), np.uint8), np.arange(4), aug)
    batch = [ds[i] for i in range(4)]
    out = aug.collate(batch)
    assert out["global"].shape == (2, 4, 3, 32, 32)
    assert out["local"].shape == (0, 4, 3, 16, 16)
    with pytest.raises(ValueError, match="local_size"):
        collate_multicrop(batch)


def test_rgb_hwc_dataset():
    images = np.stack([colourful_rgb(24, 24).permute(1, 2, 0).numpy()] * 3)  # [N, H, W, C]
    ds = ArrayDataset(images, [0, 1, 2], EvalTransform(24, 24, normalize=False))
    torch.testing.assert_close(ds[1][0], colourful_rgb(24, 24).float() / 255, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        ArrayDataset(images, [0, 1])


def test_dataloader_workers_seeded_by_torch():
    # Each worker's torch RNG is seeded from the main process's RNG: manual_seed fixes every view.
    ds = ArrayDataset(np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8), np.arange(8),
                      small_aug())

    def first_batches():
        loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=ds.transform.collate)
        return [b["global"] for b in loader]

    torch.manual_seed(5)
    a = first_batches()
    torch.manual_seed(5)
    b = first_batches()
    torch.manual_seed(6)
    c = first_batches()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    # Workers are not replicas of each other: batches 0 and 1 come from different workers, same images
    # would still differ in views because the worker seeds differ.
    assert not torch.equal(a[0], a[1])
