"""The FastAPI app. `create_app()` is a factory, so each uvicorn worker process loads its own model."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect

from msssm_serve.leads import LeadError, LeadMap, parse_lead_list
from msssm_serve.runtime import OnnxModel

from . import openapi, registry
from .auth import OPEN_ROUTES, key_matches, missing_key_detail, offered_key, redact_keys_in_logs
from .metrics import Metrics
from .settings import Settings
from msssm_serve.resample import resample_recording

from .signals import (InvalidJSON, InvalidSignal, parse_binary_format, parse_json, parse_sample_rate, samples_from_bytes,
                      samples_from_json)
from .streaming import GOING_AWAY, StreamHub

log = logging.getLogger(__name__)


MONITOR_PAGE = Path(__file__).with_name("monitor.html")
DRAIN_FACTOR = 4


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    metrics = Metrics()
    redact_keys_in_logs()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        models = registry.load(settings.model_dir, settings.models_dir, metrics, settings.batch_wait_ms)
        for served in models.values():
            served.batcher.start()
        default = models[registry.default_name(models)]
        app.state.models, app.state.default = models, default
        app.state.model, app.state.batcher = default.model, default.batcher
        app.state.hub = StreamHub(models, default.name, settings, metrics)
        restore_sigterm = _close_streams_on_sigterm(app.state.hub)
        try:
            yield
        finally:
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
            if path in OPEN_ROUTES or key_matches(offered_key(request.headers, request.query_params, path),
                                                  settings.api_key):
                return await call_next(request)
            return JSONResponse({"detail": missing_key_detail(path)}, 401, headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        # a request refused before routing (401) is labelled by its path when that is one of the app's routes
        route = getattr(request.scope.get("route"), "path", None) or (
            request.url.path if request.url.path in {r.path for r in app.routes} else "unmatched")
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
        if not models or not all(served.batcher.running for served in models.values()):
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
        return MONITOR_PAGE.read_text()

    @app.post("/classify")
    async def classify(request: Request):
        served = _served(request)
        model = served.model
        body = await _read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        sent, lead_map, rate = _read_signal(model, body, request)
        seconds = len(sent) / rate
        if seconds > settings.max_signal_seconds:
            raise HTTPException(413, f"signal of {float(seconds):.0f} s exceeds the {settings.max_signal_seconds:g} s "
                                     "limit")
        # Off the event loop: resampling an hour at 500 Hz takes ~1 s that streams would otherwise wait out. Window
        # by window with the streams' resampler, then into the model's leads, in the order a stream does it.
        signal_ = await asyncio.to_thread(
            lambda: lead_map(resample_recording(sent, rate, model.sample_rate, model.window)))
        started = time.perf_counter()
        try:
            result = await served.batcher.classify(signal_)
        except Exception as err:  # the model failed, not the request (the signal was checked): JSON, not a bare 500
            log.exception("classify failed")
            raise HTTPException(503, f"inference failed ({type(err).__name__}); please retry") from None
        metrics.inference_seconds.labels("classify").observe(time.perf_counter() - started)
        metrics.samples.labels("classify").inc(len(signal_))
        probabilities = result["probabilities"]
        if not all(np.isfinite(w["probabilities"]).all() for w in result["windows"]):
            raise HTTPException(422, "the model's output is not finite for this signal: values out of the range the "
                                     "model was trained on")
        if model.multi_label:
            predicted = [label for label, p in zip(model.labels, probabilities) if p >= 0.5]
        else:
            predicted = [model.labels[int(np.argmax(probabilities))]]
        # A signal below the model's minimum is still answered (a stream's early predictions are the same numbers,
        # and the contract ties the two), but flagged: a prediction from a few samples is not one to rely on.
        short = len(signal_) < model.min_samples
        flags = {"too_short": True, "warning": (
            f"signal of {len(signal_)} samples at {model.sample_rate} Hz is below this model's minimum of "
            f"{model.min_samples} ({model.min_samples / model.sample_rate:g} s): not a prediction to rely on")} \
            if short else {"too_short": False}
        return {"model": model.name, "labels": model.labels, "probabilities": probabilities.tolist(),
                "predicted": predicted, "samples": len(signal_), **flags,
                "windows": [{"start": w["start"], "probabilities": w["probabilities"].tolist()}
                            for w in result["windows"]]}

    @app.websocket("/stream")
    async def stream(ws: WebSocket):
        await ws.app.state.hub.serve(ws)

    return app


def _served(request: Request) -> registry.ServedModel:
    """The model `?model=NAME` names (404 listing the others when it names none), else the default."""
    models = request.app.state.models
    name = request.query_params.get("model")
    if name is None:
        return request.app.state.default
    if name not in models:
        raise HTTPException(404, f"no model named {name!r}; this server holds {sorted(models)} (GET /models)")
    return models[name]


class ClientGone(Exception):
    """The client disconnected before its request was read: nobody to answer."""


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body within `timeout_s` (408 after), refused with 413 once it is known to exceed `limit`. A body over
    the limit is still read and discarded up to DRAIN_FACTOR times the limit: a client that writes its whole body
    before reading (urllib) would otherwise get a connection reset instead of the 413."""
    declared = request.headers.get("content-length")
    declared = int(declared) if declared is not None and declared.isdigit() else None
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit and (declared is None or declared <= limit):
                    chunks.append(chunk)
                elif size > DRAIN_FACTOR * limit:
                    break
    except TimeoutError:
        raise HTTPException(408, f"request body not received within {timeout_s:g} s") from None
    except ClientDisconnect:
        raise ClientGone() from None
    if size > limit or (declared is not None and declared > limit):
        raise HTTPException(413, f"body of {declared or size} bytes exceeds the {limit}-byte limit",
                            headers={"Connection": "close"})
    return b"".join(chunks)


