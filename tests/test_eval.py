"""Evaluation suite: k-NN against a brute-force reference, clustering ACC on a hand-computed case, linear probe
on separable data, per-block extraction order, 1 vs 2 ranks, bad inputs. The CLI runs are in test_eval_cli.py."""
import math

import pytest
import torch

from scale_refiner.config import ModelConfig
from scale_refiner.eval.clustering import cluster_accuracy, kmeans_eval
from scale_refiner.eval.features import extract_cls, extract_distributed, extract_features
from scale_refiner.eval.knn import knn_accuracy, per_block_knn, quick_knn
from scale_refiner.eval.linear import LinearProbeConfig, linear_probe
from scale_refiner.eval.lowshot import lowshot
from scale_refiner.eval.suite import SuiteOptions, run_protocols
from scale_refiner.models.vit import build_vit


def tiny_vit(arch="prenorm", seed=0):
    torch.manual_seed(seed)
    model = build_vit(ModelConfig(name="vit_test_patch4", img_size=16, arch=arch)).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a norm applied twice or skipped shows
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return model


def images(n, seed=1, size=16):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- k-NN
def knn_reference(train, train_y, test, test_y, k, T):
    """Explicit loops: standardise (train mean, unbiased std), L2-normalise, cosine, top-k, exp(sim/T) votes."""
    train, test = train.double().tolist(), test.double().tolist()
    n, d = len(train), len(train[0])
    mean = [sum(row[j] for row in train) / n for j in range(d)]
    std = [max(math.sqrt(sum((row[j] - mean[j]) ** 2 for row in train) / (n - 1)), 1e-6) for j in range(d)]

    def norm(row):
        z = [(row[j] - mean[j]) / std[j] for j in range(d)]
        length = math.sqrt(sum(v * v for v in z))
        return [v / length for v in z]

    train_n = [norm(r) for r in train]
    classes = int(max(max(train_y), max(test_y))) + 1
    correct = 0
    for row, truth in zip(test, test_y.tolist()):
        q = norm(row)
        sims = [(sum(a * b for a, b in zip(q, t)), i) for i, t in enumerate(train_n)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * classes
        for sim, i in sims[:k]:
            votes[int(train_y[i])] += math.exp(sim / T)
        pred = max(range(classes), key=lambda c: (votes[c], -c))
        correct += pred == truth
    return correct / len(test)


def test_knn_matches_bruteforce_reference():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(60, 6, generator=g) * torch.tensor([1.0, 5.0, 0.1, 2.0, 1.0, 3.0]) + 2.0
    train_y = torch.randint(0, 4, (60,), generator=g)
    train[:, 0] += train_y * 1.5  # some signal, so accuracies differ between k
    test = torch.randn(25, 6, generator=g) * 2.0
    test_y = torch.randint(0, 4, (25,), generator=g)
    test[:, 0] += test_y * 1.5
    ks = (1, 3, 10, 20)
    seen = set()
    for T in (0.07, 1.0):  # at 0.07 the nearest neighbour dominates the vote; at 1.0 k matters
        got = knn_accuracy(train, train_y, test, test_y, ks=ks, temperature=T, chunk=7)  # chunking exercised
        for k in ks:
            assert got[k] == pytest.approx(knn_reference(train, train_y, test, test_y, k, T), abs=1e-12), (k, T)
            seen.add(got[k])
    assert len(seen) > 2  # not a degenerate case where every setting agrees
    got = knn_accuracy(train, train_y, test, test_y, ks=ks)
    # per-block k-NN is k-NN of each block
    blocks = per_block_knn(torch.stack([train, -train], 1), train_y, torch.stack([test, -test], 1), test_y, (10,))
    assert blocks[10][0] == got[10] and blocks[10][1] == knn_accuracy(-train, train_y, -test, test_y, (10,))[10]


def test_quick_knn_equals_extract_then_knn():
    model = tiny_vit()
    tr, te = images(40, 1), images(12, 2)
    tr_y, te_y = torch.arange(40) % 3, torch.arange(12) % 3
    ref = knn_accuracy(extract_cls(model, tr, 16), tr_y, extract_cls(model, te, 16), te_y, (5, 10))
    model.train()
    assert quick_knn(model, (tr, tr_y), (te, te_y), ks=(5, 10), batch_size=16) == ref
    assert model.training  # mode restored


def test_eval_arrays_as_uint8_normalise_to_the_float_arrays():
    """The launcher keeps its k-NN images as uint8; normalised batch by batch they are the float arrays, bit
    for bit, so the k-NN is unchanged by the 4x smaller storage."""
    from scale_refiner.config import load_config
    from scale_refiner.data.augment import normalize_batch
    from scale_refiner.data.loaders import eval_arrays
    cfg = load_config("configs/demo.yaml", ["data.num_workers=0"])
    x, y = eval_arrays(cfg, "test", 96)
    x8, y8 = eval_arrays(cfg, "test", 96, uint8=True)
    assert x8.dtype == torch.uint8 and x8.shape == x.shape and torch.equal(y8, y)
    assert torch.equal(normalize_batch(x8), x)
    torch.manual_seed(0)
    model = build_vit(ModelConfig(name="vit_test_patch4", img_size=x.shape[-1])).eval()
    tr_y, te_y = y[:64] % 3, y[64:] % 3
    want = quick_knn(model, (x[:64], tr_y), (x[64:], te_y), ks=(5,), batch_size=16)
    assert quick_knn(model, (x8[:64], tr_y), (x8[64:], te_y), ks=(5,), batch_size=16,
                     prepare=normalize_batch) == want
    # bf16 autocast (what a GPU run measures with) runs and lands near the fp32 value
    bf16 = quick_knn(model, (x8[:64], tr_y), (x8[64:], te_y), ks=(5,), batch_size=16, prepare=normalize_batch,
                     autocast_dtype=torch.bfloat16)
    assert abs(bf16[5] - want[5]) <= 0.1


# ---------------------------------------------------------------------------------------------- clustering
def test_cluster_accuracy_hand_computed():
    y_true = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    y_pred = [1, 1, 0, 2, 2, 2, 0, 0, 0, 1]
    # counts (cluster x class): c0 -> [1, 0, 3], c1 -> [2, 0, 1], c2 -> [0, 3, 0]; best matching
    # c0->2 (3), c1->0 (2), c2->1 (3) = 8 of 10 (identity matching would give 1 + 0 + 0)
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(0.8)
    # more clusters than classes: cluster 1 stays unmatched
    assert cluster_accuracy([0, 0, 1, 1], [0, 1, 2, 2]) == pytest.approx(0.75)
    # label values are arbitrary ids
    assert cluster_accuracy([5, 5, 9, 9], [7, 7, 3, 3]) == 1.0


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(8)[:4] * 10
    y = torch.arange(200) % 4
    x = centers[y] + 0.1 * torch.randn(200, 8, generator=g)
    out = kmeans_eval(x, y, runs=2)
    assert out["acc"] == 1.0 and out["ari"] == pytest.approx(1.0) and out["nmi"] == pytest.approx(1.0)
    assert out["inertia"] == min(out["inertias"]) and out["silhouette"] > 0.9 and out["davies_bouldin"] < 0.2


# ------------------------------------------------------------------------------------------- linear probe
def separable(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    informative = torch.nn.functional.one_hot(y, 3).float() * 3 + 0.3 * torch.randn(n, 3, generator=g)
    informative = torch.cat([informative, torch.randn(n, 5, generator=g)], 1)  # + noise dims
    noise = torch.randn(n, 8, generator=g)
    return {"signal": informative, "noise": noise}, y


def test_linear_probe_separable_and_masked():
    train, train_y = separable(300, 0)
    test, test_y = separable(150, 1)
    sets = {"signal": ["signal"], "noise": ["noise"], "both": ["signal", "noise"]}
    cfg = LinearProbeConfig(lrs=(1e-3, 1e-2, 0.1), epochs=15, batch_size=32, val_fraction=0.2)
    out = linear_probe(train, train_y, test, test_y, sets, cfg)
    assert out["selected_on"] == "val" and out["n_val"] == 60 and out["n_train"] == 240
    assert len(out["sweep"]) == 9
    assert out["per_set"]["signal"]["test"] >= 0.98 and out["per_set"]["both"]["test"] >= 0.97
    assert out["best"]["test"] >= 0.98
    assert out["per_set"]["noise"]["test"] < 0.6  # the mask keeps the signal columns out of this set
    # every group is trained independently: one point alone equals the same point in the sweep
    alone = linear_probe(train, train_y, test, test_y, {"signal": ["signal"]},
                         LinearProbeConfig(lrs=(1e-2,), epochs=15, batch_size=32, val_fraction=0.2))
    in_sweep = next(p for p in out["sweep"] if p["set"] == "signal" and p["lr"] == 1e-2)
    assert alone["sweep"][0]["test"] == pytest.approx(in_sweep["test"], abs=1 / 150 + 1e-9)


# -------------------------------------------------------------------------------------------- features
@pytest.mark.parametrize("arch", ["prenorm", "postnorm"])
def test_block_features_equal_taps_and_manual_loop(arch):
    model = tiny_vit(arch)
    x = images(10)
    feats = extract_features(model, x, batch_size=4)
    depth = model.depth
    assert feats["taps"].shape == (10, depth, 32) and feats["last_cls"].shape == (10, 4, 32)
    with torch.no_grad():
        out = model([x], tap_blocks=list(range(depth)))[0]
        torch.testing.assert_close(feats["taps"], out["taps"], rtol=0, atol=1e-5)
        torch.testing.assert_close(feats["final"], out["final"], rtol=0, atol=1e-5)
        h = model.embed(x)
        for i, block in enumerate(model.blocks):  # the manual loop: block i's raw CLS is entry i
            h = block(h)
            torch.testing.assert_close(feats["taps"][:, i], h[:, 0], rtol=0, atol=1e-5)
            if i >= depth - 4:
                torch.testing.assert_close(feats["last_cls"][:, i - (depth - 4)], model.norm(h[:, 0]),
                                           rtol=0, atol=1e-5)
        torch.testing.assert_close(feats["mean_patch"], model.forward_tokens(x)[:, 1:].mean(1), rtol=0, atol=1e-5)
    # the taps differ block to block (the order matters)
    assert not torch.allclose(feats["taps"][:, 0], feats["taps"][:, 1])
    only = extract_features(model, x, batch_size=4, keys=["final"])
    assert list(only) == ["final"] and torch.equal(only["final"], feats["final"])
    with pytest.raises(ValueError, match="unknown feature keys"):
        extract_features(model, x, keys=["cls"])


def _dist_equal_single(rank, world):
    model = tiny_vit()
    tr, te = images(50, 3), images(23, 4)  # 50 = 6 batches of 8 + 2: uneven parts per rank
    tr_y, te_y = torch.arange(50) % 5, (torch.arange(23) * 7) % 5
    train = extract_features(model, tr, batch_size=8)  # the default group: 2 ranks
    test = extract_features(model, te, batch_size=8)
    quick = quick_knn(model, (tr, tr_y), (te, te_y), ks=(3, 10), batch_size=8)
    single_train = extract_features(model, tr, batch_size=8, rank=0, world=1)
    single_test = extract_features(model, te, batch_size=8, rank=0, world=1)
    for key in single_train:
        assert torch.equal(train[key], single_train[key]), key
        assert torch.equal(test[key], single_test[key]), key
    # more ranks than batches: still complete and in order
    few = extract_distributed(lambda b: {"x": b.flatten(1)[:, :3]}, tr[:5], 8, rank, world)
    assert torch.equal(few["x"], tr[:5].flatten(1)[:, :3])
    if rank:
        return  # rank 0 compares the metrics of the gathered features with a one-process run's
    opts = SuiteOptions(linear=LinearProbeConfig(lrs=(0.01, 0.1), epochs=2, batch_size=16), shots=(1, 2),
                        kmeans_runs=2)
    protocols = ["knn", "blocks", "linear", "lowshot", "kmeans"]
    dist_metrics = run_protocols(train, tr_y, test, te_y, protocols, opts)
    single_metrics = run_protocols(single_train, tr_y, single_test, te_y, protocols, opts)
    for m in (dist_metrics, single_metrics):
        m.pop("seconds")
    assert dist_metrics == single_metrics
    assert quick == {int(k): v for k, v in knn_accuracy(single_train["final"], tr_y, single_test["final"], te_y,
                                                         (3, 10)).items()}


def test_metrics_identical_on_one_and_two_ranks(gloo):
    gloo(_dist_equal_single, 2)


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    f, y = torch.randn(20, 4), torch.arange(20) % 2
    with pytest.raises(ValueError, match="empty"):
        knn_accuracy(f, y, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no labels"):
        knn_accuracy(f, None, f, y)
    with pytest.raises(ValueError, match=r"test classes \[2\] do not occur in the train split"):
        knn_accuracy(f, y, f[:3], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        knn_accuracy(f, y.float(), f, y)
    with pytest.raises(ValueError, match="exceeds"):
        knn_accuracy(f[:5], y[:5], f, y, ks=(10,))
    with pytest.raises(ValueError, match="empty split"):
        extract_distributed(lambda b: {"x": b}, torch.zeros(0, 3, 8, 8))
    with pytest.raises(ValueError, match="fewer"):
        lowshot(f, y, f, y, shots=(11,))
    with pytest.raises(ValueError, match="unknown parts"):
        linear_probe({"a": f}, y, {"a": f}, y, {"s": ["b"]})
    with pytest.raises(ValueError, match="do not occur"):
        run_protocols({"final": f}, y, {"final": f[:2]}, torch.tensor([0, 3]), ["knn"])
