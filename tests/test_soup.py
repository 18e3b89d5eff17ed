"""research/soup.py on the real fixture: weights averaged exactly, greedy never worse than its best ingredient,
the soup exports and serves like any checkpoint, clear errors for what cannot be averaged."""

import json
import subprocess
import sys

import pytest
import torch

from msssm_serve.checkpoint import load_checkpoint
from tests.test_training import FIXTURE, ROOT, fit, ptbxl_args
from tests.test_training import signal_cache_outside_the_fixture  # noqa: F401  (autouse: used by being imported)


def soup(*args):
    cmd = [sys.executable, str(ROOT / "research" / "soup.py"), "--data-dir", str(FIXTURE),
           "--labels", str(FIXTURE / "labels" / "superdiagnostic.csv"), "--n-boot", "20", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def rescored(checkpoint) -> float:
    """Validation (fold 9) macro AUROC of a saved checkpoint, computed here from the file, not by the soup."""
    from msssm_serve.training.inference import window_probabilities
    from msssm_serve.training.metrics import macro_auroc
    from msssm_serve.training.ptbxl import load_labels, load_signals

    records = load_labels(FIXTURE, "superdiagnostic", FIXTURE / "labels" / "superdiagnostic.csv", 100)
    val = records.subset(records.folds == 9)
    return macro_auroc(val.labels, window_probabilities(load_checkpoint(checkpoint)[0],
                                                        load_signals(FIXTURE, val, sampling_rate=100)))


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory):
    """Two fine-tunes (seeds 1, 2) of one base checkpoint, and a model of another architecture."""
    root = tmp_path_factory.mktemp("soup")
    mp = pytest.MonkeyPatch()
    mp.setenv("MSSSM_CACHE_DIR", str(root / "cache"))
    try:
        fit(*ptbxl_args(root / "base", "--epochs", "1", "--steps-per-epoch", "2"))
        for seed in (1, 2):
            fit(*ptbxl_args(root / f"ft{seed}", "--epochs", "1", "--steps-per-epoch", "2", "--lr", "1e-2",
                            "--init", str(root / "base" / "checkpoint.pt"), "--seed", str(seed)))
        fit(*ptbxl_args(root / "wide", "--epochs", "1", "--steps-per-epoch", "1", "--d-model", "12"))
    finally:
        mp.undo()
    return root


def test_uniform_soup_is_the_mean_of_the_weights_and_exports(fine_tunes, tmp_path):
    a, b = fine_tunes / "ft1" / "checkpoint.pt", fine_tunes / "ft2" / "checkpoint.pt"
    proc = soup("--models", a, b, "--out", tmp_path / "soup")
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["kept"] == 2

    model, meta, _ = load_checkpoint(tmp_path / "soup" / "checkpoint.pt")
    wa, wb = (load_checkpoint(p)[0].state_dict() for p in (a, b))
    assert not torch.equal(wa["head.weight"], wb["head.weight"])  # the two fine-tunes did move apart
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, (wa[name] + wb[name]) / 2 if value.is_floating_point() else wa[name])
    assert meta["soup"]["kept"] == [str(a), str(b)]
    assert meta["validation"]["macro_auroc"] == pytest.approx(line["val_macro_auroc"])
    assert rescored(tmp_path / "soup" / "checkpoint.pt") == pytest.approx(line["val_macro_auroc"], abs=1e-6)
    metrics = json.loads((tmp_path / "soup" / "metrics.json").read_text())
    assert metrics["best"]["bootstrap_ci_low"] <= metrics["best"]["macro_auroc"] <= metrics["best"]["bootstrap_ci_high"]

    # The soup is an ordinary checkpoint: the export tool takes it and its parity check passes.
    exported = subprocess.run([sys.executable, str(ROOT / "export" / "export.py"), "--checkpoint",
                               str(tmp_path / "soup" / "checkpoint.pt"), "--out", str(tmp_path / "model")],
                              capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.loads((tmp_path / "model" / "model.json").read_text())["labels"] == meta["labels"]


def test_greedy_soup_is_never_worse_than_its_best_ingredient(fine_tunes, tmp_path):
    paths = [fine_tunes / "ft1" / "checkpoint.pt", fine_tunes / "ft2" / "checkpoint.pt", fine_tunes / "base" /
             "checkpoint.pt"]
    proc = soup("--models", *paths, "--greedy", "--out", tmp_path / "g")
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    alone = json.loads((tmp_path / "g" / "metrics.json").read_text())["ingredients_val_macro_auroc"]
    assert set(alone) == {str(p) for p in paths}
    # the saved soup, scored again from its file, is what was reported, and no worse than its best ingredient
    assert rescored(tmp_path / "g" / "checkpoint.pt") == pytest.approx(line["val_macro_auroc"], abs=1e-6)
    assert line["val_macro_auroc"] >= max(alone.values()) - 1e-6
    assert rescored(max(alone, key=alone.get)) == pytest.approx(max(alone.values()), abs=1e-6)


@pytest.mark.parametrize("case, expect", [
    ("one", "at least two checkpoints"),
    ("directory", "holds no trainable weights"),
    ("architecture", "architecture"),
    ("missing", "not found"),
])
def test_clear_errors(fine_tunes, tmp_path, case, expect):
    a = fine_tunes / "ft1" / "checkpoint.pt"
    models = {"one": [a], "directory": [a, fine_tunes / "ft2"], "architecture": [a, fine_tunes / "wide" /
              "checkpoint.pt"], "missing": [a, tmp_path / "none.pt"]}[case]
    proc = soup("--models", *models, "--out", tmp_path / "x")
    assert proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "x" / "checkpoint.pt").exists()
