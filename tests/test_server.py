"""The server against a real uvicorn process on loopback: /classify, WS /stream (equal to /classify whatever the
frame sizes, batched across streams without mixing states), limits, bad input, auth, shutdown."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from scipy.signal import resample_poly
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from msssm_serve.runtime import OnnxModel

from conftest import LEADS, ServerProcess, metric_value

TOL = 1e-4
KEY = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def model(model_dir) -> OnnxModel:
    return OnnxModel(model_dir, threads=1)


@pytest.fixture(scope="module")
def signal_3w(records) -> np.ndarray:
    """Three real records back to back plus part of a fourth: three whole windows and a partial one."""
    return np.concatenate([records[0], records[1], records[2], records[3][:310]])


def post_json(url, signal_, headers=None, **extra):
    return httpx.post(url + "/classify", json={"signal": signal_.tolist(), **extra}, headers=headers, timeout=30)


def post_binary(url, signal_, params=None, headers=None):
    return httpx.post(url + "/classify", content=np.asarray(signal_, "<f4").tobytes(), timeout=30,
                      params={"channels": signal_.shape[1], **(params or {})},
                      headers={"Content-Type": "application/octet-stream", **(headers or {})})


def window_reference(model: OnnxModel, signal_: np.ndarray) -> list[np.ndarray]:
    """Per window k of the signal, probabilities [t, K] after each sample (the graph is causal, so row t-1 is the
    classification of the window's first t samples)."""
    w = model.window
    return [model.advance(signal_[s : s + w][None], model.zero_state(1))[0][0] for s in range(0, len(signal_), w)]


async def run_stream(url, signal_, frame_sizes, *, hop=None, binary=True, flush=True, headers=None):
    """Send the signal in frames of the given sizes (cycled), optionally flush; -> prediction messages."""
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        if hop is not None:
            await ws.send(json.dumps({"hop": hop, "sample_rate": 100, "leads": LEADS}))
            assert json.loads(await ws.recv())["type"] == "config"
        start, i = 0, 0
        while start < len(signal_):
            frame = signal_[start : start + frame_sizes[i % len(frame_sizes)]]
            await ws.send(frame.astype("<f4").tobytes() if binary else json.dumps({"samples": frame.tolist()}))
            start += len(frame)
            i += 1
        if flush:
            await ws.send(json.dumps({"type": "flush"}))
        hop_ = hop or 25  # the fixture model's window (1000) is a multiple of both hops used here
        expected = sum(min(len(signal_) - s, 1000) // hop_ for s in range(0, len(signal_), 1000))
        if flush and len(signal_) % 1000 % hop_:  # a flush on a hop boundary repeats nothing
            expected += 1
        return [json.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(expected)]


async def closing(url, messages, headers=None):
    """Send messages; -> (messages received, close code)."""
    received = []
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        try:
            for m in messages:
                await ws.send(m)
            async for m in ws:
                received.append(json.loads(m))
        except ConnectionClosed:
            pass
        await ws.wait_closed()
        return received, ws.close_code


# --- /classify ---------------------------------------------------------------------------------------------------
def test_classify_json_and_binary_equal_runtime(server, model, signal_3w):
    expected = model.classify(signal_3w)
    for response in (post_json(server.url, signal_3w), post_binary(server.url, signal_3w)):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "tiny-test" and body["labels"] == model.labels
        assert body["samples"] == len(signal_3w)
        assert [w["start"] for w in body["windows"]] == [0, 1000, 2000, 3000]
        for got, want in zip(body["windows"], expected["windows"]):
            np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=TOL)
        np.testing.assert_allclose(body["probabilities"], expected["probabilities"], atol=TOL)
        assert body["predicted"] == [l for l, p in zip(model.labels, body["probabilities"]) if p >= 0.5]


def test_concurrent_classify_requests_are_batched_and_each_gets_its_own_answer(server, model, records, signal_3w):
    """Requests that wait together share calls (MAX_CLASSIFY_WINDOWS_PER_CALL windows); none sees another's data."""
    signals = [records[i % len(records)][: 1000 - 90 * (i // 4)] for i in range(10)] + [signal_3w]  # equal lengths share rows

    async def post_all():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(server.url + "/classify", json={"signal": s.tolist()})
                                          for s in signals))

    for response, signal_ in zip(asyncio.run(post_all()), signals):
        assert response.status_code == 200, response.text
        expected = model.classify(signal_)
        got = response.json()
        assert [w["start"] for w in got["windows"]] == [w["start"] for w in expected["windows"]]
        for w_got, w_want in zip(got["windows"], expected["windows"]):
            np.testing.assert_allclose(w_got["probabilities"], w_want["probabilities"], atol=TOL)


def test_a_failing_classify_request_does_not_fail_those_batched_with_it(model, records):
    """Batcher level: a request whose signal the model rejects gets its own error; the others their results."""
    from server.batcher import Batcher
    from server.metrics import Metrics

    async def scenario():
        batcher = Batcher(model, Metrics(), batch_wait_ms=0)
        batcher.start()
        try:
            good = [records[0], records[1][:700]]
            bad = np.zeros((500, model.n_channels + 1), np.float32)  # wrong width: classify raises ValueError
            return await asyncio.gather(*(batcher.classify(s) for s in [good[0], bad, good[1]]),
                                        return_exceptions=True), good
        finally:
            await batcher.stop()

    (first, error, second), good = asyncio.run(scenario())
    assert isinstance(error, ValueError)
    for got, signal_ in ((first, good[0]), (second, good[1])):
        np.testing.assert_allclose(got["probabilities"], model.classify(signal_)["probabilities"], atol=TOL)


def test_a_long_classify_request_is_computed_in_pieces_that_streams_can_come_between(model, records):
    """Batcher level: 20 windows go through calls of at most MAX_CLASSIFY_WINDOWS_PER_CALL windows, and the answer
    is the one of a single call."""
    from server.batcher import MAX_CLASSIFY_WINDOWS_PER_CALL, Batcher
    from server.metrics import Metrics

    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def classify_many(self, signals, scale_weights=False):
            calls.append(sum(-(-len(s) // model.window) for s in signals))
            return self.inner.classify_many(signals, scale_weights)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    signal_ = np.concatenate([records[i % len(records)] for i in range(20)])[: 19 * model.window + 300]

    async def scenario():
        batcher = Batcher(Counting(model), Metrics(), batch_wait_ms=0)
        batcher.start()
        try:
            return await batcher.classify(signal_)
        finally:
            await batcher.stop()

    got, want = asyncio.run(scenario()), model.classify(signal_)
    assert calls == [8, 8, 4] and max(calls) <= MAX_CLASSIFY_WINDOWS_PER_CALL
    assert [w["start"] for w in got["windows"]] == [w["start"] for w in want["windows"]]
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-6)
    for g, w in zip(got["windows"], want["windows"]):
        np.testing.assert_allclose(g["probabilities"], w["probabilities"], atol=1e-6)


def test_classify_requests_gather_for_a_fuller_call_only_while_they_keep_arriving(model, records):
    """Batcher level: a request on a quiet batcher goes at once, and so does one from a client that sends one request
    at a time; under a steady arrival rate of requests outstanding together the next call waits for more (at most
    CLASSIFY_WAIT_FACTOR x batch_wait_ms from the oldest, never past a full call or the most outstanding together
    lately), and then the answers are those of the model alone, each request its own."""
    from server.batcher import CLASSIFY_WAIT_FACTOR, MAX_CLASSIFY_WINDOWS_PER_CALL, Batcher, ClassifyPiece
    from server.metrics import Metrics

    budget = CLASSIFY_WAIT_FACTOR * 0.02

    def piece(queued_at, last=True):
        return ClassifyPiece(records[0], None, False, queued_at, windows=1, last=last)

    async def scenario():
        batcher = Batcher(model, Metrics(), batch_wait_ms=20)  # not started: the decision is read by hand
        now = time.monotonic()
        batcher._classify_queue.append(piece(now))
        batcher.classify_arrived.add(now, 1)
        quiet = batcher._classify_fill_wait()
        for k in range(119, 0, -1):  # the last two seconds at 60 requests/s
            batcher.classify_arrived.add(now - k / 60, 1)
        batcher._classify_peaks.append((now, 1))
        one_at_a_time = batcher._classify_fill_wait()  # a client that waits for each answer: nobody else to wait for
        batcher._classify_peaks.append((now - 1, 4))  # a second ago, four were outstanding together
        busy = batcher._classify_fill_wait()
        batcher._classify_queue.clear()  # the last pieces of one long request, with four requests outstanding lately:
        batcher._classify_queue.extend([piece(now, last=False), piece(now, last=False), piece(now)])
        batcher._classify_peaks.append((now, 1))
        long_alone = batcher._classify_fill_wait()  # only three more requests can share them, not its own pieces
        batcher._classify_queue.clear()
        batcher._classify_peaks.append((now, MAX_CLASSIFY_WINDOWS_PER_CALL))
        batcher._classify_queue.extend(piece(now) for _ in range(MAX_CLASSIFY_WINDOWS_PER_CALL))
        full = batcher._classify_fill_wait()
        batcher._classify_queue.clear()
        batcher._classify_queue.append(piece(now - budget - 0.01))  # queued longer than the wait
        late = batcher._classify_fill_wait()
        batcher._classify_peaks.clear()
        batcher._classify_peaks.append((now, 1))
        batcher._classify_queue.clear()
        batcher._classify_queue.extend([piece(now, last=False), piece(now)])
        own_pieces = batcher._classify_fill_wait()  # one long request alone: its last piece waits for nobody
        return quiet, one_at_a_time, busy, long_alone, full, late, own_pieces

    quiet, one_at_a_time, busy, long_alone, full, late, own_pieces = asyncio.run(scenario())
    assert quiet == 0 and one_at_a_time == 0 and full == 0 and late == 0 and own_pieces == 0
    assert 0 < busy <= budget and 0 < long_alone <= budget

    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def classify_many(self, signals, scale_weights=False):
            calls.append(len(signals))
            return self.inner.classify_many(signals, scale_weights)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    async def steady():
        batcher = Batcher(Counting(model), Metrics(), batch_wait_ms=20)
        now = time.monotonic()
        for k in range(119, -1, -1):  # as if 60 requests/s had been arriving for two seconds, four at a time
            batcher.classify_arrived.add(now - k / 60, 1)
            batcher._classify_peaks.append((now - k / 60, 4))
        batcher.start()
        try:
            tasks = []
            for i in range(12):
                tasks.append(asyncio.create_task(batcher.classify(records[i % len(records)])))
                await asyncio.sleep(1 / 60)
            return await asyncio.gather(*tasks)
        finally:
            await batcher.stop()

    answers = asyncio.run(steady())
    assert sum(calls) == 12 and max(calls) > 1  # gathered
    for i, got in enumerate(answers):
        np.testing.assert_allclose(got["probabilities"], model.classify(records[i % len(records)])["probabilities"],
                                   atol=TOL)


def test_a_wait_for_a_fuller_call_ends_the_moment_the_call_is_full(model, records):
    """Batcher level: under load the batcher waits for the rows (streams) or requests (/classify) that a fuller call
    shares; once they are there it goes on at once rather than sleeping out the wait it had estimated (a fixed sleep
    left the core idle while streams waited). Here the arrival rate seen so far predicts seconds of wait, and the
    missing streams or requests come within milliseconds."""
    from types import SimpleNamespace

    from server.batcher import Batcher
    from server.metrics import Metrics

    class Ready:  # what the batcher reads of a stream's session while it waits
        in_flight = gone = False
        stream = SimpleNamespace(hop=25)

    async def streams():
        batcher = Batcher(model, Metrics(), batch_wait_ms=3000)  # not started: the wait is driven by hand
        sessions = [Ready() for _ in range(2 * model.rows_per_call(25))]
        batcher.sessions = set(sessions)
        now = time.monotonic()
        batcher.became_ready.add(now - 1.9, 1)  # two streams became ready over the last two seconds: a slow rate
        batcher.notify(sessions[0])
        loop = asyncio.get_running_loop()
        for i, s in enumerate(sessions[1:model.rows_per_call(25)]):
            loop.call_later(0.001 * i, batcher.notify, s)
        started = time.monotonic()
        await batcher._let_batch_fill()
        return time.monotonic() - started, len(batcher._ready)

    waited, ready = asyncio.run(streams())
    assert ready == model.rows_per_call(25) and waited < 1.0  # the estimate was min(3 s, 19 missing / 1 per s)

    async def requests():
        batcher = Batcher(model, Metrics(), batch_wait_ms=2000)  # up to CLASSIFY_WAIT_FACTOR x 2 s
        now = time.monotonic()
        batcher.classify_arrived.add(now - 1.5, 1)  # one request over the last two seconds: a slow rate
        batcher._classify_peaks.append((now - 1, 4))  # a second ago, four were outstanding together
        batcher.start()
        try:
            started = time.monotonic()
            tasks = []
            for i in range(4):
                tasks.append(asyncio.create_task(batcher.classify(records[i % len(records)])))
                await asyncio.sleep(0.01)
            answers = await asyncio.gather(*tasks)
            return time.monotonic() - started, answers
        finally:
            await batcher.stop()

    waited, answers = asyncio.run(requests())
    assert waited < 2.0  # the estimate: 3 missing requests / 1 per s
    for i, got in enumerate(answers):
        np.testing.assert_allclose(got["probabilities"], model.classify(records[i % len(records)])["probabilities"],
                                   atol=TOL)


def drain(outbox: asyncio.Queue) -> list:
    items = []
    while not outbox.empty():
        items.append(outbox.get_nowait())
    return items


@pytest.mark.parametrize("on_loop", [False, True], ids=["inference-thread", "on-loop"])
def test_a_flush_in_a_failing_batch_is_released_and_the_batcher_goes_on(model, records, on_loop):
    """Batcher level: when the call a flushing stream is in fails, the flush ends (StreamGone) and the stream's last
    message is a 1011 close, instead of waiting for ever or being retried in a loop; other streams go on. The same
    whether streams' calls run on the inference thread or on the event loop's (`streams_on_loop`)."""
    from msssm_serve.runtime import Stream
    from server.batcher import Batcher
    from server.metrics import Metrics
    from server.session import Close, StreamGone

    class FailingOnce:
        """The model, except that the first stream call fails (as a GPU out-of-memory would)."""
        def __init__(self, inner):
            self.inner, self.failed = inner, False

        def advance_pooled(self, segments, pool, slots, scale_weights=False):
            if not self.failed:
                self.failed = True
                raise RuntimeError("simulated inference failure")
            return self.inner.advance_pooled(segments, pool, slots, scale_weights)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    async def scenario():
        batcher = Batcher(FailingOnce(model), Metrics(), batch_wait_ms=0, streams_on_loop=on_loop)
        assert batcher.streams_on_loop == on_loop
        batcher.start()
        try:
            doomed = batcher.open(Stream(model, hop=25), asyncio.Queue())
            await doomed.feed(records[0][:60], stall_timeout_s=10)
            with pytest.raises(StreamGone):
                await asyncio.wait_for(doomed.flush(stall_timeout_s=5), 10)
            last = drain(doomed.outbox)[-1]
            assert isinstance(last, Close) and last.code == 1011
            batcher.close(doomed)  # what its connection does once the close is sent
            survivor = batcher.open(Stream(model, hop=25), asyncio.Queue())
            await survivor.feed(records[1][:50], stall_timeout_s=10)
            await asyncio.wait_for(survivor.flush(stall_timeout_s=5), 10)
            batcher.close(survivor)
            return drain(survivor.outbox), batcher
        finally:
            await batcher.stop()

    messages, batcher = asyncio.run(scenario())
    assert [m["t"] for m in messages] == [25, 50]
    assert not batcher.sessions and not batcher._ready


@pytest.mark.parametrize("on_loop", [False, True], ids=["inference-thread", "on-loop"])
@pytest.mark.parametrize("first,second,hop", [(1, 4000, 25), (1, 3999, 25), (300, 3701, 1000), (7, 9000, 1)])
def test_a_frame_larger_than_the_free_buffer_is_consumed_in_pieces(model, records, first, second, hop, on_loop):
    """Regression (issue 19, finding 1): a short frame, then one larger than the buffer space it leaves, then a
    flush used to wait for ever on room that no event could make. The frame is now fed in pieces; every prediction
    comes, equal to the window reference, whether streams' calls run on the inference thread or on the event loop's
    (one call's rows per turn: `streams_on_loop`)."""
    from msssm_serve.runtime import Stream
    from server.batcher import Batcher
    from server.metrics import Metrics

    signal_ = np.concatenate([records[i % len(records)] for i in range(10)])[: first + second]

    async def scenario():
        batcher = Batcher(model, Metrics(), batch_wait_ms=0, streams_on_loop=on_loop)
        batcher.start()
        session = batcher.open(Stream(model, hop=hop), asyncio.Queue(maxsize=0))
        received = []

        async def reader():  # a client reading as it goes
            while True:
                received.append(await session.outbox.get())
                session.message_sent()

        task = asyncio.create_task(reader())
        try:
            await asyncio.wait_for(session.feed(signal_[:first], stall_timeout_s=5), 10)
            await asyncio.wait_for(session.feed(signal_[first:], stall_timeout_s=5), 10)
            await asyncio.wait_for(session.flush(stall_timeout_s=5), 10)
            await asyncio.sleep(0.05)
            return received
        finally:
            task.cancel()
            batcher.close(session)
            await batcher.stop()

    messages = asyncio.run(scenario())
    reference = window_reference(model, signal_)
    w = model.window
    expected_t = [(k, t) for k in range(len(reference)) for t in range(hop, min(w, len(signal_) - k * w) + 1, hop)]
    if len(signal_) % w % hop:
        expected_t.append((len(signal_) // w, len(signal_) % w))
    assert [(m["window"], m["t"]) for m in messages] == expected_t
    for m in messages[:: max(1, len(messages) // 40)]:
        np.testing.assert_allclose(m["probabilities"], reference[m["window"]][m["t"] - 1], atol=TOL)


def test_a_client_that_never_reads_is_closed_and_holds_bounded_memory(model, records):
    """Batcher level: predictions pile up to MAX_OUTBOX at most, then the stream stops being advanced, its buffer
    fills, and feeding gives up (Stalled) after the stall timeout: the connection then closes with 1008."""
    from msssm_serve.runtime import Stream
    from server.batcher import Batcher
    from server.metrics import Metrics
    from server.session import MAX_OUTBOX, Stalled

    async def scenario():
        batcher = Batcher(model, Metrics(), batch_wait_ms=0)
        batcher.start()
        session = batcher.open(Stream(model, hop=1), asyncio.Queue())
        try:
            started = time.monotonic()
            with pytest.raises(Stalled):
                for _ in range(100):
                    await session.feed(records[0], stall_timeout_s=0.5)
            return session.outbox.qsize(), session.stream.pending, time.monotonic() - started
        finally:
            batcher.close(session)
            await batcher.stop()

    queued, pending, took = asyncio.run(scenario())
    assert queued <= MAX_OUTBOX + 4  # one batch's hops may land on a full outbox
    assert pending <= 4 * model.window
    assert took < 10


def test_the_hub_sweep_ends_a_connection_idle_or_stuck_past_the_idle_timeout():
    """Connection level: no timer per frame or per send; the hub's sweep (`enforce_deadlines`) ends a receive loop
    that has waited for a frame longer than the idle timeout (it returns the idle close) and a sender whose write the
    client has not taken for as long (a client that stopped reading), and leaves a connection within both alone."""
    from types import SimpleNamespace

    from server.settings import Settings
    from server.streaming import NORMAL, Connection

    class SilentStuckSocket:
        """A client that sends nothing and reads nothing: every receive and every send waits for ever."""
        async def receive(self):
            await asyncio.Event().wait()

        async def send_text(self, text):
            await asyncio.Event().wait()

    async def scenario():
        hub = SimpleNamespace(settings=Settings(idle_timeout_s=0.3))
        conn = Connection(hub, SilentStuckSocket())
        conn.send({"type": "config"})  # a message its client will never take
        run = asyncio.create_task(conn.run())
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.1)
        conn.enforce_deadlines(loop.time())  # within both deadlines: nothing happens
        await asyncio.sleep(0)
        assert not run.done() and not conn._sender.done()
        give_up = loop.time() + 5
        while not run.done() and loop.time() < give_up:
            await asyncio.sleep(0.05)
            conn.enforce_deadlines(loop.time())
        await asyncio.wait_for(run, 1)
        return conn

    started = time.monotonic()
    conn = asyncio.run(scenario())
    assert conn._sender.cancelled()  # the stuck send was given up
    assert conn._went_idle and time.monotonic() - started < 2
    closes = []
    while not conn.outbox.empty():
        closes.append(conn.outbox.get_nowait())
    assert closes and closes[-1].code == NORMAL and "idle" in closes[-1].detail


def test_classify_reorders_leads_and_resamples(server, model, records):
    x = records[0]
    shuffled = [LEADS[i] for i in np.random.default_rng(0).permutation(12)]
    columns = [LEADS.index(name) for name in shuffled]
    by_name = post_json(server.url, x[:, columns], leads=[n.lower() for n in shuffled]).json()
    np.testing.assert_allclose(by_name["probabilities"], model.classify(x)["probabilities"], atol=TOL)

    at_250 = resample_poly(x, 5, 2, axis=0).astype(np.float32)
    body = post_binary(server.url, at_250, {"sample_rate": 250, "leads": ",".join(LEADS)}).json()
    back = resample_poly(at_250, 2, 5, axis=0).astype(np.float32)  # one window: the streaming resampler's result
    assert body["samples"] == len(back) == 1000
    np.testing.assert_allclose(body["probabilities"], model.classify(back)["probabilities"], atol=TOL)


BAD_CLASSIFY = {
    "wrong channel count": (dict(json={"signal": [[0.0] * 11] * 50}), 422),
    "unknown lead": (dict(json={"signal": [[0.0] * 12] * 50, "leads": LEADS[:11] + ["V7"]}), 422),
    "missing lead": (dict(json={"signal": [[0.0] * 12] * 50, "leads": LEADS[:11] + ["I"]}), 422),
    # NaN is no JSON number (RFC 8259): a malformed body, refused with a hint whichever JSON parser is installed
    "NaN": (dict(content='{"signal": [[NaN' + ', 0' * 11 + ']]}', headers={"Content-Type": "application/json"}), 400),
    "Infinity": (dict(json={"signal": [[1e39] * 12]}), 422),
    "strings": (dict(json={"signal": [["0.1"] * 12] * 5}), 422),
    "empty signal": (dict(json={"signal": []}), 422),
    "ragged rows": (dict(json={"signal": [[0.0] * 12, [0.0] * 11]}), 422),
    "no signal field": (dict(json={"samples": [[0.0] * 12]}), 422),
    "malformed JSON": (dict(content=b'{"signal": [[1,', headers={"Content-Type": "application/json"}), 400),
    "wrong content type": (dict(content=b"1,2,3", headers={"Content-Type": "text/csv"}), 415),
    "binary not whole samples": (dict(content=b"\0" * 100, params={"channels": 12},
                                      headers={"Content-Type": "application/octet-stream"}), 400),
    "binary without channels": (dict(content=b"\0" * 48, headers={"Content-Type": "application/octet-stream"}), 422),
    "binary NaN": (dict(content=np.full(12, np.nan, "<f4").tobytes(), params={"channels": 12},
                        headers={"Content-Type": "application/octet-stream"}), 422),
    "sample rate too low": (dict(json={"signal": [[0.0] * 12] * 50, "sample_rate": 10}), 422),
    "sample rate not a number": (dict(json={"signal": [[0.0] * 12] * 50, "sample_rate": "fast"}), 422),
    # taken exactly, these would hold the event loop for hours (a billion-digit integer) / build a huge int
    "sample rate huge exponent": (dict(content=b"\0" * 48, params={"channels": 12, "sample_rate": "1e999999999"},
                                       headers={"Content-Type": "application/octet-stream"}), 422),
    "sample rate huge integer": (dict(json={"signal": [[0.0] * 12] * 50, "sample_rate": "9" * 4000}), 422),
    "too long": (dict(json={"signal": [[0.0] * 12] * 400000}), 413),
}


@pytest.mark.parametrize("case", list(BAD_CLASSIFY))
def test_classify_rejects_bad_input(server, case):
    kwargs, status = BAD_CLASSIFY[case]
    response = httpx.post(server.url + "/classify", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    assert isinstance(response.json()["detail"], str) and response.json()["detail"]
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_an_odd_sample_rate_resamples_with_a_small_filter():
    """1999.999 Hz taken exactly is 100/1999.999 = 100000/1999999: a 40 M-tap polyphase filter. It must not be."""
    from msssm_serve.resample import WindowResampler
    from server.signals import parse_sample_rate

    resampler = WindowResampler(parse_sample_rate("1999.999", 100), 100, 1000, 12)
    assert (resampler.up, resampler.down) == (1, 20) and resampler.phases.size < 1000
    assert len(resampler.push(np.zeros((20000, 12), np.float32))) == 1000


# --- /stream -----------------------------------------------------------------------------------------------------
def test_stream_equals_classify_whatever_the_frames(server, model, signal_3w):
    frames = list(np.random.default_rng(1).integers(1, 700, size=40))
    predictions = asyncio.run(run_stream(server.ws_url, signal_3w, frames, hop=50))
    reference = window_reference(model, signal_3w)
    finals = [p for p in predictions if p["final"]]
    assert [p["window"] for p in finals] == [0, 1, 2]
    for p in finals:
        start = 1000 * p["window"]
        whole = post_binary(server.url, signal_3w[start : start + 1000]).json()
        np.testing.assert_allclose(p["probabilities"], whole["probabilities"], atol=TOL)
    for p in predictions:
        assert p["type"] == "prediction"
        np.testing.assert_allclose(p["probabilities"], reference[p["window"]][p["t"] - 1], atol=TOL)
    assert [p["t"] for p in predictions if p["window"] == 0] == list(range(50, 1001, 50))
    flushed = predictions[-1]
    assert (flushed["window"], flushed["t"], flushed["final"]) == (3, 310, False)
    # ...and the checks against /classify of prefixes itself, at a few points
    for p in (predictions[0], predictions[27], flushed):
        start = 1000 * p["window"]
        prefix = post_json(server.url, signal_3w[start : start + p["t"]]).json()
        np.testing.assert_allclose(p["probabilities"], prefix["probabilities"], atol=TOL)


def test_stream_text_frames_default_config(server, model, records):
    predictions = asyncio.run(run_stream(server.ws_url, records[0][:130], [7, 60, 1], binary=False))
    reference = window_reference(model, records[0][:130])
    assert [(p["t"], p["final"]) for p in predictions] == [(25, False), (50, False), (75, False), (100, False),
                                                         (125, False), (130, False)]
    for p in predictions:
        np.testing.assert_allclose(p["probabilities"], reference[0][p["t"] - 1], atol=TOL)


def check_concurrent_streams(server, model, records, streams: int) -> None:
    """`streams` streams at once, each a different stretch of the records in its own frame sizes: every prediction
    equals the window reference, and the streams shared calls."""
    long_signal = np.concatenate(list(records))
    rng = np.random.default_rng(2)
    plans = [(int(rng.integers(0, 2000)), int(rng.integers(100, 1400)), list(rng.integers(1, 300, size=8)))
             for _ in range(streams)]

    async def all_streams():
        return await asyncio.gather(*(run_stream(server.ws_url, long_signal[o : o + n], frames)
                                      for o, n, frames in plans))

    results = asyncio.run(all_streams())
    for (offset, n, _), predictions in zip(plans, results):
        reference = window_reference(model, long_signal[offset : offset + n])
        assert predictions, "every stream predicts"
        for p in predictions:
            np.testing.assert_allclose(p["probabilities"], reference[p["window"]][p["t"] - 1], atol=TOL)
    batch_sum = metric_value(server.url, "msssm_batch_size_sum")
    batch_count = metric_value(server.url, "msssm_batch_size_count")
    assert batch_sum / batch_count > 1, "streams share inference calls"


def test_fifty_concurrent_streams_are_batched_without_mixing_states(server, model, records):
    """The test server's graph runs on one thread (MSSSM_THREADS=1): its streams' calls run on the event loop's."""
    assert metric_value(server.url, "msssm_streams_on_loop") == 1
    check_concurrent_streams(server, model, records, 50)


def test_a_worker_with_a_multi_thread_graph_computes_streams_on_its_inference_thread_and_they_equal_the_window(
        model_dir, model, records):
    """`python -m server` with two onnxruntime threads per worker hands its streams' calls to the inference thread
    (`streams_on_loop_for`; /metrics says so), and concurrent streams over real sockets get exactly the window
    reference there too, batched together."""
    proc = ServerProcess(model_dir, {"MSSSM_MAX_STREAMS": "60", "MSSSM_THREADS": "2"})
    try:
        assert metric_value(proc.url, "msssm_streams_on_loop") == 0
        check_concurrent_streams(proc, model, records, 30)
    finally:
        proc.stop()


def active_streams(url, headers=None) -> int:
    return httpx.get(url + "/model", headers=headers).json()["active_streams"]


def wait_until_no_streams(url, headers=None) -> int:
    deadline = time.monotonic() + 5
    while (n := active_streams(url, headers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def test_disconnect_mid_stream_frees_the_stream(server, records):
    async def vanish_midway():
        async with connect(server.ws_url) as ws:
            await ws.send(records[0][:510].astype("<f4").tobytes())
            await ws.recv()
            assert active_streams(server.url) == 1
            ws.transport.abort()  # the client vanishes: no close handshake
    asyncio.run(vanish_midway())
    assert wait_until_no_streams(server.url) == 0
    assert "msssm_active_streams 0.0" in httpx.get(server.url + "/metrics").text


BAD_STREAM = {
    "NaN samples": ([json.dumps({"samples": [[float("nan")] * 12]})], 1007),
    "wrong channels": ([json.dumps({"samples": [[0.0] * 11]})], 1007),
    "binary not whole samples": ([b"\0" * 50], 1007),
    "binary NaN": ([np.full(12, np.nan, "<f4").tobytes()], 1007),
    "bad JSON text": (["{samples: nope"], 1007),
    "strings": ([json.dumps({"samples": [["1"] * 12]})], 1007),
    "unknown message type": ([json.dumps({"type": "dance"})], 1003),
    "late config": ([json.dumps({"samples": [[0.0] * 12]}), json.dumps({"type": "config", "hop": 5})], 1003),
    "sample rate out of range": ([json.dumps({"sample_rate": 2500})], 1007),
    "sample rate not a number": ([json.dumps({"sample_rate": "fast"})], 1007),
    "unknown lead": ([json.dumps({"leads": LEADS[:11] + ["X"]})], 1007),
    "bad hop": ([json.dumps({"hop": 0})], 1007),
    "frame too big": ([b"\0" * (48 * 30000)], 1009),
}


@pytest.mark.parametrize("case", list(BAD_STREAM))
def test_stream_rejects_bad_input(server, case):
    messages, code = BAD_STREAM[case]
    received, close_code = asyncio.run(closing(server.ws_url, messages))
    assert close_code == code
    assert received[-1]["type"] == "error" and received[-1]["detail"]
    assert httpx.get(server.url + "/healthz").status_code == 200


# --- the other routes --------------------------------------------------------------------------------------------
def test_model_health_ready_metrics_monitor(server, model):
    info = httpx.get(server.url + "/model").json()
    assert info["labels"] == model.labels and info["window"] == 1000 and info["sample_rate"] == 100
    assert info["state_bytes"] == model.state_bytes and info["default_hop"] == 25 and info["version"]
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("msssm_requests_total", "msssm_request_seconds_bucket", "msssm_active_streams",
                 "msssm_batch_size_bucket", "msssm_inference_seconds_bucket", "msssm_samples_processed_total"):
        assert name in metrics
    assert 'route="/classify"' in metrics
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "msssm-serve" in page.text


# --- limits and auth (a second server: API key, 2 streams, small frames and bodies, 1 s idle) -------------------
def test_api_key_required_except_probes(strict_server, records):
    url = strict_server.url
    for route in ("/model", "/metrics"):
        assert httpx.get(url + route).status_code == 401
        assert httpx.get(url + route, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + route, headers=KEY).status_code == 200
    assert post_json(url, records[0][:100]).status_code == 401
    assert post_json(url, records[0][:100], headers=KEY).status_code == 200
    assert httpx.get(url + "/healthz").status_code == 200 and httpx.get(url + "/readyz").status_code == 200
    # the monitor page and its files hold no data: open, and the page asks for the key itself
    assert httpx.get(url + "/").status_code == 200 and httpx.get(url + "/static/monitor.js").status_code == 200
    assert httpx.get(url + "/static/records/index.json").status_code == 200

    ws = strict_server.ws_url
    assert asyncio.run(closing(ws, []))[1] == 1008
    assert asyncio.run(closing(ws + "?api_key=wrong", []))[1] == 1008
    for url_, headers in ((ws + "?api_key=s3cret", None), (ws, KEY)):  # the key in the query, then in a header
        predictions = asyncio.run(run_stream(url_, records[0][:50], [50], flush=False, headers=headers))
        assert [(p["type"], p["t"]) for p in predictions] == [("prediction", 25), ("prediction", 50)]


def test_limits(strict_server, records):
    url, ws = strict_server.url, strict_server.ws_url
    big = np.concatenate(list(records))[:2100]  # 100 800 bytes
    # body over 100 000 bytes: declared, and streamed without a declared length
    assert post_binary(url, big, headers=KEY).status_code == 413
    chunks = (big.astype("<f4").tobytes()[i : i + 10000] for i in range(0, 100800, 10000))
    response = httpx.post(url + "/classify?channels=12", content=chunks, timeout=30,
                          headers={**KEY, "Content-Type": "application/octet-stream"})
    assert response.status_code == 413
    # longer than 30 s once resampled... or before: 2000 samples at 50 Hz = 40 s
    assert post_binary(url, big[:2000], {"sample_rate": 50}, headers=KEY).status_code == 413
    # frame over 4800 bytes
    assert asyncio.run(closing(ws, [b"\0" * 4848], headers=KEY))[1] == 1009

    async def crowd():
        async with connect(ws, additional_headers=KEY), connect(ws, additional_headers=KEY):
            await asyncio.sleep(0.2)
            received, code = await closing(ws, [], headers=KEY)
            assert code == 1013 and "full" in received[-1]["detail"]
    asyncio.run(crowd())
    assert wait_until_no_streams(url, KEY) == 0

    started = time.monotonic()
    received, code = asyncio.run(closing(ws, [records[0][:10].astype("<f4").tobytes()], headers=KEY))
    assert code == 1000 and "idle" in received[-1]["detail"]
    assert 0.9 < time.monotonic() - started < 5
    assert wait_until_no_streams(url, KEY) == 0


def test_sigterm_closes_streams_with_1001(model_dir, records):
    proc = ServerProcess(model_dir, {})
    try:
        async def interrupted():
            async with connect(proc.ws_url) as ws:
                await ws.send(records[0][:100].astype("<f4").tobytes())
                for _ in range(4):
                    await ws.recv()
                proc.process.send_signal(signal.SIGTERM)
                received = [json.loads(m) async for m in ws]
                return received, ws.close_code
        received, code = asyncio.run(interrupted())
        assert code == 1001 and received[-1] == {"type": "error", "detail": "server shutting down"}
        # draining: a final snapshot first, so that the client can resume on another replica and lose nothing
        assert received[-2]["type"] == "snapshot" and received[-2]["window"] * 1000 + received[-2]["t"] + \
            received[-2]["pending"] == 100
        # uvicorn re-raises the signal it handled once it has shut down cleanly
        assert proc.process.wait(timeout=15) in (0, -signal.SIGTERM)
    finally:
        proc.stop()


def test_a_draining_server_is_not_ready_and_takes_no_new_stream(model_dir):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    with TestClient(create_app(Settings(model_dir=model_dir))) as client:
        assert client.get("/readyz").status_code == 200
        client.app.state.hub.draining = True
        assert client.get("/readyz").json() == {"status": "draining"}
        with client.websocket_connect("/stream") as ws:
            assert "draining" in ws.receive_json()["detail"]


def test_a_running_app_keeps_its_startup_objects_out_of_collections_and_reports_pauses(model_dir):
    """What was made while starting is frozen (no full collection scans it again), collector pauses are in /metrics
    by generation, and shutting down unfreezes and unhooks (tests start many apps in one process)."""
    import gc

    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    hooks = len(gc.callbacks)
    with TestClient(create_app(Settings(model_dir=model_dir))) as client:
        assert gc.get_freeze_count() > 10_000
        gc.collect()
        text = client.get("/metrics").text
        counted = re.search(r'msssm_gc_pause_seconds_count\{generation="2"\} (\S+)', text)
        assert counted and float(counted.group(1)) >= 1  # the collection above, and any the app made itself
    assert gc.get_freeze_count() == 0 and len(gc.callbacks) == hooks


def test_serving_path_never_imports_torch():
    import subprocess
    import sys

    code = "import sys, server.__main__, server.app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("parser", ["orjson", "json"])
def test_json_is_strict_whichever_parser(monkeypatch, parser):
    import orjson

    from server import signals

    monkeypatch.setattr(signals, "_loads", orjson.loads if parser == "orjson" else signals.strict_json_loads)
    assert signals.parse_json(b'{"signal": [[0.5, -1e3]]}', "body") == {"signal": [[0.5, -1e3]]}
    for bad in (b'{"signal": [[NaN]]}', '{"signal": [[-Infinity]]}'):
        with pytest.raises(signals.InvalidJSON, match="body is not valid JSON.*NaN and Infinity are not JSON numbers"):
            signals.parse_json(bad, "body")
    with pytest.raises(signals.InvalidJSON, match=r"^frame is not valid JSON \((?!.*NaN)"):
        signals.parse_json(b'{"signal": [[1,', "frame")


def test_a_model_failure_in_classify_is_a_json_503_and_the_server_goes_on(model_dir, records):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings.from_env({"MSSSM_MODEL_DIR": str(model_dir)}))
    with TestClient(app) as client:
        healthy = app.state.batcher.classify

        async def failing(signal_):
            raise RuntimeError("simulated inference failure")

        app.state.batcher.classify = failing
        response = client.post("/classify", json={"signal": records[0].tolist()})
        assert response.status_code == 503 and "inference failed" in response.json()["detail"]
        app.state.batcher.classify = healthy
        assert client.post("/classify", json={"signal": records[0].tolist()}).status_code == 200
