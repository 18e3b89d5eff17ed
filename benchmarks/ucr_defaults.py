#!/usr/bin/env python
"""Do the UCR defaults work on a small ECG set? Builds a UCR-format set shaped like ECG200 from real PTB-XL records
and trains on it with `fit.py --task ucr` and no other flag.

    python benchmarks/ucr_defaults.py --data-dir ../shared/data/ptbxl \\
        --labels ../shared/data/ptbxl/labels/superdiagnostic.csv [--train 100 --test 200 --seconds 2.5]

The set: one lead (II) of the first `--seconds` of each record, label -1 for NORM-only records and 1 for records with
MI (ECG200's task: normal vs myocardial infarction), balanced; TRAIN from folds 1-8, TEST from fold 9 (fold 10 is
never read). Prints fit.py's result line (validation and TEST scores), the wall time, and the TEST accuracy of the UCR
archive's reference baseline (1-nearest neighbour, Euclidean distance on z-normalised series) on the same files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np

from msssm_serve.training.ptbxl import LEADS, load_labels, load_signals


def write_split(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    np.savetxt(path, np.column_stack([y, x]), delimiter="\t", fmt="%.4f")


def nearest_neighbour_accuracy(x_train, y_train, x_test, y_test) -> float:
    """The UCR archive's reference classifier: 1-NN, Euclidean distance between z-normalised series."""
    def z(x):
        return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-8)
    a, b = z(x_train), z(x_test)
    distances = (b**2).sum(1)[:, None] - 2 * b @ a.T + (a**2).sum(1)[None]
    return float((y_train[distances.argmin(1)] == y_test).mean())


def pick(records, folds: list[int], per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row indices and labels (-1 normal, 1 MI) of a balanced draw from `folds`."""
    in_folds = np.isin(records.folds, folds)
    k = {c: i for i, c in enumerate(records.classes)}
    labels = records.labels
    normal = np.flatnonzero(in_folds & (labels[:, k["NORM"]] == 1) & (labels.sum(1) == 1))
    mi = np.flatnonzero(in_folds & (labels[:, k["MI"]] == 1))
    rows = np.concatenate([rng.choice(normal, per_class, replace=False), rng.choice(mi, per_class, replace=False)])
    return rows, np.repeat([-1, 1], per_class)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--labels", help="superdiagnostic label table (or the official metadata when omitted)")
    p.add_argument("--train", type=int, default=100, help="TRAIN series (half of each class)")
    p.add_argument("--test", type=int, default=200, help="TEST series (half of each class)")
    p.add_argument("--seconds", type=float, default=2.5)
    p.add_argument("--out", default="runs/ucr_defaults")
    args = p.parse_args(argv)

    records = load_labels(args.data_dir, "superdiagnostic", args.labels)
    signals = load_signals(args.data_dir, records)
    lead, length = LEADS.index("II"), round(args.seconds * 100)
    rng = np.random.default_rng(0)
    folder = Path(args.out) / "PTBXL_MI"
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, folds, n in (("TRAIN", list(range(1, 9)), args.train), ("TEST", [9], args.test)):
        rows, y = pick(records, folds, n // 2, rng)
        splits[split] = (np.asarray(signals[rows, :length, lead]), y)
        write_split(folder / f"PTBXL_MI_{split}.tsv", *splits[split])

    started = time.perf_counter()
    run = subprocess.run([sys.executable, str(ROOT / "training" / "fit.py"), "--task", "ucr", "--data-dir",
                          str(folder), "--out", str(Path(args.out) / "run")], capture_output=True, text=True)
    if run.returncode != 0:
        print(run.stderr[-3000:], file=sys.stderr)
        return run.returncode
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps({**result, "train_series": args.train, "test_series": args.test, "length": length,
                      "wall_s": round(time.perf_counter() - started, 1),
                      "baseline_1nn_euclidean_test_accuracy": nearest_neighbour_accuracy(*splits["TRAIN"], *splits["TEST"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
