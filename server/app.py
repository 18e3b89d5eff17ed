"""The FastAPI app. `create_app()` is a factory, so each uvicorn worker process loads its own model."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from . import kserve, openapi, registry
from .auth import is_open, key_matches, missing_key_detail, offered_key, redact_keys_in_logs
from .classify import ClientGone, classify_signal, mixer_requested, read_body, read_signal
from .metrics import Metrics
from .settings import Settings
from .hub import StreamHub
from .streaming import GOING_AWAY, RETRY_AFTER_S

log = logging.getLogger(__name__)


STATIC_DIR = Path(__file__).with_name("static")  # the monitor page, its script and the records it offers


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    metrics = Metrics()
    redact_keys_in_logs()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        models = registry.load(settings.model_dir, settings.models_dir, metrics, settings.batch_wait_ms,
                               settings.admit_latency_ms, settings.streams_on_loop)
        for served in models.values():
            served.batcher.start()
        metrics.streams_on_loop.set(any(served.batcher.streams_on_loop for served in models.values()))
        default = models[registry.default_name(models)]
        app.state.models, app.state.default = models, default
        app.state.model, app.state.batcher = default.model, default.batcher
        app.state.hub = StreamHub(models, default.name, settings, metrics)
        restore_sigterm = _close_streams_on_sigterm(app.state.hub)
        restore_gc = _freeze_startup_objects(metrics)
        try:
            yield
        finally:
            restore_gc()
            restore_sigterm()
            await app.state.hub.close_all(GOING_AWAY, "server shutting down")
            for served in models.values():
                await served.batcher.stop()

    app = FastAPI(title="msssm-serve", lifespan=lifespan)
    app.state.settings, app.state.metrics = settings, metrics
    openapi.install(app, settings)

    if settings.api_key:  # registered before the counter, so inside it: refusals are counted too
        @app.middleware("http")
        async def require_api_key(request: Request, call_next):
            path = request.url.path
            if is_open(path) or key_matches(offered_key(request.headers, request.query_params, path),
                                                  settings.api_key):
                return await call_next(request)
            return JSONResponse({"detail": missing_key_detail(path)}, 401, headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        # a request refused before routing (401) is labelled by its path when that is one of the app's routes
        route = getattr(request.scope.get("route"), "path", None) or (
            request.url.path if request.url.path in {getattr(r, "path", None) for r in app.routes} else "unmatched")
        metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
        return response

    if settings.cors_origins:  # added last, so outermost: preflights are answered before the key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": counted, sent to nobody, not an error

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request):
        models = getattr(request.app.state, "models", None)
        hub = getattr(request.app.state, "hub", None)
        if hub is not None and hub.draining:  # a load balancer stops sending new streams here
            return JSONResponse({"status": "draining"}, 503)
        if not registry.all_running(models):
            return JSONResponse({"status": "not ready"}, 503)
        return {"status": "ready"}

    @app.get("/model")
    async def model_info(request: Request):
        served = _served(request)
        model = served.model
        return {"name": model.name, "served_as": served.name, "version": model.meta.get("version"),
                "onnx_sha256": model.meta.get("onnx", {}).get("sha256"),
                "labels": model.labels, "multi_label": model.multi_label, "sample_rate": model.sample_rate,
                "leads": model.leads, "lead_subsets": model.lead_subsets, "window": model.window,
                "default_hop": model.default_hop, "state_bytes": model.state_bytes, "providers": model.providers,
                "validation": registry.validation_summary(model.meta),
                "scale_weights": registry.scale_weights_summary(model),
                "active_streams": len(request.app.state.hub.connections), "max_streams": settings.max_streams}

    @app.get("/models")
    async def models_info(request: Request):
        return {"default": request.app.state.default.name,
                "models": [served.describe() for served in request.app.state.models.values()]}

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def monitor():
        return (STATIC_DIR / "index.html").read_text()

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.post("/classify")
    async def classify(request: Request):
        served = _served(request)
        model = served.model
        overloaded = served.batcher.overloaded()
        if overloaded is not None:
            raise HTTPException(503, f"the server is at its latency bound (p95 {overloaded * 1e3:.0f} ms > "
                                     f"{settings.admit_latency_ms:g} ms); retry after {RETRY_AFTER_S} s",
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        sent, lead_map, rate = read_signal(model, body, request)
        return await classify_signal(served, sent, lead_map, rate, settings, metrics,
                                     scale_weights=mixer_requested(model, request))

    kserve.install(app, settings, metrics)

    @app.websocket("/stream")
    async def stream(ws: WebSocket):
        await ws.app.state.hub.serve(ws)

    @app.websocket("/gateway")
    async def gateway(ws: WebSocket):
        await ws.app.state.hub.serve_gateway(ws)

    return app


def _served(request: Request) -> registry.ServedModel:
    """The model `?model=NAME` names (404 listing the others when it names none), else the default."""
    name = request.query_params.get("model")
    return request.app.state.default if name is None else registry.served_model(request.app.state.models, name)


def _close_streams_on_sigterm(hub: StreamHub):
    """uvicorn answers SIGTERM by dropping WebSockets with 1012 before the app's shutdown runs; streams are to be
    closed with 1001 and a reason, so that is done first, then uvicorn's own handler. -> a restore function."""
    if threading.current_thread() is not threading.main_thread():  # e.g. TestClient: no signals there
        return lambda: None
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)

    async def close_then_exit(signum, frame):
        await hub.close_all(GOING_AWAY, "server shutting down")
        if callable(previous):
            previous(signum, frame)
        else:  # no server loop owns the signal: restore its default action and take it
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signum)

    def handler(signum, frame):
        loop.call_soon_threadsafe(lambda: loop.create_task(close_then_exit(signum, frame)))

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _freeze_startup_objects(metrics: Metrics):
    """Every object made while starting (modules, onnxruntime sessions, the app: ~113,000 for the bundled model) goes
    to the collector's permanent generation, so that no full collection scans them again: one stops every thread
    (the event loop and the inference thread) for as long as it scans: 45 ms for those objects alone, 82–107 ms at
    500 streams on one core (31 ms frozen), a hop's latency budget spent at once. Pauses are recorded in `msssm_gc_pause_seconds`.
    -> a restore function."""
    gc.collect()
    gc.freeze()
    started: list[float] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            metrics.gc_pause_seconds.labels(str(info["generation"])).observe(time.perf_counter() - started[0])

    gc.callbacks.append(record)

    def restore() -> None:
        gc.callbacks.remove(record)
        gc.unfreeze()

    return restore
