"""Training-time views of a record: random crops, gain and noise, and lead subsets (numpy, before the model)."""

from __future__ import annotations

import numpy as np

# Lead sets that real devices record, drawn often so the model is good on them (names as in PTB-XL's LEADS):
# one lead (wearables, Holter), two or three (Holter, MIT-BIH's MLII + V1), limb leads (3-5-electrode monitors).
DEVICE_SUBSETS = (
    ("II",), ("I",), ("V1",), ("V5",),
    ("I", "II"), ("II", "V1"), ("II", "V5"),
    ("I", "II", "III"), ("I", "II", "V1"),
    ("I", "II", "III", "AVR", "AVL", "AVF"),
    ("I", "II", "III", "AVR", "AVL", "AVF", "V1"),
)


def random_crops(x: np.ndarray, idx: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """A random `crop`-sample window of each record x[idx] (the whole record when crop <= 0 or >= its length)."""
    length = x.shape[1]
    if crop <= 0 or crop >= length:
        return np.asarray(x[idx], dtype=np.float32)
    starts = rng.integers(0, length - crop + 1, len(idx))
    return np.stack([x[i, s : s + crop] for i, s in zip(idx, starts)]).astype(np.float32)


def augment(xb: np.ndarray, rng: np.random.Generator, amp_jitter: float, noise_std: float) -> np.ndarray:
    """Per-record amplitude scaling, log-uniform in [1/(1+amp_jitter), 1+amp_jitter] (electrode contact and gain
    vary between recordings), plus white noise of `noise_std` in the signal's units; both 0: unchanged."""
    if amp_jitter > 0:
        bound = np.log1p(amp_jitter)
        xb = xb * np.exp(rng.uniform(-bound, bound, (len(xb), 1, 1))).astype(np.float32)
    if noise_std > 0:
        xb = xb + rng.normal(0.0, noise_std, xb.shape).astype(np.float32)
    return xb


def mixup(xb: np.ndarray, yb: np.ndarray, rng: np.random.Generator, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Each record blended with another of the batch, record and label alike, by a weight drawn from Beta(alpha,
    alpha) (mixup, Zhang et al. 2018): on a training set of a few dozen series a model otherwise reaches zero
    training loss within a few hundred steps and goes on fitting noise. alpha 0: unchanged."""
    if alpha <= 0 or len(xb) < 2:
        return xb, yb
    lam = rng.beta(alpha, alpha, len(xb)).astype(np.float32)
    lam = np.maximum(lam, 1 - lam)  # the record keeps the larger share: its own label stays the larger
    partner = rng.permutation(len(xb))
    xb = lam[:, None, None] * xb + (1 - lam[:, None, None]) * xb[partner]
    yb = lam[:, None] * yb + (1 - lam[:, None]) * yb[partner]
    return xb.astype(np.float32), yb.astype(np.float32)


def mask_leads(xb: np.ndarray, rng: np.random.Generator, leads: list[str], p_all: float = 0.2,
               p_device: float = 0.4) -> np.ndarray:
    """Each record keeps a random subset of its leads; the others become NaN, which a `lead_mask` model reads as
    "not recorded". With probability p_all all leads stay, with p_device one of DEVICE_SUBSETS, otherwise a uniform
    random subset of 1..C-1 leads. xb [B, L, C] is changed in place and returned."""
    index = {name: i for i, name in enumerate(leads)}
    subsets = [[index[n] for n in s] for s in DEVICE_SUBSETS if all(n in index for n in s)]
    n_leads = len(leads)
    for row in range(len(xb)):
        draw = rng.random()
        if draw < p_all or n_leads == 1:
            continue
        if draw < p_all + p_device and subsets:
            keep = subsets[rng.integers(len(subsets))]
        else:
            keep = rng.choice(n_leads, size=rng.integers(1, n_leads), replace=False)
        dropped = np.setdiff1d(np.arange(n_leads), keep)
        xb[row, :, dropped] = np.nan
    return xb


def keep_leads(x: np.ndarray, leads: list[str], keep: list[str]) -> np.ndarray:
    """A float32 copy of x [n, L, C] with every lead not in `keep` set to NaN (validation on a lead subset)."""
    out = np.array(x, dtype=np.float32)
    dropped = [i for i, name in enumerate(leads) if name not in set(keep)]
    out[..., dropped] = np.nan
    return out
