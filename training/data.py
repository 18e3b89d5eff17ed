"""The data a run trains and selects on: PTB-XL folds 1-8 / 9 or a UCR TRAIN split, and the input normalisation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msssm_serve.training.metrics import one_hot
from msssm_serve.training.ptbxl import LEADS, DataError, load_labels, load_signals, split_folds
from msssm_serve.training.ucr import load_ucr

PTBXL_DATA = {"name": "PTB-XL", "licence": "CC BY 4.0", "citation": "Wagner et al., Scientific Data 7, 154 (2020)"}


@dataclass
class TaskData:
    x_train: np.ndarray  # [n, L, C] float32 (may be a memmap)
    y_train: np.ndarray  # [n, K] 0/1 float32 (one-hot when single-label)
    x_val: np.ndarray
    y_val: np.ndarray
    classes: list[str]
    multi_label: bool
    sample_rate: int
    leads: list[str]
    info: dict = field(default_factory=dict)
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None


def load_task(args) -> TaskData:
    if args.task == "ptbxl":
        records = load_labels(args.data_dir, args.label_set, args.labels, args.sampling_rate)
        split = split_folds(records)
        if len(split["train"]) == 0 or len(split["val"]) == 0:
            raise DataError(f"{args.data_dir}: need records in folds 1-8 (train) and fold 9 (validation)")
        train, val = records.subset(split["train"]), records.subset(split["val"])
        info = {
            **PTBXL_DATA,
            "data_dir": str(args.data_dir),
            "labels_csv": str(args.labels) if args.labels else None,
            "label_set": args.label_set,
            "train_records": len(train.ids),
            "val_records": len(val.ids),
            "folds": {"train": "1-8", "validation": 9, "test": "10 (never used by training)"},
        }
        return TaskData(
            x_train=load_signals(args.data_dir, train, cache_dir=args.cache_dir, sampling_rate=args.sampling_rate),
            y_train=train.labels,
            x_val=load_signals(args.data_dir, val, cache_dir=args.cache_dir, sampling_rate=args.sampling_rate),
            y_val=val.labels,
            classes=records.classes,
            multi_label=True,
            sample_rate=args.sampling_rate,
            leads=list(LEADS),
            info=info,
        )
    data = load_ucr(args.data_dir)
    k = len(data.classes)
    # Validation carved from TRAIN, stratified, so model selection never sees TEST.
    fold = getattr(args, "cv_fold", None)
    val_mask = (cv_fold_mask(data.y_train, k, args.cv_folds, fold, args.cv_seed) if fold is not None
                else holdout_mask(data.y_train, k, args.val_fraction, args.seed))
    return TaskData(
        x_train=data.x_train[~val_mask],
        y_train=one_hot(data.y_train[~val_mask], k),
        x_val=data.x_train[val_mask],
        y_val=one_hot(data.y_train[val_mask], k),
        classes=data.classes,
        multi_label=False,
        sample_rate=args.sampling_rate,
        # the univariate format's one channel keeps the name its models always had; .ts dimensions are numbered
        leads=["signal"] if data.x_train.shape[2] == 1 else [f"dim_{c}" for c in range(data.x_train.shape[2])],
        info={"name": Path(args.data_dir).name, "format": "UCR", "data_dir": str(args.data_dir)},
        x_test=data.x_test,
        y_test=one_hot(data.y_test, k),
    )


def holdout_mask(y: np.ndarray, n_classes: int, fraction: float, seed: int) -> np.ndarray:
    """The validation series of labels y: `fraction` of each class drawn at random (at least one; none of a class
    with a single series)."""
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in range(n_classes):
        members = rng.permutation(np.flatnonzero(y == c))
        val_idx.extend(members[: max(1, round(len(members) * fraction))] if len(members) > 1 else [])
    mask = np.zeros(len(y), bool)
    mask[val_idx] = True
    return mask


def cv_fold_mask(y: np.ndarray, n_classes: int, folds: int, fold: int, seed: int) -> np.ndarray:
    """The validation series of fold `fold` of `folds` stratified folds of labels y: each class shuffled, the classes
    laid one after another and dealt round the folds, so that every series is in exactly one fold's validation and
    the folds differ in size by at most one."""
    rng = np.random.default_rng(seed)
    dealt = np.concatenate([rng.permutation(np.flatnonzero(y == c)) for c in range(n_classes)])
    return np.isin(np.arange(len(y)), dealt[fold::folds])


def fit_normalisation(x: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per-lead mean / std over every training sample, in chunks (x may be a memmap larger than memory)."""
    total = np.zeros(x.shape[-1])
    total_sq = np.zeros(x.shape[-1])
    count = 0
    for i in range(0, len(x), chunk):
        part = np.asarray(x[i : i + chunk], dtype=np.float64).reshape(-1, x.shape[-1])
        total += part.sum(0)
        total_sq += (part**2).sum(0)
        count += len(part)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def fit_template(x: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean series of x [n, L, C] over its first `length` samples, [length, C], and per lead the std of the
    deviations from it (what the model divides them by)."""
    x = np.asarray(x[:, :length], dtype=np.float64)
    template = x.mean(0)
    std = np.sqrt(((x - template) ** 2).mean((0, 1)))
    return template.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def template_share(x: np.ndarray) -> float:
    """Share of the variance of the samples of x [n, L, C] that their mean series (fit_template's) explains."""
    _, deviation_std = fit_template(x, x.shape[1])
    total = np.asarray(x, dtype=np.float64).var(axis=(0, 1)).sum()
    return float(1 - (deviation_std.astype(np.float64) ** 2).sum() / total) if total > 0 else 0.0
