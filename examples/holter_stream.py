#!/usr/bin/env python
"""Stream like a 2-lead Holter recorder: MLII + V1 at 360 Hz (MIT-BIH's layout), in real time or faster.

    python examples/holter_stream.py [--url ws://127.0.0.1:8000/stream] [--model rhythm] [--speed 10]

The signal is a real PTB-XL record (tests/fixtures) taken to 360 Hz as such a device would record it; the server
resamples it back to the model's rate as it arrives. Needs `pip install websockets numpy scipy wfdb`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np
import websockets
import wfdb
from scipy.signal import resample_poly

RECORD = Path(__file__).resolve().parents[1] / "tests/fixtures/ptbxl/records100/00000/00010_lr"
RATE, LEADS, FRAME_S = 360, ["MLII", "V1"], 0.25


async def stream(url: str, model: str | None, speed: float) -> None:
    twelve, _ = wfdb.rdsamp(str(RECORD))  # [1000, 12] at 100 Hz, mV; leads I, II, III, aVR, ..., V1 (column 6)
    device = resample_poly(twelve[:, [1, 6]], RATE, 100, axis=0).astype("<f4")  # [3600, 2] at 360 Hz
    config = {"sample_rate": RATE, "leads": LEADS, "hop": 100, **({"model": model} if model else {})}
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps(config))
        reply = json.loads(await ws.recv())
        if reply["type"] == "error":
            raise SystemExit(f"server: {reply['detail']}")
        labels = reply["labels"]
        print(f"model {reply['model']}: window {reply['window']} samples at {reply['sample_rate']} Hz "
              f"= {reply['models'][0]['device_window']} of ours; missing leads {reply['models'][0]['missing_leads']}")
        frame = int(RATE * FRAME_S)

        async def send():
            for start in range(0, len(device), frame):
                await ws.send(device[start : start + frame].tobytes())  # float32, time-major, T x 2
                await asyncio.sleep(FRAME_S / speed)

        sender = asyncio.create_task(send())
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] == "error":
                raise SystemExit(f"server: {msg['detail']}")
            top = max(zip(msg["probabilities"], labels))
            print(f"window {msg['window']} t={msg['t']:4d} {'final' if msg['final'] else '     '} "
                  f"most probable {top[1]} ({top[0]:.2f})")
            if msg["final"]:
                break
        await sender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:8000/stream", help="the server's /stream")
    parser.add_argument("--model", default=None, help="which model (GET /models); default: the server's default")
    parser.add_argument("--speed", type=float, default=1.0, help="times real time")
    args = parser.parse_args()
    asyncio.run(stream(args.url, args.model, args.speed))


if __name__ == "__main__":
    main()
