"""python -m server [--model DIR] [--host 127.0.0.1] [--port 8000] [--workers N] [...]

Flags are written into the MSSSM_* environment variables, which is how each uvicorn worker process (multi-process
mode builds the app from `server.app:create_app` in every worker) gets the same settings.
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from msssm_serve.runtime import DEFAULT_MODEL_DIR

# flag -> environment variable; flags left out keep the environment's (or the default) value
ENV_FLAGS = {
    "model": "MSSSM_MODEL_DIR",
    "max_streams": "MSSSM_MAX_STREAMS",
    "idle_timeout_s": "MSSSM_IDLE_TIMEOUT_S",
    "max_body_bytes": "MSSSM_MAX_BODY_BYTES",
    "max_frame_bytes": "MSSSM_MAX_FRAME_BYTES",
    "max_signal_seconds": "MSSSM_MAX_SIGNAL_SECONDS",
    "batch_wait_ms": "MSSSM_BATCH_WAIT_MS",
    "cors_origins": "MSSSM_CORS_ORIGINS",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"model directory (default: $MSSSM_MODEL_DIR or {DEFAULT_MODEL_DIR})")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="processes, each with its own model")
    parser.add_argument("--max-streams", type=int)
    parser.add_argument("--idle-timeout-s", type=float)
    parser.add_argument("--max-body-bytes", type=int)
    parser.add_argument("--max-frame-bytes", type=int)
    parser.add_argument("--max-signal-seconds", type=float)
    parser.add_argument("--batch-wait-ms", type=float)
    parser.add_argument("--cors-origins", help="comma-separated; CORS is off when empty")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    for flag, var in ENV_FLAGS.items():
        if getattr(args, flag) is not None:
            os.environ[var] = str(getattr(args, flag))
    model_dir = os.environ.get("MSSSM_MODEL_DIR") or str(DEFAULT_MODEL_DIR)
    if not os.path.isfile(os.path.join(model_dir, "model.json")):
        print(f"error: {model_dir} is not a model directory (no model.json); export one with export/export.py",
              file=sys.stderr)
        return 2
    # Workers share the cores, and each worker's event loop needs CPU beside its inference thread: each
    # onnxruntime session gets its slice of what the event loops leave. On 2 cores, 1 worker with 1 thread held 325
    # streams, with 2 threads 275 (loadtest/results/streams_w1*.md).
    cores = os.cpu_count() or 1
    os.environ.setdefault("MSSSM_THREADS", str(max(1, (cores - args.workers) // args.workers)))
    frame_limit = int(os.environ.get("MSSSM_MAX_FRAME_BYTES", 1024 * 1024))
    uvicorn.run("server.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level,
                # Above our own limit, so an oversized frame reaches the app and gets an error message with its
                # 1009 instead of a bare close from the protocol layer.
                ws_max_size=2 * frame_limit + 64 * 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
