"""UCR / UEA time-series archive reader: DIR/NAME/NAME_TRAIN.tsv and NAME_TEST.tsv (UCR 2018, univariate), or
DIR/NAME/NAME_TRAIN.ts and NAME_TEST.ts (the `.ts` format of the UEA multivariate archive and sktime/aeon).

A `.tsv` row is `label<TAB>x_1<TAB>...<TAB>x_L`; variable-length datasets pad rows with NaN. `.ts` files are read with
aeon's `load_from_ts_file` (the optional `uea` extra: `pip install 'msssm-serve[uea]'`); series of unequal length are
padded at the end, as in the `.tsv` files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from msssm_serve.training.ptbxl import DataError


@dataclass
class UCRData:
    x_train: np.ndarray  # [n_train, L, C] float32 (C = 1 for the univariate .tsv format)
    y_train: np.ndarray  # [n_train] int64 in 0..K-1
    x_test: np.ndarray  # [n_test, L, C] float32
    y_test: np.ndarray  # [n_test] int64
    classes: list[str]  # original label text of class k, as written in the train file


def load_ucr(data_dir) -> UCRData:
    """Read one UCR dataset; labels are mapped to 0..K-1 in sorted order of the train labels."""
    data_dir = Path(data_dir)
    name = data_dir.name
    suffix = ".ts" if (data_dir / f"{name}_TRAIN.ts").is_file() else ".tsv"
    read = _read_ts if suffix == ".ts" else _read_split
    train_labels, x_train = read(data_dir / f"{name}_TRAIN{suffix}")
    test_labels, x_test = read(data_dir / f"{name}_TEST{suffix}")
    if x_train.shape[2] != x_test.shape[2]:
        raise DataError(f"{data_dir}: TRAIN series have {x_train.shape[2]} dimensions, TEST series {x_test.shape[2]}")

    # UCR labels are any text ("1", "-1", "0.5", "abnormal"); numbers are compared by value so that "10" sorts after
    # "2" and "1" matches "1.0".
    numeric = all(_is_number(v) for v in (*train_labels, *test_labels))
    sort_key = float if numeric else str
    train_keys = [sort_key(v) for v in train_labels]
    classes_by_key = {}
    for key, text in zip(train_keys, train_labels):
        classes_by_key.setdefault(key, text)
    ordered = sorted(classes_by_key)
    index = {key: k for k, key in enumerate(ordered)}
    unseen = sorted({v for v in test_labels if sort_key(v) not in index})
    if unseen:
        raise DataError(f"{data_dir / f'{name}_TEST{suffix}'}: label(s) {', '.join(unseen)} never occur in the train "
                        "file")

    # Train and test may be padded to different widths; the shorter side is padded with zeros like the NaNs.
    length = max(x_train.shape[1], x_test.shape[1])
    return UCRData(
        x_train=_pad(x_train, length),
        y_train=np.array([index[k] for k in train_keys], dtype=np.int64),
        x_test=_pad(x_test, length),
        y_test=np.array([index[sort_key(v)] for v in test_labels], dtype=np.int64),
        classes=[classes_by_key[key] for key in ordered],
    )


def _read_split(path: Path) -> tuple[list[str], np.ndarray]:
    if not path.is_file():
        raise DataError(f"UCR file not found: {path}")
    try:
        table = pd.read_csv(path, sep="\t", header=None, dtype={0: str})
        values = table.iloc[:, 1:].to_numpy(np.float32)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise DataError(f"cannot parse {path}: {exc}") from None
    if values.shape[1] == 0:
        raise DataError(f"{path}: rows hold a label but no values")
    if table[0].isna().any():
        raise DataError(f"{path}: a row has an empty label")
    labels = [v.strip() for v in table[0]]
    # NaN marks the padding of shorter series in variable-length datasets; 0 keeps the array rectangular.
    values[np.isnan(values)] = 0.0
    return labels, values[:, :, None]


def _read_ts(path: Path) -> tuple[list[str], np.ndarray]:
    """A `.ts` file -> (labels, values [n, L, C]); series shorter than the longest end in zeros."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        from aeon.datasets import load_from_ts_file
    except ImportError:
        raise DataError(f"{path}: reading .ts files needs aeon (pip install 'msssm-serve[uea]')") from None
    try:
        x, y = load_from_ts_file(str(path))
    except (OSError, ValueError, IndexError) as exc:
        raise DataError(f"cannot parse {path}: {exc}") from None
    if y is None or len(y) == 0:
        raise DataError(f"{path}: no class labels (a classification .ts file has @classLabel true)")
    series = list(x)  # each [C, L_i]: aeon returns one 3-d array for equal lengths, else a list
    length = max(s.shape[1] for s in series)
    values = np.zeros((len(series), length, series[0].shape[0]), dtype=np.float32)
    for i, s in enumerate(series):
        values[i, : s.shape[1]] = np.nan_to_num(np.asarray(s, dtype=np.float32).T, nan=0.0)
    return [str(v).strip() for v in y], values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _pad(values: np.ndarray, length: int) -> np.ndarray:
    padded = np.zeros((values.shape[0], length, values.shape[2]), dtype=np.float32)
    padded[:, : values.shape[1]] = values
    return padded
