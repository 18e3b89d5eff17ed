"""WS /gateway: many streams over one connection, each equal to what /stream gives for the same frames; a fault in
one stream ends that stream only; admission, idle, snapshots and the connection's own framing errors."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from websockets.asyncio.client import connect

from msssm_serve.client import gateway_frames
from msssm_serve.runtime import OnnxModel

from conftest import LEADS

TOL = 1e-4


@pytest.fixture(scope="module")
def model(model_dir) -> OnnxModel:
    return OnnxModel(model_dir, threads=1)


def gateway_url(server) -> str:
    return server.ws_url.rsplit("/", 1)[0] + "/gateway"


def window_reference(model: OnnxModel, signal_: np.ndarray) -> list[np.ndarray]:
    w = model.window
    return [model.advance(signal_[s : s + w][None], model.zero_state(1))[0][0] for s in range(0, len(signal_), w)]


class GatewayReader:
    """Reads a gateway connection's batches; -> messages per stream id, in order."""

    def __init__(self, ws):
        self.ws = ws
        self.by_id: dict[int, list[dict]] = {}
        self.batches = 0

    async def until(self, done, timeout_s: float = 30) -> None:
        async with asyncio.timeout(timeout_s):
            while not done():
                batch = json.loads(await self.ws.recv())
                assert batch["type"] == "messages", batch
                self.batches += 1
                for m in batch["messages"]:
                    self.by_id.setdefault(m["id"], []).append(m)

    def of(self, stream_id: int, kind: str) -> list[dict]:
        return [m for m in self.by_id.get(stream_id, []) if m["type"] == kind]

    def before(self, stream_id: int, kind: str, mark: str) -> list[dict]:
        """The stream's `kind` messages that came before its first `mark` message (one batch can hold both)."""
        messages = self.by_id.get(stream_id, [])
        cut = next((i for i, m in enumerate(messages) if m["type"] == mark), len(messages))
        return [m for m in messages[:cut] if m["type"] == kind]


def test_streams_over_one_gateway_equal_the_model_whatever_the_frames(server, model, records):
    """Four streams (hops 25 and 50, float32, int16 counts, text samples) interleaved in shared binary messages with
    ragged frame sizes: every prediction equals the model on that window's first t samples, as on /stream."""
    signals = {i: np.concatenate([records[i], records[(i + 1) % 4][:310]]) for i in range(4)}
    configs = {0: {}, 1: {"hop": 50}, 2: {"dtype": "int16", "gain": 1000, "hop": 100}, 3: {"leads": LEADS}}
    sizes = [37, 250, 13, 101, 400]

    async def scenario():
        async with connect(gateway_url(server), max_size=None) as ws:
            reader = GatewayReader(ws)
            for i, config in configs.items():
                await ws.send(json.dumps({"type": "open", "id": i, **config}))
            await reader.until(lambda: all(reader.of(i, "config") for i in configs))
            pos = dict.fromkeys(signals, 0)
            step = 0
            while any(pos[i] < len(signals[i]) for i in signals):
                frames = {}
                for i in (0, 1, 2):
                    n = sizes[(step + i) % len(sizes)]
                    frame = signals[i][pos[i] : pos[i] + n]
                    if len(frame):
                        frames[i] = np.round(frame * 1000).astype(np.int16) if i == 2 else frame
                    pos[i] += n
                if frames:
                    await ws.send(gateway_frames(frames))
                frame = signals[3][pos[3] : pos[3] + 77]
                if len(frame):
                    await ws.send(json.dumps({"id": 3, "samples": frame.tolist()}))
                pos[3] += 77
                step += 1
            for i in configs:
                await ws.send(json.dumps({"type": "flush", "id": i}))
            await reader.until(lambda: all(any(p["window"] == 1 and p["t"] == 310 for p in reader.of(i, "prediction"))
                                           for i in configs))
            return reader

    reader = asyncio.run(scenario())
    assert reader.batches < sum(len(v) for v in reader.by_id.values())  # messages share batches
    for i, config in configs.items():
        hop = config.get("hop", 25)
        assert reader.of(i, "config")[0]["hop"] == hop
        predictions = reader.of(i, "prediction")
        assert [p["t"] for p in predictions if p["window"] == 0] == list(range(hop, 1001, hop))
        sent = np.round(signals[i] * 1000) / 1000 if i == 2 else signals[i]  # what int16 counts / gain carry
        reference = window_reference(model, sent.astype(np.float32))
        for p in predictions:
            np.testing.assert_allclose(p["probabilities"], reference[p["window"]][p["t"] - 1], atol=TOL)
        assert not reader.of(i, "closed") and not reader.of(i, "error")


