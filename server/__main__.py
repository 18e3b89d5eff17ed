"""python -m server: serve a model directory over HTTP and WebSocket (see the README's API section).

Flags are written into the MSSSM_* environment variables, which is how each uvicorn worker process (multi-process
mode builds the app from `server.app:create_app` in every worker) gets the same settings.
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from msssm_serve.runtime import DEFAULT_MODEL_DIR, ModelDirError, OnnxModel

from .registry import model_dirs
from .settings import Settings, streams_on_loop_for

# flag -> environment variable; flags left out keep the environment's (or the default) value
ENV_FLAGS = {
    "model": "MSSSM_MODEL_DIR",
    "models": "MSSSM_MODELS_DIR",
    "max_streams": "MSSSM_MAX_STREAMS",
    "idle_timeout_s": "MSSSM_IDLE_TIMEOUT_S",
    "max_body_bytes": "MSSSM_MAX_BODY_BYTES",
    "max_frame_bytes": "MSSSM_MAX_FRAME_BYTES",
    "max_signal_seconds": "MSSSM_MAX_SIGNAL_SECONDS",
    "batch_wait_ms": "MSSSM_BATCH_WAIT_MS",
    "cors_origins": "MSSSM_CORS_ORIGINS",
    "header_timeout_s": "MSSSM_HEADER_TIMEOUT_S",
    "body_timeout_s": "MSSSM_BODY_TIMEOUT_S",
    "admit_latency_ms": "MSSSM_ADMIT_LATENCY_MS",
}


class ShowDefaults(argparse.HelpFormatter):
    """Shows each flag's default; flags that fill an environment variable default to None (the environment's value
    or the setting's default then applies), and show the setting's default instead."""

    def _get_help_string(self, action):
        shown = getattr(action, "shown_default", action.default)
        if action.option_strings and shown not in (None, argparse.SUPPRESS) and action.dest != "help":
            return f"{action.help} (default: {shown})"
        return action.help


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="msssm-serve" if __package__ == "msssm_serve.server" else "python -m server", description=__doc__.splitlines()[0],
                                     formatter_class=ShowDefaults)

    def env_flag(*names, shown, **kw):  # a flag that fills an MSSSM_* variable: None unless given
        parser.add_argument(*names, **kw).shown_default = shown

    models = parser.add_mutually_exclusive_group()
    models.add_argument("--model", help="one model directory, served as 'default' ($MSSSM_MODEL_DIR) "
                        f"(default: {DEFAULT_MODEL_DIR})")
    models.add_argument("--models", help="a model repository: every subdirectory holding model.json is served under "
                        "its name; 'default' (else the first name) is the default ($MSSSM_MODELS_DIR)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address")
    parser.add_argument("--port", type=int, default=8000, help="port")
    parser.add_argument("--workers", type=int, default=1, help="processes, each with its own model and batcher")
    env_flag("--max-streams", type=int, shown=defaults.max_streams, help="open streams per worker")
    env_flag("--idle-timeout-s", type=float, shown=defaults.idle_timeout_s,
             help="a stream silent (or not reading) this long is closed")
    env_flag("--max-body-bytes", type=int, shown=defaults.max_body_bytes, help="/classify body (413)")
    env_flag("--max-frame-bytes", type=int, shown=defaults.max_frame_bytes, help="WebSocket frame (1009)")
    env_flag("--max-signal-seconds", type=float, shown=defaults.max_signal_seconds,
             help="longest /classify signal (413)")
    env_flag("--batch-wait-ms", type=float, shown=defaults.batch_wait_ms,
             help="under load, the longest a ready stream waits for a fuller batch, and 2.5 times this a /classify "
                  "request (a quiet server answers at once)")
    env_flag("--cors-origins", shown="", help="comma-separated allowed origins; empty: CORS off")
    env_flag("--header-timeout-s", type=float, shown=defaults.header_timeout_s,
             help="a request's headers must arrive within this")
    env_flag("--body-timeout-s", type=float, shown=defaults.body_timeout_s,
             help="a request's body must arrive within this (408)")
    env_flag("--admit-latency-ms", type=float, shown=defaults.admit_latency_ms,
             help="refuse new streams (1013) and /classify (503) while real-time streams' p95 server latency over "
                  "2 s exceeds this (0: admit all)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    for flag, var in ENV_FLAGS.items():  # a flag given wins over the environment, which wins over the default
        if getattr(args, flag) is not None:
            os.environ[var] = str(getattr(args, flag))
    if args.model is not None:  # one flag given wins over the other's environment variable
        os.environ.pop("MSSSM_MODELS_DIR", None)
    settings = Settings.from_env()
    try:  # checked here, so a bad model directory is one line and exit 2, not a worker's traceback
        for path in model_dirs(settings.model_dir, settings.models_dir).values():
            OnnxModel(path, threads=1)
    except ModelDirError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Workers share the cores, and each worker's event loop needs CPU beside its inference thread: each
    # onnxruntime session gets its slice of what the event loops leave. On 2 cores, 1 worker with 1 thread held 325
    # streams, with 2 threads 275 (loadtest/results/streams_w1*.md).
    cores = len(os.sched_getaffinity(0))  # the cores this server may use (taskset, a container's cpuset)
    os.environ.setdefault("MSSSM_THREADS", str(max(1, (cores - args.workers) // args.workers)))
    on_loop = streams_on_loop_for(int(os.environ["MSSSM_THREADS"]))
    os.environ.setdefault("MSSSM_STREAMS_ON_LOOP", "1" if on_loop else "0")
    frame_limit = int(os.environ.get("MSSSM_MAX_FRAME_BYTES", 1024 * 1024))
    # By this package's own name: `server` from a checkout, `msssm_serve.server` when installed (msssm-serve).
    uvicorn.run(f"{__package__}.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level, http=f"{__package__}.protocol:HeaderTimeoutProtocol",
                # Above our own limit, so an oversized frame reaches the app and gets an error message with its
                # 1009 instead of a bare close from the protocol layer.
                ws_max_size=2 * frame_limit + 64 * 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
