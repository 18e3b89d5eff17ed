"""Server settings: environment variables (MSSSM_*), which `python -m server` fills from its flags so that every
uvicorn worker process, each building its own app, sees the same values."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from msssm_serve.runtime import DEFAULT_MODEL_DIR


def streams_on_loop_for(intra_op_threads: int) -> bool:
    """Whether a worker runs its streams' graph calls on its event loop's thread (`Batcher`): when its graph runs on
    one thread (fewer than three cores per worker). A hand-off to an inference thread then pays a thread switch at
    every socket wake-up during a call, and measured ~8-15 % more CPU at the same load whether the worker had one core
    or shared two (docs/performance.md). A worker with several intra-op threads keeps its loop on a thread of its own
    (not measured on these 2-core machines)."""
    return intra_op_threads == 1


@dataclass(frozen=True)
class Settings:
    model_dir: Path = DEFAULT_MODEL_DIR
    models_dir: Path | None = None  # a repository of model directories (one subdirectory each); wins over model_dir
    api_key: str | None = None
    max_streams: int = 1000
    idle_timeout_s: float = 60.0
    max_body_bytes: int = 16 * 1024 * 1024
    max_frame_bytes: int = 1024 * 1024
    max_signal_seconds: float = 3600.0
    batch_wait_ms: float = 20.0
    cors_origins: tuple[str, ...] = ()
    header_timeout_s: float = 10.0  # a connection must send a request's headers within this (slowloris)
    body_timeout_s: float = 30.0  # and its body within this (408)
    # Admission: while the p95 server-side latency of real-time streams over the last 2 s exceeds this, new streams
    # get 1013 and /classify 503, both with a retry hint (0: admit everything).
    admit_latency_ms: float = 100.0
    # Streams' graph calls on the event loop's thread instead of the inference thread (server/batcher.py);
    # `python -m server` sets it from the worker's onnxruntime threads (`streams_on_loop_for`).
    streams_on_loop: bool = False

    @classmethod
    def from_env(cls, env: os._Environ | dict | None = None) -> "Settings":
        env = os.environ if env is None else env
        origins = env.get("MSSSM_CORS_ORIGINS", "")
        return cls(
            model_dir=Path(env.get("MSSSM_MODEL_DIR") or DEFAULT_MODEL_DIR),
            models_dir=Path(env["MSSSM_MODELS_DIR"]) if env.get("MSSSM_MODELS_DIR") else None,
            api_key=env.get("MSSSM_API_KEY") or None,
            max_streams=int(env.get("MSSSM_MAX_STREAMS", cls.max_streams)),
            idle_timeout_s=float(env.get("MSSSM_IDLE_TIMEOUT_S", cls.idle_timeout_s)),
            max_body_bytes=int(env.get("MSSSM_MAX_BODY_BYTES", cls.max_body_bytes)),
            max_frame_bytes=int(env.get("MSSSM_MAX_FRAME_BYTES", cls.max_frame_bytes)),
            max_signal_seconds=float(env.get("MSSSM_MAX_SIGNAL_SECONDS", cls.max_signal_seconds)),
            batch_wait_ms=float(env.get("MSSSM_BATCH_WAIT_MS", cls.batch_wait_ms)),
            cors_origins=tuple(o.strip() for o in origins.split(",") if o.strip()),
            header_timeout_s=float(env.get("MSSSM_HEADER_TIMEOUT_S", cls.header_timeout_s)),
            body_timeout_s=float(env.get("MSSSM_BODY_TIMEOUT_S", cls.body_timeout_s)),
            admit_latency_ms=float(env.get("MSSSM_ADMIT_LATENCY_MS", cls.admit_latency_ms)),
            streams_on_loop=env.get("MSSSM_STREAMS_ON_LOOP", "0") not in ("", "0"),
        )
