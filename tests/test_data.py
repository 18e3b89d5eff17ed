"""Data loading: PTB-XL labels as the benchmark computes them, folds, cached signals, clear errors; UCR reader.

Runs on the real PTB-XL records in tests/fixtures/ptbxl; anything that must be damaged is a copy under tmp_path.
"""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb

from msssm_serve.training.ptbxl import (
    LABEL_SETS,
    LEADS,
    DataError,
    LabeledRecords,
    load_labels,
    load_signals,
    split_folds,
)
from msssm_serve.training.ucr import load_ucr

FIXTURE = Path(__file__).parent / "fixtures" / "ptbxl"
LABEL_TABLE = FIXTURE / "labels" / "superdiagnostic.csv"

# Expected labels worked out by hand from each record's scp_codes and scp_statements.csv; None = record dropped.
# 266: {'ALMI': 100, 'IMI': 80, 'LAFB': 100, 'PVC': 100, 'ANEUR': 50, 'QWAVE': 0, 'INVT': 0, 'SR': 0}
# 45:  {'IRBBB': 100, 'RAO/RAE': 50, 'RVH': 35, 'SR': 0}
# 524: {'LVH': 100, 'ISC_': 100, '1AVB': 100, 'LAO/LAE': 100}
# 17:  {'AFLT': 100, 'ABQRS': 0, 'AFIB': 0}   (no diagnostic statement; likelihood-0 codes still count)
# 22:  {'NDT': 100, 'SR': 0}                  (NDT is both diagnostic and form)
EXPECTED = {
    266: {
        "all": {"ALMI", "IMI", "LAFB", "PVC", "ANEUR", "QWAVE", "INVT", "SR"},
        "diagnostic": {"ALMI", "IMI", "LAFB", "ANEUR"},
        "subdiagnostic": {"AMI", "IMI", "LAFB/LPFB", "STTC"},
        "superdiagnostic": {"MI", "CD", "STTC"},
        "form": {"PVC", "QWAVE", "INVT"},
        "rhythm": {"SR"},
    },
    45: {
        "all": {"IRBBB", "RAO/RAE", "RVH", "SR"},
        "diagnostic": {"IRBBB", "RAO/RAE", "RVH"},
        "subdiagnostic": {"IRBBB", "RAO/RAE", "RVH"},
        "superdiagnostic": {"CD", "HYP"},
        "form": None,
        "rhythm": {"SR"},
    },
    524: {
        "all": {"LVH", "ISC_", "1AVB", "LAO/LAE"},
        "diagnostic": {"LVH", "ISC_", "1AVB", "LAO/LAE"},
        "subdiagnostic": {"LVH", "ISC_", "_AVB", "LAO/LAE"},
        "superdiagnostic": {"HYP", "STTC", "CD"},
        "form": None,
        "rhythm": None,
    },
    17: {
        "all": {"AFLT", "ABQRS", "AFIB"},
        "diagnostic": None,
        "subdiagnostic": None,
        "superdiagnostic": None,
        "form": {"ABQRS"},
        "rhythm": {"AFLT", "AFIB"},
    },
    22: {
        "all": {"NDT", "SR"},
        "diagnostic": {"NDT"},
        "subdiagnostic": {"STTC"},
        "superdiagnostic": {"STTC"},
        "form": {"NDT"},
        "rhythm": {"SR"},
    },
}
DATABASE_IDS = [1, 2, 10, 17, 20, 22, 30, 32, 41, 45, 47, 49, 50, 51, 54, 62, 69, 72, 77, 91, 94, 96, 106, 140, 195,
                223, 234, 266, 281, 383, 425, 524, 537, 545]
TABLE_ONLY_IDS = [549, 553, 554]  # in labels/superdiagnostic.csv but not in ptbxl_database.csv


def labels_of(records: LabeledRecords, ecg_id: int):
    rows = np.flatnonzero(records.ids == ecg_id)
    if rows.size == 0:
        return None
    return {c for c, v in zip(records.classes, records.labels[rows[0]]) if v == 1}


