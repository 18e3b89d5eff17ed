"""A model trained with `--task ucr` serves like any other: trained on a real UCR dataset (the ItalyPowerDemand
fixture: 24-sample series, 2 classes), exported, then `/classify` of one series and a stream of it, whose final
prediction equals `/classify` and whose class is the trainer's own on TEST."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import torch
from websockets.asyncio.client import connect

from msssm_serve.export import export as exporter
from msssm_serve.training.inference import window_probabilities
from msssm_serve.training.ucr import load_ucr

from conftest import ServerProcess
from test_training import fit

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ucr" / "ItalyPowerDemand"


def test_a_ucr_model_exports_and_serves_windows_and_streams(tmp_path):
    run = tmp_path / "run"
    fit("--task", "ucr", "--data-dir", str(FIXTURE), "--out", str(run), "--epochs", "40", "--d-model", "16",
        "--n-layers", "2", "--n-boot", "20", "--device", "cpu", "--parity-windows", "4")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.8, metrics["test_accuracy"]  # ROCKET: 0.970 on the whole TEST
    desc = exporter.export_model(run / "checkpoint.pt", tmp_path / "model")
    assert desc["window"] == 24 and desc["default_hop"] == 24 and desc["leads"] == ["signal"]
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