def test_a_faulty_stream_is_closed_alone_and_the_others_go_on(server, model, records):
    """A frame with NaN ends its stream (closed 1007); an unknown id gets an error; the other stream's predictions
    are unaffected. A broken record header closes the connection with 1007."""

    async def scenario():
        async with connect(gateway_url(server), max_size=None) as ws:
            reader = GatewayReader(ws)
            await ws.send(json.dumps({"type": "open", "id": 1}))
            await ws.send(json.dumps({"type": "open", "id": 2}))
            await ws.send(json.dumps({"type": "open", "id": 2}))  # twice: an error, the open stream untouched
            await reader.until(lambda: reader.of(1, "config") and reader.of(2, "config") and reader.of(2, "error"))
            bad = records[1][:25].copy()
            bad[3, 4] = np.nan
            await ws.send(gateway_frames({1: records[0][:50], 2: bad}))
            await ws.send(gateway_frames({2: records[1][:25], 7: records[1][:25], 1: records[0][50:100]}))
            await reader.until(lambda: len(reader.of(1, "prediction")) == 4 and reader.of(2, "closed")
                               and reader.of(7, "error"))
            await ws.send(b"\x01\x00\x00\x00")  # half a record header
            await ws.wait_closed()
            return reader, ws.close_code

    reader, code = asyncio.run(scenario())
    closed = reader.of(2, "closed")
    assert len(closed) == 1 and closed[0]["code"] == 1007 and "NaN" in closed[0]["detail"]
    assert "already open" in reader.of(2, "error")[0]["detail"]
    assert not reader.of(2, "prediction")  # the frame after its close was not taken either
    assert "no open stream 7" in reader.of(7, "error")[0]["detail"]
    reference = window_reference(model, records[0][:100])
    for p in reader.of(1, "prediction"):
        np.testing.assert_allclose(p["probabilities"], reference[0][p["t"] - 1], atol=TOL)
    assert code == 1007


def test_gateway_streams_count_against_admission_and_idle_out_alone(strict_server, records):
    """max-streams 2 counts a gateway's streams: the third open is refused (1013, retry hint); closing one frees a
    place; a stream sent nothing for the idle timeout (1 s) is closed 1000 while the one fed goes on."""
    key = {"Authorization": "Bearer s3cret"}

    async def scenario():
        async with connect(gateway_url(strict_server), additional_headers=key, max_size=None) as ws:
            reader = GatewayReader(ws)
            for i in (10, 11, 12):
                await ws.send(json.dumps({"type": "open", "id": i}))
            await reader.until(lambda: reader.of(10, "config") and reader.of(11, "config") and reader.of(12, "closed"))
            await ws.send(json.dumps({"type": "close", "id": 11}))
            await ws.send(json.dumps({"type": "open", "id": 12}))
            await reader.until(lambda: reader.of(11, "closed") and reader.of(12, "config"))
            for k in range(12):  # 2.4 s of frames for stream 10 only
                await ws.send(gateway_frames({10: records[0][25 * k : 25 * (k + 1)]}))
                await asyncio.sleep(0.2)
            await reader.until(lambda: len(reader.of(12, "closed")) == 2 and len(reader.of(10, "prediction")) == 12,
                               timeout_s=10)
            return reader

    reader = asyncio.run(scenario())
    refused = reader.of(12, "closed")[0]
    assert refused["code"] == 1013 and refused["retry_after_s"] > 0
    assert reader.of(11, "closed")[0]["code"] == 1000
    idle = reader.of(12, "closed")[1]
    assert idle["code"] == 1000 and "idle" in idle["detail"]
    assert not reader.of(10, "closed") and len(reader.of(10, "prediction")) == 12


