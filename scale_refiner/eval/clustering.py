"""k-means clustering of L2-normalised CLS features (mini-batch k-means, best of several runs by k-means loss)
and its metrics: ACC (best one-to-one matching of clusters to classes, Hungarian algorithm), NMI, AMI, ARI,
Davies-Bouldin and silhouette (scikit-learn)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from scale_refiner.eval.knn import check_split


def cluster_accuracy(y_true, y_pred) -> float:
    """Accuracy under the best one-to-one assignment of clusters to classes (unmatched clusters count as
    wrong when there are more clusters than classes)."""
    from scipy.optimize import linear_sum_assignment

    y_true, y_pred = np.asarray(y_true).astype(np.int64), np.asarray(y_pred).astype(np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"cluster_accuracy needs two equal-length non-empty label vectors, got "
                         f"{y_true.shape} and {y_pred.shape}")
    _, t = np.unique(y_true, return_inverse=True)
    _, p = np.unique(y_pred, return_inverse=True)
    counts = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(counts, (p, t), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(y_true))


def kmeans_eval(feats: torch.Tensor, labels: torch.Tensor, n_clusters: int = 0, runs: int = 3, seed: int = 0,
                batch_size: int = 4096, silhouette_samples: int = 10000) -> dict:
    """Mini-batch k-means on L2-normalised ``feats`` (``n_clusters`` 0: the number of classes), ``runs``
    restarts with seeds seed..seed+runs-1, the run with the lowest inertia kept. Metrics in [0, 1] except
    Davies-Bouldin (>= 0, lower is better) and silhouette ([-1, 1]; on a seeded subsample of
    ``silhouette_samples`` when larger)."""
    from sklearn import metrics
    from sklearn.cluster import MiniBatchKMeans

    check_split(feats, labels, "clustering")
    k = n_clusters or int(labels.unique().numel())
    if not 2 <= k < len(feats):
        raise ValueError(f"k-means with {k} clusters needs more than {k} samples (got {len(feats)}) and k >= 2")
    if runs < 1:
        raise ValueError(f"k-means runs must be >= 1, got {runs}")
    x = F.normalize(feats.float(), dim=1).numpy().astype(np.float64)
    y = labels.numpy()
    best = None
    inertias = []
    for r in range(runs):
        km = MiniBatchKMeans(n_clusters=k, n_init=1, random_state=seed + r, batch_size=min(batch_size, len(x)),
                             compute_labels=True)
        km.fit(x)
        inertias.append(float(km.inertia_))
        if best is None or km.inertia_ < best.inertia_:
            best = km
    pred = best.labels_
    out = {"n_clusters": k, "runs": runs, "inertia": float(best.inertia_), "inertias": inertias,
           "acc": cluster_accuracy(y, pred),
           "nmi": float(metrics.normalized_mutual_info_score(y, pred)),
           "ami": float(metrics.adjusted_mutual_info_score(y, pred)),
           "ari": float(metrics.adjusted_rand_score(y, pred))}
    if len(np.unique(pred)) >= 2:
        out["davies_bouldin"] = float(metrics.davies_bouldin_score(x, pred))
        sample = min(silhouette_samples, len(x)) if silhouette_samples else None
        out["silhouette"] = float(metrics.silhouette_score(x, pred, sample_size=sample, random_state=seed))
    else:  # every point in one cluster: both scores are undefined
        out["davies_bouldin"] = out["silhouette"] = None
    return out
