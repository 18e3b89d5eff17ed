"""Defaults by rules of the data, for flags left unset: what a user bringing any labelled series (`--task ucr`) gets
without tuning. PTB-XL's defaults are its bundled recipe and are set in fit.py.

UCR sets hold 16 to a few thousand training series. A fixed batch and epoch count either starves the smallest (16
series in batches of 16: one optimiser step per epoch) or overtrains the largest, so both follow the training size:
batches of about an eighth of the set (4 to 32 series), and as many epochs as give about STEPS optimiser steps
(between MIN_EPOCHS and MAX_EPOCHS). A set this small also loses much by holding a fifth out for validation, so by
default the run is done twice: once on the split to choose the epoch (and raw or averaged weights) on validation, then
again on the whole of TRAIN for that many epochs (`--refit`).

Many UCR sets are one shape with small class-specific departures from it (spectra, outlines, profiles), where the
model needs each sample's deviation from the training mean series (ModelConfig.template_length); on others that input
only adds a way to overfit, and no simple statistic of the data told the two apart (docs/experiments.md). So the
selection is run without and with it, and the refit takes the better on validation (loop.train).

On a set of a few dozen series the refit's TEST accuracy moves with its seed by several points, so small sets are
refitted several times from different seeds and served as one ensemble (the mean of the members' probabilities,
model.EnsembleClassifier): MEMBERS refits for sets of up to MEMBERS_MAX_SERIES training series, one above, where the
seed moves less and every member costs a refit of a larger set (`--members` overrides).
"""

from __future__ import annotations

import math

import numpy as np

from msssm_serve.training.data import template_share

STEPS = 2000
MIN_EPOCHS, MAX_EPOCHS = 100, 600
MIN_BATCH, MAX_BATCH = 4, 32
MEMBERS, MEMBERS_MAX_SERIES = 5, 100


def ucr_recipe(n_train: int) -> dict:
    """Batch size and epochs for a training split of n_train series."""
    batch = max(MIN_BATCH, min(MAX_BATCH, n_train // 8))
    steps_per_epoch = max(1, n_train // batch)
    epochs = max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(STEPS / steps_per_epoch)))
    return {"batch_size": batch, "epochs": epochs}


def ucr_members(n_series: int) -> int:
    """Refits served as one ensemble, for a TRAIN of n_series series (validation split included)."""
    return MEMBERS if n_series <= MEMBERS_MAX_SERIES else 1


def apply_ucr_recipe(args, x_train: np.ndarray, n_series: int) -> dict:
    """Fill the unset (None) batch size and epochs of `args` from the rules (for the training split x_train), and the
    refit's members (`auto`) for a TRAIN of n_series series; -> what the rules chose, with the share of the variance
    that the training mean series explains (a description of the set, recorded beside them)."""
    chosen = ucr_recipe(len(x_train))
    for name, value in chosen.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.members == "auto":
        args.members = str(ucr_members(n_series))
    return {**{name: getattr(args, name) for name in chosen}, "members": int(args.members), "template": args.template,
            "template_share": round(template_share(x_train), 4)}
