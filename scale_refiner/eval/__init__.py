"""Evaluation of encoders: the protocols of docs/evaluation.md.

- ``features``: per-block CLS taps, final-norm CLS, last-n normed CLS + mean patch; distributed extraction.
- ``knn``: weighted k-NN, per-block k-NN, ``quick_knn`` for use during training, input checks.
- ``linear``: linear probe with the whole (feature set x learning rate) sweep trained at once.
- ``lowshot``: logistic regression on 1 / 2 / 5 images per class.
- ``clustering``: mini-batch k-means, ACC (Hungarian), NMI, AMI, ARI, Davies-Bouldin, silhouette.
- ``loading``: encoders from a run directory / checkpoint (EMA or online) or a registered name + weights.
- ``suite``: the protocols together and the report (metrics.json, metrics.md, plots); CLI: launch/evaluate.py.
"""