def fixture_copy(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "ptbxl", ignore=shutil.ignore_patterns(".msssm_cache")))


# --- labels -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label_set", LABEL_SETS)
def test_label_sets_match_hand_checked_records(label_set):
    records = load_labels(FIXTURE, label_set)
    for ecg_id, expected in EXPECTED.items():
        assert labels_of(records, ecg_id) == expected[label_set], (ecg_id, label_set)


@pytest.mark.parametrize("label_set", LABEL_SETS)
def test_records_are_consistent_sorted_and_all_labelled(label_set):
    records = load_labels(FIXTURE, label_set)
    n = len(records.ids)
    assert records.labels.shape == (n, len(records.classes)) and records.labels.dtype == np.float32
    assert set(np.unique(records.labels)) <= {0.0, 1.0}
    assert (records.labels.sum(axis=1) > 0).all()
    assert records.classes == sorted(records.classes)
    assert (np.diff(records.ids) > 0).all()
    assert records.paths == [f"records100/00000/{i:05d}_lr" for i in records.ids]


def test_unlabelled_records_are_dropped():
    assert load_labels(FIXTURE, "all").ids.tolist() == DATABASE_IDS
    superdiagnostic = load_labels(FIXTURE, "superdiagnostic")
    assert superdiagnostic.ids.tolist() == [i for i in DATABASE_IDS if i not in (17, 20)]
    assert superdiagnostic.classes == ["CD", "HYP", "MI", "NORM", "STTC"]


def test_sampling_rate_500_uses_high_rate_files(tmp_path):
    data_dir = fixture_copy(tmp_path)
    (data_dir / "records500").mkdir()
    records = load_labels(data_dir, "superdiagnostic", sampling_rate=500)
    assert records.paths[0] == "records500/00000/00001_hr"


def test_split_folds_and_subset():
    records = load_labels(FIXTURE)
    split = split_folds(records)
    assert set(records.folds[split["train"]]) <= set(range(1, 9)) and len(split["train"]) > 0
    assert set(records.folds[split["val"]]) == {9}
    assert len(split["test"]) == 0  # fold 10 is withheld from this data
    assert sorted(np.concatenate(list(split.values()))) == list(range(len(records.ids)))

    val = records.subset(split["val"])
    assert val.ids.tolist() == records.ids[records.folds == 9].tolist()
    assert records.subset(records.folds == 9).paths == val.paths
    # Enough real fold-9 ECGs of every class for the tests that use them as windows.
    assert (val.labels.sum(axis=0) >= 8).all()

    with_test = LabeledRecords(np.arange(3), np.array([10, 9, 1]), ["a", "b", "c"], np.ones((3, 1), np.float32), ["X"])
    assert {k: v.tolist() for k, v in split_folds(with_test).items()} == {"train": [2], "val": [1], "test": [0]}


def test_label_table_path_agrees_with_official():
    table = load_labels(FIXTURE, labels_csv=LABEL_TABLE)
    official = load_labels(FIXTURE, "superdiagnostic")
    raw = pd.read_csv(LABEL_TABLE)
    assert table.ids.tolist() == sorted(raw["ecg_id"])
    assert set(TABLE_ONLY_IDS) <= set(table.ids)
    assert table.classes == official.classes  # text column, patient_id and filename_hr were not taken as classes
    common = np.intersect1d(table.ids, official.ids)
    assert len(common) >= 30
    for ecg_id in common:
        assert labels_of(table, ecg_id) == labels_of(official, ecg_id)
        row = official.ids.tolist().index(ecg_id)
        assert table.folds[table.ids.tolist().index(ecg_id)] == official.folds[row]


def test_label_table_drops_records_without_positive(tmp_path):
    raw = pd.read_csv(LABEL_TABLE)
    raw.loc[raw["ecg_id"] == 1, ["HYP", "NORM", "MI", "CD", "STTC"]] = 0
    path = tmp_path / "table.csv"
    raw.to_csv(path, index=False)
    assert 1 not in load_labels(FIXTURE, labels_csv=path).ids


