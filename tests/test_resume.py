"""Snapshot and resume: a stream cut anywhere continues on a new connection exactly as if never interrupted, and
no token that is damaged, foreign, stale or inconsistent is ever used."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from websockets.asyncio.client import connect

from conftest import ServerProcess
from test_devices import device_signal
from test_server import closing

SECRET = "test-secret"


@pytest.fixture(scope="module")
def resume_server(repository):
    proc = ServerProcess(repository, {"MSSSM_STATE_SECRET": SECRET}, repository=True)
    yield proc
    proc.stop()


async def predictions(ws, until_final: int) -> list[dict]:
    out = []
    while sum(m["final"] for m in out) < until_final:
        m = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert m["type"] == "prediction", m
        out.append(m)
    return out


async def uninterrupted(url, config, signal_, n_windows):
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps(config))
        await ws.recv()
        for start in range(0, len(signal_), 333):
            await ws.send(signal_[start : start + 333].tobytes())
        return await predictions(ws, n_windows)


async def cut_and_resumed(url, config, signal_, cut, n_windows):
    """Frames up to `cut`, a snapshot, the connection dropped; a new one resumes and sends the rest."""
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps(config))
        await ws.recv()
        for start in range(0, cut, 250):
            await ws.send(signal_[start : min(start + 250, cut)].tobytes())
        await ws.send(json.dumps({"type": "snapshot"}))
        before = []
        while True:
            m = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if m["type"] == "snapshot":
                token = m["token"]
                break
            before.append(m)
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"resume": token}))
        assert json.loads(await ws.recv())["type"] == "config"
        for start in range(cut, len(signal_), 97):
            await ws.send(signal_[start : start + 97].tobytes())
        after = await predictions(ws, n_windows - sum(m["final"] for m in before))
    return before, after, m


@pytest.mark.parametrize("rate, leads, model", [(100, None, "default"), (360, ["MLII", "V1"], "rhythm")])
def test_a_resumed_stream_predicts_exactly_as_an_uninterrupted_one(resume_server, records, rate, leads, model):
    if rate == 100:
        signal_ = np.concatenate([records[0], records[1], records[2][:500]]).astype("<f4")
    else:
        signal_ = device_signal(records, 360)[:, [1, 6]].astype("<f4")
    config = {"model": model, "sample_rate": rate, "hop": 50, **({"leads": leads} if leads else {})}
    reference = asyncio.run(uninterrupted(resume_server.ws_url, config, signal_, 2))
    cut = int(len(signal_) * 0.61) + 7  # mid-window, off any hop and frame boundary
    before, after, snap = asyncio.run(cut_and_resumed(resume_server.ws_url, config, signal_, cut, 2))
    assert len(snap["token"]) < 400_000
    if rate == 100:  # every sample sent is in the snapshot: computed (window, t) or pending
        assert snap["window"] * 1000 + snap["t"] + snap["pending"] == cut
    got = before + after
    assert [(m["window"], m["t"]) for m in got] == [(m["window"], m["t"]) for m in reference[: len(got)]]
    assert len(got) == len(reference)
    for m, r in zip(got, reference):
        np.testing.assert_allclose(m["probabilities"], r["probabilities"], atol=1e-4)


def sealed(header_changes=None, array_changes=None, secret=SECRET):
    """A token for the `default` model, as a snapshot would issue it, with fields changed."""
    from msssm_serve.runtime import OnnxModel
    from server import snapshot

    return lambda model_dir: _sealed(OnnxModel(model_dir, threads=1), header_changes or {}, array_changes or {},
                                     secret.encode(), snapshot)


def _sealed(model, header_changes, array_changes, secret, snapshot):
    arrays = {f"state_{i}": np.zeros(shape, np.float32) for i, shape in enumerate(model.state_shapes)}
    arrays["pending"] = np.zeros((3, 12), np.float32)
    arrays["last"] = np.full(len(model.labels), 0.5, np.float32)
    header = {"model": "default", "version": snapshot.model_version(model), "config": {"hop": 25}, "window": 0,
              "t": 100, "last_made": [0, 100], "resampler": None}
    return snapshot.seal({**header, **header_changes}, {**arrays, **array_changes}, secret)


BAD = {
    "not base64": (lambda d: "!!!." + "x" * 10, 1007, "damaged"),
    "no dot": (lambda d: "abc", 1007, "token string"),
    "another secret": (sealed(secret="other"), 1008, "secret"),
    "altered": (lambda d: sealed()(d)[:-8] + "AAAAAAAA", 1008, "secret"),
    "another version": (sealed({"version": "0" * 64}), 1008, "another version"),
    "unknown model": (sealed({"model": "nope"}), 1008, "does not hold"),
    "state shape": (sealed(array_changes={"state_0": np.zeros((2, 2), np.float32)}), 1007, "state_0"),
    "state NaN": (sealed(array_changes={"state_1": None}), 1007, "state_1"),
    "position": (sealed({"t": 5000}), 1007, "window position"),
    "pending NaN": (sealed(array_changes={"pending": np.full((3, 12), np.nan, np.float32)}), 1007, "non-finite"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_token_is_refused_with_a_reason_never_used(resume_server, model_dir, case):
    make, code, fragment = BAD[case]
    if case == "state NaN":
        from msssm_serve.runtime import OnnxModel

        shape = OnnxModel(model_dir, threads=1).state_shapes[1]
        make = sealed(array_changes={"state_1": np.full(shape, np.nan, np.float32)})
    received, close = asyncio.run(closing(resume_server.ws_url, [json.dumps({"resume": make(model_dir)})]))
    assert close == code and fragment in received[-1]["detail"], received


def test_resume_only_as_the_first_message_and_snapshots_only_of_one_model(resume_server):
    received, close = asyncio.run(closing(resume_server.ws_url, [json.dumps({"hop": 25}),
                                                                 json.dumps({"resume": "x.y"})]))
    assert close == 1003 and "first message" in received[-1]["detail"]
    received, close = asyncio.run(closing(resume_server.ws_url, [json.dumps({"models": ["default", "rhythm"]}),
                                                                 json.dumps({"type": "snapshot"})]))
    assert close == 1003 and "one-model" in received[-1]["detail"]


def test_the_client_helper_survives_a_killed_replica_with_every_prediction_unchanged(model_dir, records):
    """msssm_serve.client streams paced frames; the server is killed (SIGKILL) mid-stream and another replica with
    the same secret starts on the same address; the client reconnects, resumes from its last snapshot, and every
    prediction equals an uninterrupted stream's."""
    import signal as signals
    import threading

    from msssm_serve.client import ResumableStream
    from server.launcher import free_port

    signal_ = np.concatenate([records[0], records[1], records[2][:400]]).astype("<f4")
    port = free_port()
    first = ServerProcess(model_dir, {"MSSSM_STATE_SECRET": SECRET}, port=port)
    url = f"ws://127.0.0.1:{port}/stream"
    reference = asyncio.run(ResumableStream(url, {"hop": 50}, frame_samples=50).send(signal_))
    replicas = [first]

    def kill_and_replace():
        first.process.send_signal(signals.SIGKILL)
        first.process.wait()
        replicas.append(ServerProcess(model_dir, {"MSSSM_STATE_SECRET": SECRET}, port=port))

    client = ResumableStream(url, {"hop": 50}, frame_samples=50, snapshot_every=4, realtime_rate=600)
    timer = threading.Timer(1.5, kill_and_replace)  # ~900 of the 2,400 samples sent by then
    timer.start()
    try:
        got = asyncio.run(client.send(signal_))
    finally:
        timer.join()
        for replica in replicas:
            replica.stop()
    # re-sent: the frames after the last answered snapshot, at most two snapshot intervals (one request may be lost)
    assert client.reconnects >= 1 and 0 < client.resent_frames <= 8
    assert [(m["window"], m["t"]) for m in got] == [(m["window"], m["t"]) for m in reference]
    for m, r in zip(got, reference):
        np.testing.assert_allclose(m["probabilities"], r["probabilities"], atol=1e-4)


def test_a_stream_can_ask_for_a_snapshot_every_n_hops(resume_server, records):
    async def run():
        async with connect(resume_server.ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"hop": 50, "snapshot_every": 4}))
            await ws.recv()
            for start in range(0, 1000, 100):
                await ws.send(records[0][start : start + 100].astype("<f4").tobytes())
            messages = [json.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(20 + 5)]
        return messages

    messages = asyncio.run(run())
    snaps = [m for m in messages if m["type"] == "snapshot"]
    assert len(snaps) == 5 and all(m["token"] for m in snaps)  # every 200 samples of the 1,000 sent
    received, code = asyncio.run(closing(resume_server.ws_url, [json.dumps({"hop": 50, "snapshot_every": 0})]))
    assert code == 1007 and "snapshot_every" in received[-1]["detail"]
