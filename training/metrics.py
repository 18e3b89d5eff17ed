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


def per_class_auroc_by_name(classes: list[str], labels: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
    """{class: AUROC}, None (JSON null, where NaN is not JSON) for a class with a single value present."""
    return {c: None if np.isnan(v) else float(v) for c, v in zip(classes, per_class_auroc(labels, scores))}


def macro_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(np.nanmean(per_class_auroc(labels, scores)))


def bootstrap_macro_auroc(labels, scores, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                          max_draws_per_sample: int = 100) -> dict:
    """Point estimate and percentile interval. Like the benchmark, a resample is redrawn until every class has
    both a positive and a negative example, so that every resample's macro AUROC covers all classes. Classes with
    a single value in the whole set are left out, as the point estimate leaves them out (no resample could have
    both values). Where valid resamples are too rare (a class with one or two examples), or no class can be scored,
    the interval is None with the reason in `ci_note`, rather than drawing for ever or failing a finished run."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    n = len(labels)
    scored = (labels.sum(0) > 0) & (labels.sum(0) < n)
    result = {"macro_auroc": macro_auroc(labels, scores) if scored.any() else None, "ci_low": None,
              "ci_high": None, "n_boot": n_boot}
    if not scored.any():
        return {**result, "ci_note": "no class has both positive and negative examples"}
    labels, scores = labels[:, scored], scores[:, scored]
    rng = np.random.default_rng(seed)
    values, draws = [], 0
    while len(values) < n_boot:
        if draws >= max_draws_per_sample * n_boot:
            return {**result, "ci_note": f"only {len(values)} of {draws} resamples of {n} rows had both values of "
                                         "every class: too few examples of a rare class for an interval"}
        draws += 1
        idx = rng.integers(0, n, n)
        pos = labels[idx].sum(0)
        if (pos == 0).any() or (pos == n).any():
            continue
        values.append(macro_auroc(labels[idx], scores[idx]))
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return {**result, "ci_low": float(lo), "ci_high": float(hi)}