def _invalid_to_422(parse):
    try:
        return parse()
    except (InvalidSignal, LeadError) as err:
        raise HTTPException(422, str(err)) from err


def _read_signal(model: OnnxModel, body: bytes, request: Request):
    """-> (signal [T, leads sent], the LeadMap into the model's leads, its sample rate). `?sample_rate=` and
    `?leads=` describe a binary body; a JSON body carries them itself or in the query, not in both. Every query value
    is checked."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = request.query_params
    query_rate = _invalid_to_422(lambda: parse_sample_rate(query.get("sample_rate"), model.sample_rate))
    query_leads = parse_lead_list(query.get("leads"))
    dtype, gain = _invalid_to_422(lambda: parse_binary_format(query.get("dtype"), query.get("gain")))
    if query_leads is not None:
        _invalid_to_422(lambda: LeadMap(query_leads, model.leads, model.lead_subsets))
    channels = query.get("channels")
    if channels is not None and (not channels.isdigit() or not 1 <= int(channels) <= model.n_channels):
        raise HTTPException(422, f"?channels= must be the number of leads sent (1..{model.n_channels}), "
                                 f"got {channels!r}")
    if content_type == "application/octet-stream":
        leads, rate = query_leads, query_rate
        n_channels = len(leads) if leads else model.n_channels
        if channels is None:
            raise HTTPException(422, f"binary bodies need ?channels={n_channels} (the number of leads sent)")
        if int(channels) != n_channels:
            raise HTTPException(422, f"?channels= must be the number of leads sent, {n_channels} "
                                     f"({'?leads=' if leads else 'the model'}: {leads or model.leads}), got "
                                     f"{channels!r}")
        if not body:
            raise HTTPException(422, "empty signal")
        try:
            signal_ = samples_from_bytes(body, n_channels, "body", dtype, gain)
        except InvalidSignal as err:
            # A length that is no whole number of samples is a malformed body rather than a bad value.
            raise HTTPException(400 if "whole number" in str(err) else 422, str(err)) from err
    elif content_type == "application/json":
        try:
            payload = parse_json(body, "body")
        except InvalidJSON as err:
            raise HTTPException(400, str(err)) from err
        if not isinstance(payload, dict) or "signal" not in payload:
            raise HTTPException(422, "body must be a JSON object with a 'signal' field")
        null = [name for name in ("sample_rate", "leads") if name in payload and payload[name] is None]
        if null:
            raise HTTPException(422, f"{null} must be left out for the model's default, not null")
        twice = [name for name in ("sample_rate", "leads") if name in payload and name in query]
        if twice:
            raise HTTPException(422, f"{twice} given both in the body and in the query: give each once")
        leads = payload["leads"] if "leads" in payload else query_leads
        lead_map = _invalid_to_422(lambda: LeadMap(leads, model.leads, model.lead_subsets))
        if channels is not None and int(channels) != lead_map.n_given:
            raise HTTPException(422, f"?channels={channels} but {lead_map.n_given} leads are sent")
        signal_ = _invalid_to_422(lambda: _json_signal(payload["signal"], lead_map, leads is None))
        rate = _invalid_to_422(lambda: parse_sample_rate(payload.get("sample_rate"), model.sample_rate)) \
            if "sample_rate" in payload else query_rate
    else:
        raise HTTPException(415, "send application/json or application/octet-stream (float32 LE, ?channels=C)")
    lead_map = _invalid_to_422(lambda: LeadMap(leads, model.leads, model.lead_subsets))
    return signal_, lead_map, rate


def _json_signal(value, lead_map: LeadMap, leads_implied: bool):
    try:
        return samples_from_json(value, lead_map.n_given)
    except InvalidSignal as err:
        if leads_implied and "must be [samples" in str(err):  # say which leads were expected, and the way out
            raise InvalidSignal(f"{err}. Without 'leads', the columns are the model's leads {lead_map.model_leads} "
                                "in that order; to send fewer or others, name them in 'leads'") from err
        raise


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
