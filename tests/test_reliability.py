"""Regression tests for the reliability findings of issue 19, each against a real server process: a stream that used
to wedge and leak its slot, values that broke JSON, oversize bodies, slow clients, bad model directories, close
reasons, and the API key's rules."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from msssm_serve.runtime import OnnxModel

from conftest import REPO_ROOT, ServerProcess, metric_value
from test_server import window_reference

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
TOL = 1e-4


@pytest.fixture(scope="module")
def model(model_dir) -> OnnxModel:
    return OnnxModel(model_dir, threads=1)


@pytest.fixture(scope="module")
def guarded(model_dir):
    """Three streams at most, an API key, short header and body deadlines."""
    proc = ServerProcess(model_dir, {"MSSSM_MAX_STREAMS": "3", "MSSSM_API_KEY": KEY, "MSSSM_HEADER_TIMEOUT_S": "1",
                                     "MSSSM_BODY_TIMEOUT_S": "2", "MSSSM_MAX_BODY_BYTES": "200000",
                                     "MSSSM_IDLE_TIMEOUT_S": "20"}, extra_args=["--log-level", "info"])
    yield proc
    proc.stop()


def gauge(url: str) -> float:
    return metric_value(url, "msssm_active_streams", AUTH)


def wait_for_gauge(url: str, value: float, timeout_s: float = 5) -> float:
    deadline = time.monotonic() + timeout_s
    while (g := gauge(url)) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    return g


async def catch_up_burst(url: str, signal_: np.ndarray, first: int, hop: int = 25) -> list[dict]:
    """A short frame, then the rest of the signal in one frame larger than the buffer space left, then a flush."""
    async with connect(url + f"?api_key={KEY}", max_size=None) as ws:
        await ws.send(json.dumps({"hop": hop}))
        assert json.loads(await ws.recv())["type"] == "config"
        await ws.send(signal_[:first].astype("<f4").tobytes())
        await ws.send(signal_[first:].astype("<f4").tobytes())
        await ws.send(json.dumps({"type": "flush"}))
        n = sum(min(len(signal_) - s, 1000) // hop for s in range(0, len(signal_), 1000))
        n += 1 if len(signal_) % 1000 % hop else 0
        return [json.loads(await asyncio.wait_for(ws.recv(), 20)) for _ in range(n)]


def test_finding_1_a_burst_larger_than_the_free_buffer_never_wedges_a_stream(guarded, model, records):
    """1 + 4,000 samples then a flush used to send nothing, ever, and keep the slot: three such clients filled a
    3-stream server until restart. Now all three get every prediction and the slots are free again."""
    signal_ = np.concatenate([records[i % len(records)] for i in range(5)])[:4001]
    reference = window_reference(model, signal_)

    async def three():
        return await asyncio.gather(*(catch_up_burst(guarded.ws_url, signal_, 1) for _ in range(3)))

    for messages in asyncio.run(three()):
        assert [m["t"] for m in messages if m["window"] == 4] == [1]
        for m in messages:
            np.testing.assert_allclose(m["probabilities"], reference[m["window"]][m["t"] - 1], atol=TOL)
    assert wait_for_gauge(guarded.url, 0) == 0
    freed = asyncio.run(catch_up_burst(guarded.ws_url, signal_[:700], 300, hop=100))  # a slot is free
    assert [m["t"] for m in freed] == list(range(100, 701, 100))


def test_finding_2_huge_finite_values_are_a_4xx_and_never_nan_in_json(guarded):
    r = httpx.post(guarded.url + "/classify", json={"signal": [[3e38] * 12] * 50}, headers=AUTH)
    assert r.status_code == 422 and "beyond" in r.json()["detail"]

    async def stream():
        async with connect(guarded.ws_url + f"?api_key={KEY}") as ws:
            await ws.send(np.full((50, 12), 3e38, "<f4").tobytes())
            raw = await ws.recv()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            return raw, closed.value.rcvd.code

    raw, code = asyncio.run(stream())
    assert json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))["type"] == "error"
    assert code == 1007


def test_finding_3_an_oversize_body_gets_its_413_even_with_urllib(guarded):
    request = urllib.request.Request(guarded.url + "/classify", data=b"[" * 300_000, method="POST",
                                     headers={"Content-Type": "application/json", **AUTH})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 413


def test_finding_4_slow_headers_and_bodies_are_cut_off_without_tracebacks(guarded):
    host, port = "127.0.0.1", guarded.port
    slow = [socket.create_connection((host, port)) for _ in range(20)]
    for s in slow:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    mid_body = socket.create_connection((host, port))
    mid_body.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"signal\": [")
    stalled_body = socket.create_connection((host, port))
    stalled_body.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
    mid_body.close()  # disconnect mid-body
    started = time.monotonic()
    for s in slow:
        s.settimeout(5)
        while s.recv(4096):  # closed by the server (after a 400) within the header deadline
            pass
    assert time.monotonic() - started < 4
    stalled_body.settimeout(6)
    reply = stalled_body.recv(4096)
    assert b" 408 " in reply.split(b"\r\n")[0]
    for s in slow + [stalled_body]:
        s.close()
    assert httpx.get(guarded.url + "/healthz").status_code == 200
    time.sleep(0.2)
    assert "Traceback" not in guarded.output(), guarded.output()


@pytest.mark.parametrize("damage", ["state shape", "missing onnx", "truncated onnx", "invalid json"])
def test_finding_5_a_model_directory_that_cannot_serve_is_refused_at_start(model_dir, tmp_path, damage):
    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    meta = json.loads((bad / "model.json").read_text())
    if damage == "state shape":
        meta["state"][0]["shape"] = [s + 1 for s in meta["state"][0]["shape"]]
        (bad / "model.json").write_text(json.dumps(meta))
    elif damage == "missing onnx":
        (bad / "model.onnx").unlink()
    elif damage == "truncated onnx":
        (bad / "model.onnx").write_bytes((bad / "model.onnx").read_bytes()[:5000])
    else:
        (bad / "model.json").write_text("{not json")
    run = subprocess.run([sys.executable, "-m", "server", "--model", str(bad), "--port", "1"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in run.stderr, run.stderr


def test_finding_6_a_non_ascii_close_reason_still_closes_with_its_code(guarded):
    async def scenario():
        async with connect(guarded.ws_url + f"?api_key={KEY}") as ws:
            await ws.send(json.dumps({"type": "ü" * 200}))  # unknown type: the reason quotes it
            detail = json.loads(await ws.recv())["detail"]
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            return detail, closed.value.rcvd

    detail, close = asyncio.run(scenario())
    assert "ü" in detail
    assert close.code == 1003 and len(close.reason.encode()) <= 123


def test_finding_7_the_key_travels_in_the_header_and_is_never_logged(guarded, records):
    url = guarded.url
    assert httpx.get(url + "/model", params={"api_key": KEY}).status_code == 401  # query: /stream only
    assert httpx.get(url + "/model", headers=AUTH).status_code == 200
    assert httpx.get(url + "/model", headers={"Authorization": f"Basic {KEY}"}).status_code == 401

    async def ws_with(query):
        try:
            async with connect(guarded.ws_url + query) as ws:
                await ws.send(json.dumps({"hop": 25}))
                return json.loads(await ws.recv())["type"]
        except ConnectionClosed as err:
            return err.rcvd.code

    assert asyncio.run(ws_with(f"?api_key={KEY}")) == "config"
    assert asyncio.run(ws_with(f"?api_key={KEY}%20")) in ("error", 1008)  # trailing space: refused, as on HTTP
    text = httpx.get(url + "/metrics", headers=AUTH).text
    assert any(line.startswith("msssm_requests_total{") and 'status="401"' in line for line in text.splitlines())
    time.sleep(0.2)
    log = guarded.output()
    assert "api_key=REDACTED" in log and KEY not in log


def test_finding_8_a_burst_waits_behind_streams_that_keep_real_time(model, records):
    """Five streams pushing whole minutes at once used to take every turn's compute beside fifty real-time ones.
    Now a turn computes at most SAMPLES_PER_TURN samples, and streams keeping pace with real time come first."""
    from msssm_serve.runtime import Stream
    from server.batcher import SAMPLES_PER_TURN, Batcher
    from server.metrics import Metrics

    async def scenario():
        batcher = Batcher(model, Metrics(), batch_wait_ms=0)  # not started: turns are taken by hand
        burst = [batcher.open(Stream(model, hop=25), asyncio.Queue()) for _ in range(5)]
        steady = [batcher.open(Stream(model, hop=25), asyncio.Queue()) for _ in range(50)]
        for s in burst:  # 4,000 samples each, far more than real time allows
            for _ in range(3):
                s.stream.feed(records[0][:1000])
                s._received += 1000
            s._received += 10_000
            batcher.notify(s)
        for s in steady:
            s.stream.feed(records[1][:25])
            s._received += 25
            batcher.notify(s)
        return batcher._take_turn(), steady, burst

    jobs, steady, burst = asyncio.run(scenario())
    taken = [s for s, _ in jobs]
    assert all(s in taken for s in steady), "every real-time stream is in the first turn"
    assert sum(len(seg) for _, seg in jobs) <= SAMPLES_PER_TURN + 4 * 25
    assert taken[: len(steady)] == steady


def test_a_falling_behind_batcher_is_over_its_bound_before_any_latency_completes(model, records):
    """Completed latencies lag a sudden load; how long the oldest real-time stream has waited so far does not. A
    stream ahead of real time waiting is by design and does not count."""
    from msssm_serve.runtime import Stream
    from server.batcher import Batcher
    from server.metrics import Metrics

    async def scenario():
        batcher = Batcher(model, Metrics(), batch_wait_ms=0, latency_bound_ms=50)  # not started: nothing computes
        pushing = batcher.open(Stream(model, hop=25), asyncio.Queue())
        pushing.stream.feed(records[0][:1000])
        pushing._received += 10_000  # far ahead of real time
        batcher.notify(pushing)
        await asyncio.sleep(0.1)
        ahead_only = batcher.overloaded()
        steady = batcher.open(Stream(model, hop=25), asyncio.Queue())
        steady.stream.feed(records[0][:25])
        steady._received += 25
        batcher.notify(steady)
        fresh = batcher.overloaded()
        await asyncio.sleep(0.1)
        return ahead_only, fresh, batcher.overloaded()

    ahead_only, fresh, waited = asyncio.run(scenario())
    assert ahead_only is None and fresh is None
    assert waited is not None and 0.1 <= waited < 1.0


def test_past_its_latency_bound_the_server_refuses_new_work_with_a_retry_hint(model_dir, records):
    """Admission: while the recent p95 latency of real-time streams exceeds the bound, a new stream gets an error
    with `retry_after_s` and close 1013, /classify 503 with Retry-After; streams already open are served on, and
    below the bound everything is admitted again."""
    import time as time_

    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    with TestClient(create_app(Settings(model_dir=model_dir, admit_latency_ms=50))) as client:
        batcher = client.app.state.batcher
        with client.websocket_connect("/stream") as open_stream:
            now = time_.monotonic()
            for _ in range(40):  # what the batcher records when its real-time streams wait 0.2 s
                batcher.latency.add(now, 0.2)
            refused = client.websocket_connect("/stream")
            with refused as ws:
                message = ws.receive_json()
            assert "latency bound" in message["detail"] and message["retry_after_s"] == 2
            r = client.post("/classify", json={"signal": records[0][:200].tolist()})
            assert r.status_code == 503 and r.headers["Retry-After"] == "2" and "latency bound" in r.json()["detail"]
            open_stream.send_bytes(records[0][:50].astype("<f4").tobytes())  # the open stream goes on
            assert open_stream.receive_json()["type"] == "prediction"
            batcher.latency = type(batcher.latency)()  # the window moved on: latencies back under the bound
            assert client.post("/classify", json={"signal": records[0][:200].tolist()}).status_code == 200


def test_streams_to_keep_leaves_a_load_whose_backlog_is_worked_off_in_time():
    """The shed rule alone: a batcher that works off its backlog within the catch-up time keeps every stream; one
    that does not keeps as many as it can carry while working off their share of the backlog (with the margin),
    never fewer than one."""
    from server.batcher import Load
    from server.hub import SHED_MARGIN, streams_to_keep

    # no backlog beyond the normal queue: latency over the bound is a transient (a slow call), keep all
    assert streams_to_keep(100, Load(arrived_per_s=10_000, computed_per_s=5_000, excess_backlog=0)) == 100
    # behind, but computing 2,000/s more than arrives: 3,000 samples worked off in 1.5 s < 2 s
    assert streams_to_keep(100, Load(10_000, 12_000, 3_000), catch_up_s=2.0) == 100
    # the same backlog with only 500/s to spare would take 6 s: keep 100 x 0.85 x 10,500 / (10,000 + 1,500)
    kept = streams_to_keep(100, Load(10_000, 10_500, 3_000), catch_up_s=2.0)
    assert kept == int(100 * SHED_MARGIN * 10_500 / 11_500) == 77
    # falling behind (computes less than arrives): fewer kept the deeper the backlog
    shallow = streams_to_keep(100, Load(10_000, 6_000, 1_000))
    deep = streams_to_keep(100, Load(10_000, 6_000, 20_000))
    assert 1 <= deep < shallow < 100 * 6_000 / 10_000
    assert streams_to_keep(3, Load(10_000, 10, 50_000)) == 1  # the oldest stream is never shed


def test_the_batchers_load_counts_what_waits_beyond_the_latency_bound(model, records):
    """`Batcher.load`: rates over the asked span only, and the backlog of real-time streams that are ready beyond
    what arrives within the latency bound; a stream ahead of real time (a file pushed at once) is not a backlog."""
    import time as time_

    from msssm_serve.runtime import Stream
    from server.batcher import Batcher
    from server.metrics import Metrics

    async def scenario():
        batcher = Batcher(model, Metrics(), batch_wait_ms=0, latency_bound_ms=100)  # not started: nothing computes
        now = time_.monotonic()
        batcher.arrived.add(now - 1.5, 9_999)  # outside a 1 s span
        batcher.arrived.add(now - 0.5, 2_000)
        batcher.computed.add(now - 0.5, 1_000)
        steady = [batcher.open(Stream(model, hop=25), asyncio.Queue()) for _ in range(8)]
        for s in steady:  # 100 samples each ready: 800 waiting
            s.stream.feed(records[0][:100])
            s._received += 100
            batcher.notify(s)
        pushing = batcher.open(Stream(model, hop=25), asyncio.Queue())
        pushing.stream.feed(records[0][:1000])
        pushing._received += 10_000
        batcher.notify(pushing)
        return batcher.load(1.0)

    load = asyncio.run(scenario())
    assert load.arrived_per_s == 2_000 and load.computed_per_s == 1_000
    assert load.excess_backlog == 800 - 2_000 * 0.1


def _shed_server(model_dir, monkeypatch, load):
    """A test server whose batcher reports `load` (a callable of nothing) and whose shedder looks often."""
    from fastapi.testclient import TestClient

    from server import hub
    from server.app import create_app
    from server.settings import Settings

    monkeypatch.setattr(hub, "SHED_EVERY_S", 0.05)
    monkeypatch.setattr(hub, "LOAD_WINDOW_S", 0.3)
    monkeypatch.setattr(hub, "SHED_SETTLE_S", 30.0)  # one shed only in these tests
    client = TestClient(create_app(Settings(model_dir=model_dir, admit_latency_ms=50)))
    return client, lambda batcher: monkeypatch.setattr(batcher, "load", lambda over_s: load())


def test_streams_admitted_together_past_the_bound_are_shed_newest_first(model_dir, records, monkeypatch):
    """Streams that connect together are all admitted before their load shows; once they are in and the batcher is
    over its bound and falling behind, the newest are shed (a final snapshot, then an error with `retry_after_s` and
    close 1013), as many as `streams_to_keep` says, and the oldest stream goes on."""
    import time as time_

    from server.batcher import Load

    frame = records[0][:25].astype("<f4").tobytes()
    # keep floor(8 x 0.85 x 500 / (800 + 400 / 2)) = 3: the newest 5 are shed
    client, fake_load = _shed_server(model_dir, monkeypatch, lambda: Load(800, 500, 400))
    with client:
        batcher = client.app.state.batcher
        fake_load(batcher)
        streams = [client.websocket_connect("/stream") for _ in range(8)]
        opened = [s.__enter__() for s in streams]
        for ws in opened:
            ws.send_bytes(frame)
            assert ws.receive_json()["type"] == "prediction"
        now = time_.monotonic()
        for _ in range(40):  # the load shows: real-time streams wait 0.2 s (p95 4x the bound)
            batcher.latency.add(now, 0.2)
        for ws in opened[-5:]:
            snap = ws.receive_json()
            assert snap["type"] == "snapshot" and snap["token"]
            error = ws.receive_json()
            assert error["retry_after_s"] == 2 and "shed" in error["detail"]
        batcher.latency = type(batcher.latency)()
        opened[0].send_bytes(frame)  # the oldest is served on
        assert opened[0].receive_json()["type"] == "prediction"
        assert client.app.state.metrics.streams_shed._value.get() == 5
        for s in streams:
            s.__exit__(None, None, None)


def test_a_batcher_that_catches_up_in_time_sheds_nothing_and_nothing_is_judged_while_streams_connect(
        model_dir, records, monkeypatch):
    """Latency over the bound while the batcher works its backlog off within CATCH_UP_S (the tail of a burst of
    connections) sheds nothing; while streams are still being admitted nothing is judged at all (handshakes take the
    batcher's CPU, so its rate reads low); once it falls behind, the newest streams are shed."""
    import time as time_

    from server import hub
    from server.batcher import Load

    frame = records[0][:25].astype("<f4").tobytes()
    load = {"now": Load(800, 1_000, 300)}  # 300 samples worked off at 200/s: 1.5 s < CATCH_UP_S
    client, fake_load = _shed_server(model_dir, monkeypatch, lambda: load["now"])
    with client:
        batcher, shed = client.app.state.batcher, client.app.state.metrics.streams_shed
        fake_load(batcher)
        streams = [client.websocket_connect("/stream") for _ in range(8)]
        opened = [s.__enter__() for s in streams]
        for ws in opened:
            ws.send_bytes(frame)
            assert ws.receive_json()["type"] == "prediction"
        over = time_.monotonic()
        for _ in range(40):
            batcher.latency.add(over, 0.2)  # p95 4x the bound, for the latency window's 2 s
        time_.sleep(0.6)
        assert batcher.overloaded() is not None and shed._value.get() == 0  # over, catching up: none shed
        hub_ = client.app.state.hub
        load["now"] = Load(800, 900, 300)  # now it would take 3 s: keep floor(8 x 0.85 x 900 / 950) = 6
        hub_._last_admitted = time_.monotonic() + 0.4  # as if a stream were admitted 0.4 s from now
        time_.sleep(0.5)
        assert shed._value.get() == 0, "nothing is judged while streams are being admitted"
        for ws in opened[-2:]:
            assert ws.receive_json()["type"] == "snapshot"
            assert "shed" in ws.receive_json()["detail"]
        assert shed._value.get() == 2
        assert time_.monotonic() - hub_._last_admitted >= hub.LOAD_WINDOW_S
        for s in streams:
            s.__exit__(None, None, None)
