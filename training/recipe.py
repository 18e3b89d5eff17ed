"""Defaults by rules of the data, for flags left unset: what a user bringing any labelled series (`--task ucr`) gets
without tuning. PTB-XL's defaults are its bundled recipe and are set in fit.py.

UCR sets hold 16 to a few thousand training series. A fixed batch and epoch count either starves the smallest (16
series in batches of 16: one optimiser step per epoch) or overtrains the largest, so both follow the training size:
batches of about an eighth of the set (4 to 32 series), and as many epochs as give about STEPS optimiser steps
(between MIN_EPOCHS and MAX_EPOCHS). A set this small also loses much by holding a fifth out for validation, so by
default the run is done twice: once on the split to choose the epoch (and raw or averaged weights) on validation, then
again on the whole of TRAIN for that many epochs (`--refit`).

Many UCR sets are one shape with small class-specific departures from it (spectra, outlines, profiles): when the
training set's mean series explains at least TEMPLATE_MIN_SHARE of the variance of its samples, the model is also fed
each sample's deviation from that mean series (ModelConfig.template_length). Below it the shape is not shared and the
extra input only adds a way to overfit (see docs/experiments.md for the validation figures that set the threshold).
"""

from __future__ import annotations

import math

import numpy as np

STEPS = 2000
MIN_EPOCHS, MAX_EPOCHS = 100, 600
MIN_BATCH, MAX_BATCH = 4, 32
TEMPLATE_MIN_SHARE = 0.85


def ucr_recipe(n_train: int) -> dict:
    """Batch size and epochs for a training split of n_train series."""
    batch = max(MIN_BATCH, min(MAX_BATCH, n_train // 8))
    steps_per_epoch = max(1, n_train // batch)
    epochs = max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(STEPS / steps_per_epoch)))
    return {"batch_size": batch, "epochs": epochs}


def template_share(x: np.ndarray) -> float:
    """Share of the variance of the samples of x [n, L, C] that their mean series (over n) explains."""
    x = np.asarray(x, dtype=np.float64)
    total = x.var(axis=(0, 1)).sum()
    return float(1 - (x - x.mean(0)).var(axis=(0, 1)).sum() / total) if total > 0 else 0.0


def apply_ucr_recipe(args, x_train: np.ndarray) -> dict:
    """Fill the unset (None) batch size and epochs of `args`, and an `auto` --template, from the rules of the training
    series x_train [n, L, C]; -> what the rules chose."""
    chosen = ucr_recipe(len(x_train))
    for name, value in chosen.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    share = template_share(x_train)
    if args.template == "auto":
        args.template = "on" if share >= TEMPLATE_MIN_SHARE else "off"
    return {**{name: getattr(args, name) for name in chosen}, "template": args.template,
            "template_share": round(share, 4)}
