"""PTB-XL loading: labels (official aggregation or a multi-hot label table), folds, and cached signals.

Labels follow the PTB-XL benchmark (Strodthoff et al., "Deep learning for ECG analysis: benchmarks and insights from
PTB-XL", `utils.compute_label_aggregations` + `select_data` with min_samples=0), so that numbers are comparable with
the published ones. Signals are read once with WFDB and cached as one .npy that later runs memory-map.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

LABEL_SETS = ("all", "diagnostic", "subdiagnostic", "superdiagnostic", "form", "rhythm")
LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]

TRAIN_FOLDS = range(1, 9)
VAL_FOLD = 9
TEST_FOLD = 10

# Columns of a label table that describe the record rather than a class.
_TABLE_META_COLUMNS = {"ecg_id", "patient_id", "strat_fold", "filename_lr", "filename_hr"}


class DataError(Exception):
    """A problem with the input data, worded as one line for the CLI (printed without a traceback)."""


@dataclass
class LabeledRecords:
    """Records that carry at least one label, row-aligned across all fields."""

    ids: np.ndarray  # [n] int ecg_id
    folds: np.ndarray  # [n] int strat_fold
    paths: list[str]  # relative to data_dir, without extension, e.g. "records100/00000/00001_lr"
    labels: np.ndarray  # [n, K] float32 0/1
    classes: list[str]

    def subset(self, mask_or_index) -> LabeledRecords:
        """Rows selected by a boolean mask or an integer index array (order kept as given)."""
        index = np.asarray(mask_or_index)
        # An empty list comes in as float64; it must still index as an (empty) integer array.
        index = np.flatnonzero(index) if index.dtype == bool else index.astype(np.intp)
        return LabeledRecords(
            ids=self.ids[index],
            folds=self.folds[index],
            paths=[self.paths[i] for i in index],
            labels=self.labels[index],
            classes=list(self.classes),
        )


def _filename_column(sampling_rate: int) -> str:
    if sampling_rate == 100:
        return "filename_lr"
    if sampling_rate == 500:
        return "filename_hr"
    raise DataError(f"sampling_rate must be 100 or 500, got {sampling_rate}")


def load_labels(data_dir, label_set="superdiagnostic", labels_csv=None, sampling_rate=100) -> LabeledRecords:
    """Labelled records of a PTB-XL directory, sorted by ecg_id, classes sorted alphabetically.

    Without `labels_csv` the labels are computed from `ptbxl_database.csv` + `scp_statements.csv` exactly as the
    benchmark does; with it, they are read from a multi-hot table and `label_set` only has to be a valid name.
    """
    if label_set not in LABEL_SETS:
        raise DataError(f"unknown label set {label_set!r}; valid: {', '.join(LABEL_SETS)}")
    filename_col = _filename_column(sampling_rate)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir}")
    records_dir = data_dir / f"records{sampling_rate}"
    if not records_dir.is_dir():
        raise DataError(f"{records_dir} not found (expected the WFDB records at {sampling_rate} Hz)")

    if labels_csv is not None:
        ids, folds, paths, per_record = _read_label_table(Path(labels_csv), filename_col)
    elif (data_dir / "ptbxl_database.csv").is_file():
        ids, folds, paths, per_record = _read_official(data_dir, label_set, filename_col)
    else:
        raise DataError(f"{data_dir / 'ptbxl_database.csv'} not found and no labels csv given")

    # The benchmark drops records left without any label in the chosen set (e.g. no diagnostic statement).
    keep = [i for i, labels in enumerate(per_record) if labels]
    if not keep:
        raise DataError(f"no record in {data_dir} has a {label_set} label")
    # Sorted like sklearn's MultiLabelBinarizer, so class indices match the benchmark's.
    classes = sorted({c for i in keep for c in per_record[i]})
    column = {c: k for k, c in enumerate(classes)}
    multi_hot = np.zeros((len(keep), len(classes)), dtype=np.float32)
    for row, i in enumerate(keep):
        multi_hot[row, [column[c] for c in per_record[i]]] = 1.0

    order = np.argsort(ids[keep], kind="stable")
    kept = LabeledRecords(
        ids=ids[keep], folds=folds[keep], paths=[paths[i] for i in keep], labels=multi_hot, classes=classes
    )
    return kept.subset(order)


def _aggregator(label_set: str, statements: pd.DataFrame) -> Callable[[dict], set]:
    """Map a record's {scp_code: likelihood} to its labels in `label_set`, as the benchmark does.

    Likelihoods are ignored on purpose: the benchmark keeps every listed statement, even at likelihood 0.
    """
    if label_set == "all":
        return lambda codes: set(codes)
    flag = label_set if label_set in ("form", "rhythm") else "diagnostic"
    selected = statements[statements[flag] == 1.0]
    if label_set in ("diagnostic", "form", "rhythm"):
        mapping = {code: code for code in selected.index}
    else:
        target = "diagnostic_subclass" if label_set == "subdiagnostic" else "diagnostic_class"
        mapping = selected[target].dropna().to_dict()
    return lambda codes: {mapping[code] for code in codes if code in mapping}


def _read_official(data_dir: Path, label_set: str, filename_col: str):
    db_path = data_dir / "ptbxl_database.csv"
    statements_path = data_dir / "scp_statements.csv"
    if not statements_path.is_file():
        raise DataError(f"{statements_path} not found (needed to aggregate scp_codes)")
    db = _read_csv(db_path)
    _require_columns(db, ["ecg_id", "scp_codes", "strat_fold", filename_col], db_path)
    statements = _read_csv(statements_path, index_col=0)
    _require_columns(statements, ["diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass"],
                     statements_path)

    aggregate = _aggregator(label_set, statements)
    per_record = []
    for ecg_id, text in zip(db["ecg_id"], db["scp_codes"]):
        try:
            codes = ast.literal_eval(text)
        except (ValueError, SyntaxError) as exc:
            raise DataError(f"{db_path}: ecg_id {ecg_id} has unreadable scp_codes {text!r} ({exc})") from None
        per_record.append(aggregate(codes))
    return (_int_column(db, "ecg_id", db_path), _int_column(db, "strat_fold", db_path),
            db[filename_col].astype(str).tolist(), per_record)


def _read_label_table(path: Path, filename_col: str):
    if not path.is_file():
        raise DataError(f"labels csv not found: {path}")
    table = _read_csv(path)
    _require_columns(table, ["ecg_id", "strat_fold", filename_col], path)
    # Class columns are recognised by content (all 0/1): the table also has a text column listing the classes.
    class_cols = [c for c in table.columns if c not in _TABLE_META_COLUMNS and _is_binary(table[c])]
    if not class_cols:
        raise DataError(f"{path}: no 0/1 class column found")
    values = table[class_cols].to_numpy()
    per_record = [{c for c, v in zip(class_cols, row) if v == 1} for row in values]
    return (_int_column(table, "ecg_id", path), _int_column(table, "strat_fold", path),
            table[filename_col].astype(str).tolist(), per_record)


def _is_binary(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and bool(column.isin([0, 1]).all())


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse {path}: {exc}") from None


def _int_column(frame: pd.DataFrame, name: str, path: Path) -> np.ndarray:
    values = pd.to_numeric(frame[name], errors="coerce")
    # A blank or non-integer cell would otherwise be cast silently to a garbage integer.
    if values.isna().any() or not (values % 1 == 0).all():
        raise DataError(f"{path}: column {name} must hold an integer in every row")
    return values.to_numpy(np.int64)


def _require_columns(frame: pd.DataFrame, required: list[str], path: Path) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")


def split_folds(records: LabeledRecords) -> dict[str, np.ndarray]:
    """Official split by strat_fold: train = folds 1-8, val = fold 9, test = fold 10 (indices into `records`)."""
    folds = records.folds
    return {
        "train": np.flatnonzero(np.isin(folds, TRAIN_FOLDS)),
        "val": np.flatnonzero(folds == VAL_FOLD),
        "test": np.flatnonzero(folds == TEST_FOLD),
    }


def load_signals(data_dir, records: LabeledRecords, cache_dir=None, sampling_rate=100) -> np.ndarray:
    """Signals [n, L, 12] float32 in mV, row-aligned with `records`, memory-mapped from a cache .npy.

    The cache holds the distinct records in sorted path order, so it is shared by any ordering of the same set;
    when `records.paths` is already sorted and distinct (as `load_labels`, `subset` with increasing indices and
    `split_folds` give), the memory map itself is returned, otherwise rows are gathered into memory.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir}")
    if not records.paths:
        raise DataError("no records to load")
    unique_paths = sorted(set(records.paths))
    key = json.dumps([unique_paths, sampling_rate, str(data_dir.resolve())])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir(data_dir)
    cache_file = cache_dir / f"ptbxl_{sampling_rate}hz_{len(unique_paths)}_{digest}.npy"
    if not cache_file.is_file():
        _build_cache(data_dir, unique_paths, sampling_rate, cache_file)
    signals = np.load(cache_file, mmap_mode="r")
    if records.paths == unique_paths:
        return signals
    row = {p: i for i, p in enumerate(unique_paths)}
    return np.asarray(signals[[row[p] for p in records.paths]])


