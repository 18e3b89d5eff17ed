"""UCR time-series archive reader (2018 `.tsv` format): DIR/NAME/NAME_TRAIN.tsv and NAME_TEST.tsv.

Each row is `label<TAB>x_1<TAB>...<TAB>x_L`. Variable-length datasets pad rows with NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from msssm_serve.training.ptbxl import DataError


@dataclass
class UCRData:
    x_train: np.ndarray  # [n_train, L, 1] float32
    y_train: np.ndarray  # [n_train] int64 in 0..K-1
    x_test: np.ndarray  # [n_test, L, 1] float32
    y_test: np.ndarray  # [n_test] int64
    classes: list[str]  # original label text of class k, as written in the train file


def load_ucr(data_dir) -> UCRData:
    """Read one UCR dataset; labels are mapped to 0..K-1 in sorted order of the train labels."""
    data_dir = Path(data_dir)
    name = data_dir.name
    train_labels, x_train = _read_split(data_dir / f"{name}_TRAIN.tsv")
    test_labels, x_test = _read_split(data_dir / f"{name}_TEST.tsv")

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
        raise DataError(f"{data_dir / f'{name}_TEST.tsv'}: label(s) {', '.join(unseen)} never occur in the train file")

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
    return labels, values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _pad(values: np.ndarray, length: int) -> np.ndarray:
    padded = np.zeros((values.shape[0], length, 1), dtype=np.float32)
    padded[:, : values.shape[1], 0] = values
    return padded
