"""The evaluation suite over extracted features: which protocols, their options, and the report
(``metrics.json``, ``metrics.md``, PNG plots). ``launch/evaluate.py`` is the command line around it."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from scale_refiner.eval.knn import check_classes, check_split, knn_accuracy, per_block_knn
from scale_refiner.eval.linear import LinearProbeConfig, linear_probe, probe_parts, standard_sets

PROTOCOLS = ("knn", "blocks", "linear", "lowshot", "kmeans")


@dataclass
class SuiteOptions:
    ks: Sequence[int] = (10, 20)
    temperature: float = 0.07
    linear: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    shots: Sequence[int] = (1, 2, 5)
    lowshot_seeds: Sequence[int] = (0, 1, 2)
    kmeans_runs: int = 3
    kmeans_split: str = "test"
    seed: int = 0


def parse_protocols(text: str) -> List[str]:
    items = [p.strip() for p in text.split(",") if p.strip()]
    if items == ["all"]:
        return list(PROTOCOLS)
    unknown = [p for p in items if p not in PROTOCOLS]
    if unknown or not items:
        raise ValueError(f"unknown protocol(s) {unknown or text!r}; choose from {', '.join(PROTOCOLS)} (or all)")
    return items


def feature_keys(protocols: Sequence[str]) -> List[str]:
    """The ``extract_features`` outputs the protocols read."""
    keys = ["final"]
    if "blocks" in protocols:
        keys.append("taps")
    if "linear" in protocols:
        keys += ["last_cls", "mean_patch"]
    return keys


def run_protocols(train: Dict[str, torch.Tensor], train_labels: torch.Tensor, test: Dict[str, torch.Tensor],
                  test_labels: torch.Tensor, protocols: Sequence[str], opts: SuiteOptions = SuiteOptions()) -> dict:
    """``train`` / ``test``: ``extract_features`` outputs. Returns the metrics dict (accuracies in [0, 1])."""
    check_split(train["final"], train_labels, "train", min_samples=2)
    check_split(test["final"], test_labels, "test")
    check_classes(train_labels, test_labels)
    metrics: dict = {"n_train": len(train_labels), "n_test": len(test_labels),
                     "num_classes": int(train_labels.unique().numel()), "seconds": {}}
    for name in protocols:
        start = time.time()
        if name == "knn":
            acc = knn_accuracy(train["final"], train_labels, test["final"], test_labels, opts.ks, opts.temperature)
            metrics["knn"] = {str(k): v for k, v in acc.items()}
        elif name == "blocks":
            tr = torch.cat([train["taps"], train["final"][:, None]], 1)
            te = torch.cat([test["taps"], test["final"][:, None]], 1)
            acc = per_block_knn(tr, train_labels, te, test_labels, opts.ks, opts.temperature)
            depth = train["taps"].shape[1]
            metrics["blocks"] = {"labels": [f"block{i}" for i in range(depth)] + ["final"],
                                 **{f"knn{k}": v for k, v in acc.items()}}
        elif name == "linear":
            sets = standard_sets(train["last_cls"].shape[1])
            metrics["linear"] = linear_probe(probe_parts(train), train_labels, probe_parts(test), test_labels,
                                             sets, opts.linear)
        elif name == "lowshot":
            from scale_refiner.eval.lowshot import lowshot
            metrics["lowshot"] = lowshot(train["final"], train_labels, test["final"], test_labels, opts.shots,
                                         opts.lowshot_seeds)
        elif name == "kmeans":
            from scale_refiner.eval.clustering import kmeans_eval
            on_test = opts.kmeans_split == "test"
            feats, labels = (test["final"], test_labels) if on_test else (train["final"], train_labels)
            metrics["kmeans"] = dict(kmeans_eval(feats, labels, runs=opts.kmeans_runs, seed=opts.seed),
                                     split=opts.kmeans_split)
        else:
            raise ValueError(f"unknown protocol {name!r}")
        metrics["seconds"][name] = round(time.time() - start, 3)
    return metrics


def options_dict(opts: SuiteOptions) -> dict:
    return asdict(opts)


# ---------------------------------------------------------------------------------------------- report
def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def markdown_table(metrics: dict) -> str:
    rows = []
    if "knn" in metrics:
        for k, v in metrics["knn"].items():
            rows.append(("k-NN", f"k={k}, T=0.07, final-norm CLS", _pct(v)))
    if "blocks" in metrics:
        b = metrics["blocks"]
        for key in (k for k in b if k.startswith("knn")):
            accs = b[key]
            best = max(range(len(accs)), key=lambda i: accs[i])
            rows.append(("per-block k-NN", f"k={key[3:]}: best {b['labels'][best]}; "
                         + " ".join(f"{_pct(a)}" for a in accs), _pct(accs[best])))
    if "linear" in metrics:
        lin = metrics["linear"]
        sel = lin["selected_on"]
        for s, r in lin["per_set"].items():
            rows.append(("linear probe", f"{s}, lr {r['lr']:.3g} (chosen on {sel}; val {_pct(r['val'])})",
                         _pct(r["test"])))
        bst = lin["best"]
        rows.append(("linear probe (best)", f"{bst['set']}, lr {bst['lr']:.3g}, {lin['epochs']} epochs",
                     _pct(bst["test"])))
    if "lowshot" in metrics:
        for n, r in metrics["lowshot"].items():
            rows.append(("low-shot", f"{n} per class, logistic regression, {len(r['per_seed'])} seeds "
                         f"(std {_pct(r['std'])})", _pct(r["mean"])))
    if "kmeans" in metrics:
        km = metrics["kmeans"]
        setting = f"{km['n_clusters']} clusters, best of {km['runs']} runs, {km['split']} split"
        rows.append(("k-means ACC", setting, _pct(km["acc"])))
        for key, label in (("nmi", "NMI"), ("ami", "AMI"), ("ari", "ARI")):
            rows.append((f"k-means {label}", setting, _pct(km[key])))
        for key, label in (("davies_bouldin", "Davies-Bouldin (lower is better)"), ("silhouette", "silhouette")):
            v = km.get(key)
            rows.append((f"k-means {label}", setting, "-" if v is None else f"{v:.3f}"))
    lines = ["| protocol | setting | value (% for accuracies) |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def plot_blocks(metrics: dict, path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = metrics["blocks"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = list(range(len(b["labels"])))
    for key in (k for k in b if k.startswith("knn")):
        ax.plot(x, [100 * a for a in b[key]], marker="o", label=f"k={key[3:]}")
    ax.set_xticks(x, [lab.replace("block", "") for lab in b["labels"]])
    ax.set_xlabel("block (raw CLS), final = after the final norm")
    ax.set_ylabel("k-NN accuracy (%)")
    ax.set_title(title or "per-block k-NN")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tsne(feats: torch.Tensor, labels: torch.Tensor, path: Path, samples: int = 2000, seed: int = 0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.manifold import TSNE

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(feats), generator=g)[:samples].sort().values
    x = torch.nn.functional.normalize(feats[idx].float(), dim=1).numpy()
    y = labels[idx].numpy()
    emb = TSNE(n_components=2, perplexity=min(30.0, max(2.0, (len(x) - 1) / 3)), init="pca",
               random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(5, 5))
    for c in np.unique(y):
        m = y == c
        ax.scatter(emb[m, 0], emb[m, 1], s=4, label=str(int(c)))
    ax.set_title("t-SNE of test features (final-norm CLS)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(metrics: dict, out_dir: Path, title: str = "") -> List[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "metrics.json", out_dir / "metrics.md"]
    written[0].write_text(json.dumps(metrics, indent=2) + "\n")
    header = f"# {title}\n\n" if title else ""
    written[1].write_text(header + markdown_table(metrics))
    if "blocks" in metrics:
        plot_blocks(metrics, out_dir / "knn_per_block.png", title)
        written.append(out_dir / "knn_per_block.png")
    return written