def test_a_gateway_without_the_key_is_refused(strict_server):
    async def scenario():
        async with connect(gateway_url(strict_server), max_size=None) as ws:
            message = json.loads(await ws.recv())
            await ws.wait_closed()
            return message, ws.close_code

    message, code = asyncio.run(scenario())
    assert code == 1008 and message["type"] == "error" and "Bearer" in message["detail"]


def test_a_gateway_stream_snapshot_resumes_on_stream(server, model, records):
    """A snapshot taken on a gateway stream is a /stream resume token: the stream continues there exactly."""
    signal_ = np.concatenate([records[2], records[3][:200]])

    async def scenario():
        async with connect(gateway_url(server), max_size=None) as ws:
            reader = GatewayReader(ws)
            await ws.send(json.dumps({"type": "open", "id": 5, "hop": 50}))
            await ws.send(gateway_frames({5: signal_[:630]}))
            await ws.send(json.dumps({"type": "snapshot", "id": 5}))
            await reader.until(lambda: reader.of(5, "snapshot"))
        token = reader.of(5, "snapshot")[0]["token"]
        async with connect(server.ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"resume": token}))
            assert json.loads(await ws.recv())["type"] == "config"
            await ws.send(signal_[630:].astype("<f4").tobytes())
            await ws.send(json.dumps({"type": "flush"}))
            later = []
            while not later or later[-1]["window"] != 1 or later[-1]["t"] != 200:
                later.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        # the predictions before the snapshot: those after it are of samples its token carries
        return reader.before(5, "prediction", "snapshot") + later

    predictions = asyncio.run(scenario())
    reference = window_reference(model, signal_)
    assert [(p["window"], p["t"]) for p in predictions if p["window"] == 0] == [(0, t) for t in range(50, 1001, 50)]
    for p in predictions:
        np.testing.assert_allclose(p["probabilities"], reference[p["window"]][p["t"] - 1], atol=TOL)


def test_sigterm_gives_each_gateway_stream_a_snapshot_and_a_close_then_closes_the_connection(model_dir, records):
    """Draining: every stream of a gateway gets its final snapshot (to resume on another replica) and a `closed`
    1001, then the connection itself closes 1001."""
    import signal

    from conftest import ServerProcess

    proc = ServerProcess(model_dir, {})
    try:
        async def interrupted():
            async with connect(gateway_url(proc), max_size=None) as ws:
                reader = GatewayReader(ws)
                for i in (1, 2):
                    await ws.send(json.dumps({"type": "open", "id": i}))
                await ws.send(gateway_frames({1: records[0][:100], 2: records[1][:60]}))
                await reader.until(lambda: len(reader.of(1, "prediction")) == 4 and len(reader.of(2, "prediction")) == 2)
                proc.process.send_signal(signal.SIGTERM)
                last = None
                async for text in ws:
                    message = json.loads(text)
                    if message["type"] == "messages":
                        for m in message["messages"]:
                            reader.by_id.setdefault(m["id"], []).append(m)
                    else:
                        last = message
                return reader, last, ws.close_code

        reader, last, code = asyncio.run(interrupted())
        assert code == 1001 and last == {"type": "error", "detail": "server shutting down"}
        for i, sent in ((1, 100), (2, 60)):
            snapshot, closed = reader.by_id[i][-2:]
            assert snapshot["type"] == "snapshot" and snapshot["t"] + snapshot["pending"] == sent
            assert closed["type"] == "closed" and closed["code"] == 1001
        assert proc.process.wait(timeout=15) in (0, -signal.SIGTERM)
    finally:
        proc.stop()


def test_records_for_ids_not_open_are_answered_once_per_id_and_message(server, records):
    """A gateway still sending for streams the server has closed (shed, say) is told once per id and message, not
    once per record; the connection stays open."""

    async def scenario():
        async with connect(gateway_url(server), max_size=None) as ws:
            reader = GatewayReader(ws)
            frame = records[0][:5]
            await ws.send(b"".join(gateway_frames({i: frame}) for i in (41, 42, 41, 41, 42)))
            await ws.send(json.dumps({"type": "open", "id": 3}))
            await reader.until(lambda: reader.of(3, "config"))
            return reader

    reader = asyncio.run(scenario())
    assert len(reader.of(41, "error")) == 1 and len(reader.of(42, "error")) == 1
