"""Low-shot classification: multinomial logistic regression (scikit-learn, lbfgs) on 1, 2, 5, ... labelled
images per class, averaged over seeded random draws of the labelled images.

Features are standardised with the mean / std of the whole train split (label-free statistics), then
L2-normalised, as for k-NN. The draw for seed s picks, per class, ``shots`` indices with
``numpy.random.default_rng(seed)``; the classifier is evaluated on the whole test split.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from scale_refiner.eval.knn import check_classes, check_split, prepare


def lowshot(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
            test_labels: torch.Tensor, shots: Sequence[int] = (1, 2, 5), seeds: Sequence[int] = (0, 1, 2),
            C: float = 1.0, max_iter: int = 1000) -> dict:
    """Returns ``{str(shots): {"mean", "std", "per_seed"}}`` (accuracies in [0, 1]). A shot count that some
    class cannot supply raises a ValueError naming the class."""
    from sklearn.linear_model import LogisticRegression

    check_split(train_feats, train_labels, "train", min_samples=2)
    check_split(test_feats, test_labels, "test")
    check_classes(train_labels, test_labels)
    train, test = prepare(train_feats.float(), test_feats.float())
    train, test = train.numpy().astype(np.float64), test.numpy().astype(np.float64)
    y_train, y_test = train_labels.numpy(), test_labels.numpy()
    classes, counts = np.unique(y_train, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"low-shot needs at least 2 classes in the train split, found {classes.tolist()}")
    results = {}
    for n in shots:
        short = [(int(c), int(k)) for c, k in zip(classes, counts) if k < n]
        if short:
            raise ValueError(f"low-shot with {n} images per class: classes (class, count) {short} have fewer")
        accs = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            idx = np.concatenate([rng.choice(np.flatnonzero(y_train == c), n, replace=False) for c in classes])
            clf = LogisticRegression(C=C, max_iter=max_iter)
            clf.fit(train[idx], y_train[idx])
            accs.append(float((clf.predict(test) == y_test).mean()))
        results[str(n)] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "per_seed": accs}
    return results
