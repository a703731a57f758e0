"""Weighted k-NN classification (DINO protocol): features standardised with the train set's mean and std,
L2-normalised, cosine similarity, top-k neighbours voting with weight exp(sim / T)."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F


def prepare(train: torch.Tensor, test: torch.Tensor):
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp(min=1e-6)
    return F.normalize((train - mean) / std, dim=1), F.normalize((test - mean) / std, dim=1)


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = (10, 20), temperature: float = 0.07,
                 chunk: int = 1024) -> Dict[int, float]:
    """Top-1 accuracy (in [0, 1]) for each k, computed in test chunks to bound memory."""
    train, test = prepare(train_feats.float(), test_feats.float())
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    max_k = max(ks)
    correct = {k: 0 for k in ks}
    for start in range(0, test.shape[0], chunk):
        sims, idx = (test[start:start + chunk] @ train.T).topk(max_k, dim=1)
        weights = (sims / temperature).exp()
        votes_labels = train_labels[idx]
        truth = test_labels[start:start + chunk]
        for k in ks:
            votes = torch.zeros(idx.shape[0], num_classes)
            votes.scatter_add_(1, votes_labels[:, :k], weights[:, :k])
            correct[k] += int((votes.argmax(1) == truth).sum())
    return {k: correct[k] / test.shape[0] for k in ks}
