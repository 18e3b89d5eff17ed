#!/usr/bin/env python
"""Snapshot and resume, measured against a real server on loopback: token size, snapshot round trip, time from a
new connection to a resumed stream's config reply, and what a client re-sends.

    python benchmarks/snapshot.py [--model models/default] [--repeats 20]

Results: benchmarks/results/snapshot.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect

from msssm_serve.runtime import DEFAULT_MODEL_DIR, OnnxModel
from msssm_serve.server.launcher import LocalServer


async def measure(url: str, model: OnnxModel, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    signal_ = (0.1 * rng.standard_normal((1500, model.n_channels))).astype("<f4")  # 1.5 windows
    snap_s, resume_s, sizes = [], [], []
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"hop": 25}))
        await ws.recv()
        await ws.send(signal_.tobytes())
        for _ in range(60):  # the predictions of those samples
            await ws.recv()
        for _ in range(repeats):
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "snapshot"}))
            message = json.loads(await ws.recv())
            snap_s.append(time.perf_counter() - t0)
            sizes.append(len(message["token"]))
        token = message["token"]
    for _ in range(repeats):
        t0 = time.perf_counter()
        async with connect(url, max_size=None) as ws:
            await ws.send(json.dumps({"resume": token}))
            reply = json.loads(await ws.recv())
            resume_s.append(time.perf_counter() - t0)
            assert reply["type"] == "config", reply
    return {"token_chars": int(np.median(sizes)), "state_bytes": model.state_bytes, "position": message["t"],
            "snapshot_ms_p50": 1e3 * float(np.median(snap_s)), "resume_ms_p50": 1e3 * float(np.median(resume_s))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="model directory")
    parser.add_argument("--repeats", type=int, default=20, help="snapshots and resumes timed")
    args = parser.parse_args()
    model = OnnxModel(args.model, threads=1)
    with tempfile.TemporaryDirectory() as tmp, LocalServer(args.model, Path(tmp) / "server.log",
                                                             env={"MSSSM_STATE_SECRET": "bench"}) as server:
        r = asyncio.run(measure(server.ws_url, model, args.repeats))
    print(f"model {model.name}: state {r['state_bytes']} bytes per stream")
    print(f"token {r['token_chars']} characters (state, pending samples and config, zlib + base64url + HMAC), "
          f"taken mid-window at t = {r['position']}")
    print(f"snapshot round trip p50 {r['snapshot_ms_p50']:.2f} ms; new connection to resumed config reply p50 "
          f"{r['resume_ms_p50']:.2f} ms ({args.repeats} each, loopback)")
    print("re-sent after a resume: every sample sent after the snapshot request (the client keeps them)")


if __name__ == "__main__":
    main()