def test_label_table_missing_columns(tmp_path):
    path = tmp_path / "table.csv"
    pd.read_csv(LABEL_TABLE).drop(columns=["strat_fold", "filename_lr"]).to_csv(path, index=False)
    with pytest.raises(DataError, match="strat_fold, filename_lr") as err:
        load_labels(FIXTURE, labels_csv=path)
    assert str(path) in str(err.value)


def test_label_table_ignores_metadata_flags_and_names_a_class_column_with_blanks(tmp_path):
    raw = pd.read_csv(LABEL_TABLE)
    raw.insert(2, "sex", np.arange(len(raw)) % 2)  # PTB-XL's 0/1 metadata is not a class
    path = tmp_path / "table.csv"
    raw.to_csv(path, index=False)
    assert load_labels(FIXTURE, labels_csv=path).classes == ["CD", "HYP", "MI", "NORM", "STTC"]
    raw["MI"] = raw["MI"].astype(float)
    raw.loc[3, "MI"] = np.nan
    raw.to_csv(path, index=False)
    with pytest.raises(DataError, match="class column MI has blank cells"):
        load_labels(FIXTURE, labels_csv=path)


# --- label errors -------------------------------------------------------------------------------------------------


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        load_labels(missing)
    with pytest.raises(DataError, match=str(missing)):
        load_signals(missing, load_labels(FIXTURE), cache_dir=tmp_path)


def test_neither_database_nor_table(tmp_path):
    (tmp_path / "records100").mkdir()
    with pytest.raises(DataError, match="ptbxl_database.csv"):
        load_labels(tmp_path)


def test_missing_records_dir(tmp_path):
    data_dir = fixture_copy(tmp_path)
    with pytest.raises(DataError, match="records500"):
        load_labels(data_dir, sampling_rate=500)
    shutil.rmtree(data_dir / "records100")
    with pytest.raises(DataError, match=str(data_dir / "records100")):
        load_labels(data_dir)


def test_unknown_label_set_lists_valid_ones():
    with pytest.raises(DataError, match="superdiag.*valid: all, diagnostic, subdiagnostic, superdiagnostic"):
        load_labels(FIXTURE, "superdiag")


# --- signals ------------------------------------------------------------------------------------------------------


def test_signals_equal_wfdb_and_cache_is_reused(tmp_path, monkeypatch):
    records = load_labels(FIXTURE).subset(np.arange(6))
    signals = load_signals(FIXTURE, records, cache_dir=tmp_path)
    assert isinstance(signals, np.memmap) and signals.shape == (6, 1000, 12) and signals.dtype == np.float32
    for row, path in enumerate(records.paths):
        expected, fields = wfdb.rdsamp(str(FIXTURE / path))
        assert fields["sig_name"] == LEADS and fields["units"] == ["mV"] * 12
        np.testing.assert_array_equal(signals[row], expected.astype(np.float32))
    assert [p.suffix for p in tmp_path.iterdir()] == [".npy"]  # no temporary file left behind

    def no_wfdb(*args, **kwargs):
        raise AssertionError("cache miss: WFDB was read again")

    monkeypatch.setattr(wfdb, "rdsamp", no_wfdb)
    again = load_signals(FIXTURE, records, cache_dir=tmp_path)
    np.testing.assert_array_equal(again, signals)
    # Same set in another order: same cache, rows follow the requested order.
    order = [3, 0, 5, 1, 4, 2]
    np.testing.assert_array_equal(load_signals(FIXTURE, records.subset(order), cache_dir=tmp_path), signals[order])


