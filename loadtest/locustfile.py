"""Locust users for msssm-serve.

    locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 30s --host http://127.0.0.1:8000 [ClassifyUser|StreamUser]

ClassifyUser: POST /classify with a real 10 s 12-lead PTB-XL window (JSON body per the contract), back to back.
StreamUser:   one WebSocket stream per user (websocket-client, gevent-friendly under locust's monkey patching) sending
              binary float32 frames of MSSSM_FRAME_SAMPLES samples (default 25 = one hop) paced at the real 100 Hz,
              firing a locust request event (type "WS", name "hop update") per hop with the time from sending the frame
              that completes the hop to receiving that hop's prediction; errors and closes are failure events.

Records are read once at import from tests/fixtures/ptbxl/records100 with wfdb.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import websocket  # websocket-client
import wfdb
from locust import HttpUser, User, constant, constant_pacing, events, task

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 100
FRAME_SAMPLES = int(os.environ.get("MSSSM_FRAME_SAMPLES", 25))
HOP = int(os.environ.get("MSSSM_HOP", 25))

_paths = sorted((REPO_ROOT / "tests/fixtures/ptbxl/records100").glob("*/*.hea"))
RECORDS = np.nan_to_num(np.stack([wfdb.rdsamp(str(p.with_suffix("")))[0][:1000] for p in _paths]).astype(np.float32))
SIGNAL = RECORDS.reshape(-1, RECORDS.shape[-1])  # all records tiled: [n*1000, 12]
BODIES = [json.dumps({"signal": r.tolist(), "sample_rate": SAMPLE_RATE}) for r in RECORDS]


class ClassifyUser(HttpUser):
    wait_time = constant(0)

    @task
    def classify(self) -> None:
        body = random.choice(BODIES)
        with self.client.post("/classify", data=body, headers={"Content-Type": "application/json"},
                              name="/classify", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            elif "probabilities" not in resp.json():
                resp.failure("no probabilities in response")


class StreamUser(User):
    """One paced real-time stream."""

    wait_time = constant_pacing(FRAME_SAMPLES / SAMPLE_RATE)

    def on_start(self) -> None:
        self.ws = None
        self.pos = random.randrange(len(SIGNAL))
        self.sent = 0
        self._connect()

    def _fire(self, name: str, start: float, ms: float, exc: Exception | None = None, length: int = 0) -> None:
        events.request.fire(request_type="WS", name=name, response_time=ms, response_length=length,
                            exception=exc, context={}, start_time=start, url="/stream")

    def _connect(self) -> None:
        url = self.host.replace("http://", "ws://").replace("https://", "wss://").rstrip("/") + "/stream"
        t0 = time.time()
        try:
            self.ws = websocket.create_connection(url, timeout=30, enable_multithread=False)
            self.ws.send(json.dumps({"hop": HOP}))
            cfg = json.loads(self.ws.recv())
            if cfg.get("type") != "config":
                raise RuntimeError(f"unexpected first message: {cfg}")
            self.window, self.hop = int(cfg["window"]), int(cfg["hop"])
            self.sent = 0
            self._fire("connect", t0, (time.time() - t0) * 1000)
        except Exception as e:
            self.ws = None
            self._fire("connect", t0, (time.time() - t0) * 1000, e)

    def on_stop(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:
                pass

    @task
    def send_frame(self) -> None:
        if self.ws is None:
            self._connect()
            if self.ws is None:
                return
        n, F = len(SIGNAL), FRAME_SAMPLES
        idx = (self.pos + np.arange(F)) % n
        frame = SIGNAL[idx]
        self.pos = (self.pos + F) % n
        before, after = self.sent, self.sent + F
        hops = after // self.hop - before // self.hop  # hop boundaries this frame completes
        self.sent = after
        t_wall, t0 = time.time(), time.perf_counter()
        try:
            self.ws.send(frame.tobytes(), opcode=websocket.ABNF.OPCODE_BINARY)
            got = 0
            while got < hops:
                msg = self.ws.recv()
                if not msg:
                    raise ConnectionError("connection closed by server")
                m = json.loads(msg)
                if m.get("type") == "prediction":
                    got += 1
                    self._fire("hop update", t_wall, (time.perf_counter() - t0) * 1000, length=len(msg))
                elif m.get("type") == "error":
                    raise RuntimeError(f"server error: {m.get('detail')}")
        except Exception as e:
            self._fire("hop update", t_wall, (time.perf_counter() - t0) * 1000, e)
            try:
                self.ws.close()
            except Exception:
                pass
            self.ws = None
