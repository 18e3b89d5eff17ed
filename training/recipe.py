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

Under CV_BELOW TRAIN series, though, a held-out fifth is 5-50 series: too few to choose on, and a model trained on
so few reaches zero training loss within a few hundred steps. There the run selects by FOLDS-fold cross-validation
instead (loop._train_cross_validated): a model per fold, trained with mixup (MIXUP) and stopped on its fold, the
template chosen on all the out-of-fold predictions, the fold models served as the ensemble, no refit (ten small
sets: 0.917 -> 0.942 of ROCKET's accuracy with five folds). Ten folds, each model trained on nine tenths of TRAIN,
lowered the out-of-fold loss on nine of the ten (TRAIN only; the choice of FOLDS) and took them to 0.971; the ten
models cost twice the training and serve at ten times one model's cost per sample (docs/experiments.md). Larger
sets keep the held-out fifth and the refit, with mixup too (MedicalImages and SwedishLeaf: 0.970 -> 0.995 and
0.956 -> 0.988 of ROCKET's).

On a set of a few dozen series the refit's TEST accuracy moves with its seed by up to 0.18 (docs/experiments.md), so
the refit is done MEMBERS times from different seeds and the members are served as one ensemble (the mean of their
probabilities, model.EnsembleClassifier; `--members` overrides). The step budget bounds what that costs at any size:
a refit runs at most as many steps as a selection run, and usually far fewer (it stops at the chosen epoch).
"""

from __future__ import annotations

import math

import numpy as np

from msssm_serve.training.data import template_share

STEPS = 2000
MIN_EPOCHS, MAX_EPOCHS = 100, 600
MIN_BATCH, MAX_BATCH = 4, 32
MEMBERS = 5
FOLDS = 10
CV_BELOW = 250
MIXUP = 0.4
MIN_PATIENCE = 20


def folds_wanted(args, n_train: int | None = None) -> int:
    """How many cross-validation folds select the model (`--folds`); 1: one held-out split. Unset: FOLDS for a ucr
    set of fewer than CV_BELOW TRAIN series (n_train; None: not read yet), 1 for a larger one, for ptbxl, and where
    a refit or its members are asked for."""
    if args.folds is not None:
        return args.folds
    if args.task != "ucr" or args.refit == "on" or args.members != "auto":
        return 1
    return FOLDS if n_train is None or n_train < CV_BELOW else 1


def patience_for(args) -> int:
    """Epochs without a better validation figure after which a selection run stops (`--patience`; unset: a third
    of the epochs, at least MIN_PATIENCE, for ucr; 0, never, for ptbxl)."""
    if args.patience is not None:
        return args.patience
    return max(MIN_PATIENCE, args.epochs // 3) if args.task == "ucr" else 0


def mixup_for(args) -> float:
    """The mixup strength (`--mixup`; unset: MIXUP for ucr, whose small sets' models otherwise reach zero training
    loss within a few hundred steps and whose larger sets gained from it too; off for ptbxl)."""
    if args.mixup is not None:
        return args.mixup
    return MIXUP if args.task == "ucr" else 0.0


def refit_wanted(args) -> bool:
    """Whether the run is refitted on all of TRAIN after its selection run (`--refit`; auto: for ucr selected on one
    held-out split)."""
    return args.refit == "on" or (args.refit == "auto" and args.task == "ucr" and folds_wanted(args) == 1)


def ucr_recipe(n_train: int) -> dict:
    """Batch size and epochs for a training split of n_train series."""
    batch = max(MIN_BATCH, min(MAX_BATCH, n_train // 8))
    steps_per_epoch = max(1, n_train // batch)
    epochs = max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(STEPS / steps_per_epoch)))
    return {"batch_size": batch, "epochs": epochs}


def apply_ucr_recipe(args, x_train: np.ndarray) -> dict:
    """Fill the unset (None) batch size and epochs of `args` from the rules (for the training split x_train), and the
    refit's members (`auto`); -> what the rules chose, with the share of the variance that the training mean series
    explains (a description of the set, recorded beside them)."""
    chosen = ucr_recipe(len(x_train))
    for name, value in chosen.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.members == "auto":
        args.members = str(folds_wanted(args) if folds_wanted(args) > 1 else MEMBERS)
    return {**{name: getattr(args, name) for name in chosen}, "members": int(args.members), "template": args.template,
            "template_share": round(template_share(x_train), 4)}
