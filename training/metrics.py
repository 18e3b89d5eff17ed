"""Classification metrics: macro AUROC and its bootstrap interval, as the PTB-XL benchmark computes them."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def one_hot(y: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(y), n_classes), dtype=np.float32)
    out[np.arange(len(y)), y] = 1
    return out


def per_class_auroc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """labels, scores: [n, K]; NaN for a class with only one value present."""
    out = np.full(labels.shape[1], np.nan)
    for k in range(labels.shape[1]):
        if 0 < labels[:, k].sum() < len(labels):
            out[k] = roc_auc_score(labels[:, k], scores[:, k])
    return out


def macro_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(np.nanmean(per_class_auroc(labels, scores)))


def bootstrap_macro_auroc(labels, scores, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Point estimate and percentile interval. Like the benchmark, a resample is redrawn until every class has
    both a positive and a negative example, so that every resample's macro AUROC covers all classes."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    values = []
    while len(values) < n_boot:
        idx = rng.integers(0, n, n)
        pos = labels[idx].sum(0)
        if (pos == 0).any() or (pos == n).any():
            continue
        values.append(macro_auroc(labels[idx], scores[idx]))
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return {"macro_auroc": macro_auroc(labels, scores), "ci_low": float(lo), "ci_high": float(hi), "n_boot": n_boot}
