"""A model trained with `--task ucr` serves like any other: trained on a real UCR dataset (the ItalyPowerDemand fixture:
24-sample series, 2 classes; an ensemble of cross-validation folds' models, as the defaults give a set this small),
exported, then `/classify` of one series and a stream of it, whose final prediction equals `/classify` and whose
class is the trainer's own on TEST; and a multivariate model read from the UEA archive's `.ts` format serves its
channels as leads."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import numpy as np
import torch
from websockets.asyncio.client import connect

from msssm_serve.export import export as exporter
from msssm_serve.training.inference import window_probabilities
from msssm_serve.training.ucr import load_ucr

from conftest import ServerProcess
from test_data import write_ts
from test_training import fit

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ucr" / "ItalyPowerDemand"


def test_a_ucr_model_exports_and_serves_windows_and_streams(tmp_path):
    run = tmp_path / "run"
    # with the template (ItalyPowerDemand's rule leaves it off: its mean day explains 0.74 of the variance), so that
    # a template model is seen served, in windows and from a stream's state
    fit("--task", "ucr", "--data-dir", str(FIXTURE), "--out", str(run), "--epochs", "40", "--d-model", "16",
        "--n-layers", "2", "--n-boot", "20", "--device", "cpu", "--parity-windows", "4", "--template", "on",
        "--folds", "3")  # the defaults' path for 67 series with three folds, not ten, to keep the test short
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.8, metrics["test_accuracy"]  # ROCKET: 0.970 on the whole TEST
    desc = exporter.export_model(run / "checkpoint.pt", tmp_path / "model")
    assert desc["window"] == 24 and desc["default_hop"] == 24 and desc["leads"] == ["signal"]
    # 67 TRAIN series: the cross-validation folds' models (training/recipe.py), served as one graph
    assert desc["ensemble"]["members"] == 3 and desc["state"][-1]["name"] == "m2_pool_count"
    assert desc["normalisation"]["template_length"] == 24
    data = load_ucr(FIXTURE)
    series = data.x_test[:8]  # [8, 24, 1]
    from msssm_serve.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(run / "checkpoint.pt")
    expected = window_probabilities(model.eval(), series, 8, torch.device("cpu"))

    server = ServerProcess(tmp_path / "model", {})
    try:
        for x, want in zip(series, expected):
            body = httpx.post(server.url + "/classify", json={"signal": x.tolist()}, timeout=30).json()
            assert body["labels"] == data.classes and len(body["windows"]) == 1
            np.testing.assert_allclose(body["probabilities"], want, atol=1e-4)

        async def stream(x):
            async with connect(server.ws_url) as ws:
                await ws.send(json.dumps({"hop": 8}))
                assert json.loads(await ws.recv())["window"] == 24
                for start in range(0, 24, 5):
                    await ws.send(x[start : start + 5].astype("<f4").tobytes())
                return [json.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(3)]

        predictions = asyncio.run(stream(series[0]))
        assert [(p["t"], p["final"]) for p in predictions] == [(8, False), (16, False), (24, True)]
        np.testing.assert_allclose(predictions[-1]["probabilities"], expected[0], atol=1e-4)
    finally:
        server.stop()


def test_a_multivariate_ts_model_trains_exports_and_classifies_each_channel(tmp_path):
    pytest.importorskip("aeon")
    rng = np.random.default_rng(0)
    data_dir = tmp_path / "TwoAxes"
    data_dir.mkdir()
    t = np.linspace(0, 1, 40)

    def cases(n):  # the class is in the second dimension only: a model that ignored it could not learn the set
        labels = ["still", "shake"] * (n // 2)
        return [([(np.sin(2 * np.pi * t) + 0.1 * rng.standard_normal(40)).round(4).tolist(),
                  ((np.sin(2 * np.pi * 6 * t) if y == "shake" else 0 * t) + 0.1 * rng.standard_normal(40)).round(4)
                  .tolist()], y) for y in labels]

    for split, n in (("TRAIN", 24), ("TEST", 16)):
        write_ts(data_dir / f"TwoAxes_{split}.ts", cases(n), "shake still", equal=True)
    run = tmp_path / "run"
    fit("--task", "ucr", "--data-dir", str(data_dir), "--out", str(run), "--epochs", "30", "--d-model", "8",
        "--n-layers", "1", "--n-boot", "20", "--device", "cpu", "--parity-windows", "4", "--refit", "off")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.9, metrics["test_accuracy"]
    desc = exporter.export_model(run / "checkpoint.pt", tmp_path / "model")
    assert desc["leads"] == ["dim_0", "dim_1"] and desc["window"] == 40
    data = load_ucr(data_dir)
    from msssm_serve.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(run / "checkpoint.pt")
    expected = window_probabilities(model.eval(), data.x_test[:4], 4, torch.device("cpu"))
    server = ServerProcess(tmp_path / "model", {})
    try:
        for x, want in zip(data.x_test[:4], expected):  # [40, 2]: one row per sample, one column per dimension
            body = httpx.post(server.url + "/classify", json={"signal": x.tolist()}, timeout=30).json()
            np.testing.assert_allclose(body["probabilities"], want, atol=1e-4)
    finally:
        server.stop()


def test_the_ucr_benchmark_prints_each_dataset_beside_rocket_with_the_mean_ratio(tmp_path):
    import shutil
    import subprocess
    import sys

    data = tmp_path / "ucr"
    shutil.copytree(FIXTURE, data / "ItalyPowerDemand")
    (data / "README.md").write_text("| dataset | train | test | length | classes | ROCKET |\n|---|---|---|---|---|---|\n"
                                    "| ItalyPowerDemand | 67 | 1029 | 24 | 2 | 0.970 |\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "ucr.py"), "--data-dir", str(data), "--jobs", "1",
                           "--runs", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"), "--",
                           "--epochs", "4", "--d-model", "8", "--n-layers", "1", "--n-boot", "10"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "results" / "ucr.json").read_text())
    run = json.loads((tmp_path / "runs" / "ItalyPowerDemand" / "metrics.json").read_text())
    row = result["results"]["ItalyPowerDemand"]
    assert row["test_accuracy"] == run["test_accuracy"]
    assert result["mean_ratio"] == pytest.approx(run["test_accuracy"] / 0.970)
    assert row["train_seconds"] >= run["train_wall_seconds"] > 0  # selection and refit
    table = (tmp_path / "results" / "ucr.md").read_text()
    rule = run["ucr_recipe"]
    assert f"| {rule['template']} ({rule['template_share']:.2f}) |" in table
    assert f"**Mean ratio {run['test_accuracy'] / 0.970:.3f}**" in table


def test_the_ucr_benchmark_reports_a_run_stopped_part_way_as_such():
    """Results are written as each dataset finishes: a run cut off by a session's end leaves a table that says how
    many datasets it covers, with the mean over those only."""
    from benchmarks.ucr import report

    table = {"A": {"train": 10, "test": 10, "length": 20, "classes": 2, "rocket": 0.8},
             "B": {"train": 10, "test": 10, "length": 20, "classes": 2, "rocket": 0.9}}
    finished = {"A": {"name": "A", "test_accuracy": 0.6, "seconds": 1.0, "val_accuracy": 1.0, "val_loss": 0.1,
                      "epochs": 3, "config": {"d_model": 8, "n_layers": 1}, "recipe": {}, "train_seconds": 1.0}}
    text, mean = report(["A", "B"], table, finished, [], 1, Path("."), 60.0)
    assert mean == pytest.approx(0.75) and "Part-way: 1 of 2 datasets" in text and "| B |" not in text
    text, _ = report(["A", "B"], table, {**finished, "B": {**finished["A"], "name": "B", "test_accuracy": 0.9}},
                     [], 1, Path("."), 60.0)
    assert "Part-way" not in text and "**Mean ratio 0.875**" in text