def test_different_record_sets_get_different_caches(tmp_path):
    records = load_labels(FIXTURE)
    a = load_signals(FIXTURE, records.subset([0, 1]), cache_dir=tmp_path)
    b = load_signals(FIXTURE, records.subset([0, 2]), cache_dir=tmp_path)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], b[1])
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_the_default_cache_is_the_users_never_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv("MSSSM_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    home = tmp_path / "home"
    monkeypatch.setattr(Path, "home", lambda: home)
    data_dir = fixture_copy(tmp_path)
    before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
    load_signals(data_dir, load_labels(data_dir).subset([0]))
    assert len(list((home / ".cache" / "msssm").glob("*.npy"))) == 1
    assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*")) == before  # nothing written in the data
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_signals(data_dir, load_labels(data_dir).subset([1]))
    assert len(list((tmp_path / "xdg" / "msssm").glob("*.npy"))) == 1


def one_record(data_dir: Path, signal: np.ndarray, sig_name=LEADS) -> LabeledRecords:
    """Write a WFDB record into a records100 tree and describe it as a one-record set."""
    record_dir = data_dir / "records100" / "99000"
    record_dir.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp("99999_lr", fs=100, units=["mV"] * len(sig_name), sig_name=list(sig_name), p_signal=signal,
                fmt=["16"] * len(sig_name), write_dir=str(record_dir))
    return LabeledRecords(np.array([99999]), np.array([1]), ["records100/99000/99999_lr"],
                          np.ones((1, 1), np.float32), ["X"])


def test_nan_samples_become_zero(tmp_path):
    signal = np.random.default_rng(0).normal(size=(1000, 12))
    signal[5, 3] = np.nan
    records = one_record(tmp_path / "data", signal)
    loaded = load_signals(tmp_path / "data", records, cache_dir=tmp_path / "cache")
    assert loaded[0, 5, 3] == 0.0 and np.isfinite(loaded).all()
    np.testing.assert_allclose(loaded[0, 6], signal[6], atol=1e-3)


def test_record_with_wrong_lead_count(tmp_path):
    records = one_record(tmp_path / "data", np.zeros((1000, 3)), sig_name=LEADS[:3])
    with pytest.raises(DataError, match=r"99999_lr has shape \(1000, 3\), expected \[L, 12\]"):
        load_signals(tmp_path / "data", records, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("damage", ["truncated dat", "empty dat", "garbage header", "missing files"])
def test_corrupt_record_is_named(tmp_path, damage):
    data_dir = fixture_copy(tmp_path)
    records = load_labels(data_dir).subset([0, 1, 2])
    stem = data_dir / records.paths[1]
    dat, hea = stem.with_suffix(".dat"), stem.with_suffix(".hea")
    if damage == "truncated dat":
        dat.write_bytes(dat.read_bytes()[:10_000])
    elif damage == "empty dat":
        dat.write_bytes(b"")
    elif damage == "garbage header":
        hea.write_text("this is not a header\n")
    else:
        dat.unlink()
        hea.unlink()
    cache_dir = tmp_path / "cache"
    with pytest.raises(DataError, match=f"cannot read WFDB record {stem}"):
        load_signals(data_dir, records, cache_dir=cache_dir)
    assert list(cache_dir.iterdir()) == []  # the partial cache was removed


# --- UCR ----------------------------------------------------------------------------------------------------------


def write_ucr(root: Path, name: str, train: str, test: str) -> Path:
    data_dir = root / name
    data_dir.mkdir(parents=True)
    (data_dir / f"{name}_TRAIN.tsv").write_text(train)
    (data_dir / f"{name}_TEST.tsv").write_text(test)
    return data_dir


def test_ucr_string_labels(tmp_path):
    train = "b\t1\t2\t3\na\t4\t5\t6\nc\t7\t8\t9\nb\t0\t0\t1\n"
    data_dir = write_ucr(tmp_path, "Words", train, "c\t1\t1\t1\na\t2\t2\t2\n")
    data = load_ucr(data_dir)
    assert data.classes == ["a", "b", "c"]
    assert data.y_train.tolist() == [1, 0, 2, 1] and data.y_train.dtype == np.int64
    assert data.y_test.tolist() == [2, 0]
    assert data.x_train.shape == (4, 3, 1) and data.x_train.dtype == np.float32
    np.testing.assert_array_equal(data.x_train[1, :, 0], [4, 5, 6])
    np.testing.assert_array_equal(data.x_test[1, :, 0], [2, 2, 2])


def test_ucr_numeric_labels_sort_by_value_and_nan_padding(tmp_path):
    data_dir = write_ucr(
        tmp_path,
        "Nums",
        "10\t1.5\t2\tNaN\n-1\t3\t4\t5\n2\t6\tNaN\tNaN\n1\t0\t0\t0\n",
        "-1\t1\t2\t3\n10\t4\t5\tNaN\n",
    )
    data = load_ucr(data_dir)
    assert data.classes == ["-1", "1", "2", "10"]
    assert data.y_train.tolist() == [3, 0, 2, 1]
    assert data.y_test.tolist() == [0, 3]
    np.testing.assert_array_equal(data.x_train[0, :, 0], [1.5, 2, 0])
    np.testing.assert_array_equal(data.x_train[2, :, 0], [6, 0, 0])
    np.testing.assert_array_equal(data.x_test[1, :, 0], [4, 5, 0])


def test_ucr_unseen_test_label(tmp_path):
    data_dir = write_ucr(tmp_path, "Bad", "1\t1\t2\n2\t3\t4\n", "3\t1\t2\n1\t1\t2\n")
    with pytest.raises(DataError, match="label.*3 never occur in the train file"):
        load_ucr(data_dir)


def test_ucr_missing_file(tmp_path):
    data_dir = write_ucr(tmp_path, "Gone", "1\t1\t2\n", "1\t1\t2\n")
    (data_dir / "Gone_TEST.tsv").unlink()
    with pytest.raises(DataError, match="Gone_TEST.tsv"):
        load_ucr(data_dir)


def write_ts(path: Path, rows: list[tuple[list[list[float]], str]], labels: str, equal: bool) -> None:
    """A classification .ts file (the UEA archive's format): one case per line, dimensions split by ':'."""
    header = ["@problemName Tiny", "@timeStamps false", "@missing false", "@univariate false", "@dimensions 2",
              f"@equalLength {'true' if equal else 'false'}", f"@classLabel true {labels}", "@data"]
    body = [":".join(",".join(str(v) for v in dim) for dim in dims) + f":{label}" for dims, label in rows]
    path.write_text("\n".join(header + body) + "\n")


def test_ucr_reads_multivariate_ts_files_of_unequal_length(tmp_path):
    pytest.importorskip("aeon")
    data_dir = tmp_path / "Tiny"
    data_dir.mkdir()
    write_ts(data_dir / "Tiny_TRAIN.ts", [([[1, 2, 3], [4, 5, 6]], "up"), ([[7, 8], [9, 10]], "down"),
                                          ([[0, 1, 2], [3, 4, 5]], "up")], "down up", equal=False)
    write_ts(data_dir / "Tiny_TEST.ts", [([[1, 1, 1, 1], [2, 2, 2, 2]], "down")], "down up", equal=False)
    data = load_ucr(data_dir)
    assert data.classes == ["down", "up"] and data.y_train.tolist() == [1, 0, 1] and data.y_test.tolist() == [0]
    # [n, L, C]: time along axis 1, the dimensions as channels; the shorter series end in zeros; TRAIN and TEST
    # padded to one length
    assert data.x_train.shape == (3, 4, 2) and data.x_test.shape == (1, 4, 2)
    np.testing.assert_array_equal(data.x_train[0], [[1, 4], [2, 5], [3, 6], [0, 0]])
    np.testing.assert_array_equal(data.x_train[1], [[7, 9], [8, 10], [0, 0], [0, 0]])


def test_ucr_ts_errors_are_clear(tmp_path):
    pytest.importorskip("aeon")
    data_dir = tmp_path / "Broken"
    data_dir.mkdir()
    (data_dir / "Broken_TRAIN.ts").write_text("@problemName Broken\n@classLabel true a b\n@data\n1,2:a\nnot,a,number:b\n")
    (data_dir / "Broken_TEST.ts").write_text("@problemName Broken\n@classLabel true a b\n@data\n1,2:a\n")
    with pytest.raises(DataError, match="Broken_TRAIN.ts"):
        load_ucr(data_dir)
