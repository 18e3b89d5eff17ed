"""The scale mixer's weights as an output: the runtime's summary, /classify?mixer=1, a stream's `scale_weights`
config, a snapshot taken mid-hop, and a graph exported before the output existed."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import numpy as np
import onnx
import pytest
from websockets.asyncio.client import connect

from msssm_serve.runtime import OnnxModel, Stream, summarise_scale_weights

from test_resume import SECRET, predictions, resume_server  # noqa: F401  (a fixture)
from test_server import closing

TOL = 1e-4


@pytest.fixture(scope="module")
def model(model_dir) -> OnnxModel:
    return OnnxModel(model_dir)


def test_shares_are_per_scale_fractions_averaged_over_layers():
    weights = np.array([[[1.0, -1.0, 2.0], [0.0, 3.0, 1.0]]])  # [T=1, layers=2, scales=3]
    np.testing.assert_allclose(summarise_scale_weights(weights), [[(0.25 + 0) / 2, (0.25 + 0.75) / 2, (0.5 + 0.25) / 2]])


def test_a_streams_hop_shares_average_to_the_windows_whatever_the_frames(model, records):
    """Each prediction's shares cover the hop it completes; over a window they average to /classify's window
    shares, and any frame sizes (a flush mid-hop included) give the same hop shares."""
    signal_ = np.concatenate([records[0], records[1][:400]])
    expected = model.classify(signal_, scale_weights=True)
    runs = []
    for frames in ([1000, 400], [7, 93, 250], [333]):
        stream = Stream(model, hop=25, scale_weights=True)
        out, start, i = [], 0, 0
        while start < len(signal_):
            n = frames[i % len(frames)]
            out += stream.push(signal_[start : start + n])
            start, i = start + n, i + 1
            if start == 1010:  # a flush mid-hop: its prediction covers the 10 samples of the hop so far
                out += stream.flush()
        runs.append([p for p in out if p.t % 25 == 0 or p.final])
        assert all(p.scale_weights is not None and abs(p.scale_weights.sum() - 1) < 1e-5 for p in out)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert (a.window, a.t) == (b.window, b.t)
            np.testing.assert_allclose(a.scale_weights, b.scale_weights, atol=1e-6)
    first_window = np.mean([p.scale_weights for p in runs[0] if p.window == 0], axis=0)
    np.testing.assert_allclose(first_window, expected["windows"][0]["scale_weights"], atol=TOL)
    np.testing.assert_allclose(expected["scale_weights"], (expected["windows"][0]["scale_weights"] * 1000
                                                           + expected["windows"][1]["scale_weights"] * 400) / 1400)


def test_classify_adds_scale_weights_only_when_asked(server, model, records):
    signal_ = np.concatenate([records[0], records[1][:500]])
    plain = httpx.post(server.url + "/classify", json={"signal": signal_.tolist()}, timeout=30).json()
    assert "scale_weights" not in plain and all("scale_weights" not in w for w in plain["windows"])
    body = httpx.post(server.url + "/classify?mixer=1", json={"signal": signal_.tolist()}, timeout=30).json()
    expected = model.classify(signal_, scale_weights=True)
    assert body["scales"] == model.scales == ["raw", "detail 1", "detail 2", "detail 3", "coarse"]
    np.testing.assert_allclose(body["scale_weights"], expected["scale_weights"], atol=TOL)
    for got, want in zip(body["windows"], expected["windows"]):
        np.testing.assert_allclose(got["scale_weights"], want["scale_weights"], atol=TOL)
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=TOL)
    np.testing.assert_allclose(body["probabilities"], plain["probabilities"], atol=1e-6)
    bad = httpx.post(server.url + "/classify?mixer=maybe", json={"signal": signal_.tolist()}, timeout=30)
    assert bad.status_code == 422 and "mixer" in bad.json()["detail"]
    info = httpx.get(server.url + "/model").json()["scale_weights"]
    assert info["scales"] == model.scales and "share" in info["definition"]


def test_a_stream_config_asks_for_scale_weights(server, model, records):
    async def run():
        async with connect(server.ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"scale_weights": True, "hop": 50}))
            config = json.loads(await ws.recv())
            await ws.send(records[0].astype("<f4").tobytes())
            return config, await predictions(ws, 1)

    config, got = asyncio.run(run())
    assert config["scale_weights"] is True and config["scales"] == model.scales
    assert [m["t"] for m in got] == list(range(50, 1001, 50))
    stream = Stream(model, hop=50, scale_weights=True)
    for m, p in zip(got, stream.push(records[0])):
        np.testing.assert_allclose(m["scale_weights"], p.scale_weights, atol=TOL)
    received, code = asyncio.run(closing(server.ws_url, [json.dumps({"scale_weights": "yes"})]))
    assert code == 1007 and "scale_weights" in received[-1]["detail"]


def test_a_snapshot_mid_hop_resumes_the_hops_shares(resume_server, records):  # noqa: F811
    """A flush leaves the stream mid-hop with shares summed so far; the token carries them."""
    signal_ = np.concatenate([records[0], records[1]]).astype("<f4")
    config = {"model": "default", "hop": 50, "scale_weights": True}
    cut = 1337

    async def up_to_the_cut_then_flush(ws):
        await ws.send(json.dumps(config))
        await ws.recv()
        await ws.send(signal_[:cut].tobytes())
        await ws.send(json.dumps({"type": "flush"}))

    async def reference():
        async with connect(resume_server.ws_url, max_size=None) as ws:
            await up_to_the_cut_then_flush(ws)
            await ws.send(signal_[cut:].tobytes())
            return await predictions(ws, 2)

    async def resumed():
        async with connect(resume_server.ws_url, max_size=None) as ws:
            await up_to_the_cut_then_flush(ws)
            await ws.send(json.dumps({"type": "snapshot"}))
            before = []
            while (m := json.loads(await ws.recv()))["type"] != "snapshot":
                before.append(m)
            token = m["token"]
        async with connect(resume_server.ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"resume": token}))
            assert json.loads(await ws.recv())["scale_weights"] is True
            await ws.send(signal_[cut:].tobytes())
            return before + await predictions(ws, 2 - sum(m["final"] for m in before))

    want, got = asyncio.run(reference()), asyncio.run(resumed())
    assert [(m["window"], m["t"]) for m in got] == [(m["window"], m["t"]) for m in want]
    assert (1, 337) in [(m["window"], m["t"]) for m in got]  # the flush, mid-hop
    for a, b in zip(got, want):
        np.testing.assert_allclose(a["scale_weights"], b["scale_weights"], atol=TOL)


def test_a_graph_without_the_output_serves_as_before_and_says_so(model_dir, tmp_path, records):
    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    graph = onnx.load(str(old / "model.onnx"))
    kept = [o for o in graph.graph.output if o.name != "scale_weights"]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    onnx.save(graph, str(old / "model.onnx"))
    model = OnnxModel(old)
    assert not model.has_scale_weights
    assert len(model.classify(records[0])["windows"]) == 1
    with pytest.raises(ValueError, match="no scale_weights output"):
        Stream(model, scale_weights=True)
    with pytest.raises(ValueError, match="no scale_weights output"):
        model.advance(records[:1, :10], model.zero_state(1), scale_weights=True)