def _default_cache_dir(data_dir: Path) -> Path:
    # $MSSSM_CACHE_DIR when set; else next to the data when possible (one cache per dataset copy); shared datasets
    # are often read-only, so then the user's cache.
    if os.environ.get("MSSSM_CACHE_DIR"):
        return Path(os.environ["MSSSM_CACHE_DIR"])
    candidate = data_dir / ".msssm_cache"
    try:
        candidate.mkdir(exist_ok=True)
    except OSError:
        pass
    else:
        if os.access(candidate, os.W_OK):
            return candidate
    return Path.home() / ".cache" / "msssm"


def _build_cache(data_dir: Path, paths: list[str], sampling_rate: int, cache_file: Path) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=cache_file.parent, prefix=cache_file.stem, suffix=".tmp")
    except OSError as exc:
        raise DataError(f"cannot write the signal cache in {cache_file.parent}: {exc}") from None
    os.close(fd)
    try:
        first = _read_record(data_dir, paths[0], sampling_rate)
        # Written through a memory map so that a 500 Hz cache (~1.5 GB) never has to fit in RAM at once.
        out = np.lib.format.open_memmap(tmp_name, mode="w+", dtype=np.float32, shape=(len(paths), *first.shape))
        out[0] = first
        for i, path in enumerate(paths[1:], start=1):
            signal = _read_record(data_dir, path, sampling_rate)
            if signal.shape != first.shape:
                raise DataError(f"record {data_dir / path} has shape {signal.shape}, expected {first.shape} "
                                f"like {data_dir / paths[0]}")
            out[i] = signal
        out.flush()
        del out
        # Atomic: a crash or a concurrent run never leaves a half-written cache under the final name.
        os.replace(tmp_name, cache_file)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _read_record(data_dir: Path, path: str, sampling_rate: int) -> np.ndarray:
    import wfdb  # training-only dependency; imported here so that label handling works without it

    full = data_dir / path
    try:
        signal, fields = wfdb.rdsamp(str(full))
    except Exception as exc:  # wfdb raises many types (ValueError, HeaderSyntaxError, OSError, ...)
        raise DataError(f"cannot read WFDB record {full}: {type(exc).__name__}: {exc}") from None
    if signal.ndim != 2 or signal.shape[1] != len(LEADS):
        raise DataError(f"record {full} has shape {signal.shape}, expected [L, {len(LEADS)}]")
    names = [name.upper() for name in fields["sig_name"]]
    if names != LEADS:
        raise DataError(f"record {full} has leads {fields['sig_name']}, expected {LEADS}")
    if fields["fs"] != sampling_rate:
        raise DataError(f"record {full} is sampled at {fields['fs']} Hz, expected {sampling_rate} Hz")
    if any(unit != "mV" for unit in fields["units"]):
        raise DataError(f"record {full} has units {fields['units']}, expected mV")
    signal = signal.astype(np.float32)
    # WFDB decodes the format's "missing sample" value as NaN; 0 mV is the neutral baseline the model can consume.
    signal[np.isnan(signal)] = 0.0
    return signal
