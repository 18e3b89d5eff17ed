"""/classify's work, shared by its route and the Open Inference Protocol's infer route: reading a body within its
limits, turning it into a checked signal, and classifying it through the model's batcher."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect

from msssm_serve.leads import LeadError, LeadMap, parse_lead_list
from msssm_serve.resample import resample_recording
from msssm_serve.runtime import OnnxModel

from .metrics import Metrics
from .registry import ServedModel
from .settings import Settings
from .signals import (InvalidJSON, InvalidSignal, parse_binary_format, parse_json, parse_sample_rate, samples_from_bytes,
                      samples_from_json)

log = logging.getLogger(__name__)

DRAIN_FACTOR = 4


class ClientGone(Exception):
    """The client disconnected before its request was read: nobody to answer."""


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
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


def invalid_to_422(parse):
    try:
        return parse()
    except (InvalidSignal, LeadError) as err:
        raise HTTPException(422, str(err)) from err


def read_signal(model: OnnxModel, body: bytes, request: Request):
    """-> (signal [T, leads sent], the LeadMap into the model's leads, its sample rate). `?sample_rate=` and
    `?leads=` describe a binary body; a JSON body carries them itself or in the query, not in both. Every query value
    is checked."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = request.query_params
    query_rate = invalid_to_422(lambda: parse_sample_rate(query.get("sample_rate"), model.sample_rate))
    query_leads = parse_lead_list(query.get("leads"))
    dtype, gain = invalid_to_422(lambda: parse_binary_format(query.get("dtype"), query.get("gain")))
    # checked even when a JSON body names its own leads: every query value is
    query_map = invalid_to_422(lambda: LeadMap(query_leads, model.leads, model.lead_subsets))
    channels = query.get("channels")
    if channels is not None and (not channels.isdigit() or not 1 <= int(channels) <= model.n_channels):
        raise HTTPException(422, f"?channels= must be the number of leads sent (1..{model.n_channels}), "
                                 f"got {channels!r}")
    if content_type == "application/octet-stream":
        leads, rate, lead_map = query_leads, query_rate, query_map
        n_channels = lead_map.n_given
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
        lead_map = invalid_to_422(lambda: LeadMap(leads, model.leads, model.lead_subsets))
        if channels is not None and int(channels) != lead_map.n_given:
            raise HTTPException(422, f"?channels={channels} but {lead_map.n_given} leads are sent")
        signal_ = invalid_to_422(lambda: _json_signal(payload["signal"], lead_map, leads is None))
        rate = invalid_to_422(lambda: parse_sample_rate(payload.get("sample_rate"), model.sample_rate)) \
            if "sample_rate" in payload else query_rate
    else:
        raise HTTPException(415, "send application/json or application/octet-stream (float32 LE, ?channels=C)")
    return signal_, lead_map, rate


def mixer_requested(model: OnnxModel, request: Request) -> bool:
    """`?mixer=1` (or true / 0 / false): add the scale mixer's weights to the answer; 422 for other values or for
    a model whose graph has no mixer output."""
    value = request.query_params.get("mixer")
    if value is None:
        return False
    if value.lower() not in ("1", "true", "0", "false"):
        raise HTTPException(422, f"?mixer= must be 1 or 0 (true or false), got {value!r}")
    wanted = value.lower() in ("1", "true")
    if wanted and not model.has_scale_weights:
        raise HTTPException(422, f"model {model.name} has no scale-mixer output (a graph exported before it was one)")
    return wanted


def _json_signal(value, lead_map: LeadMap, leads_implied: bool):
    try:
        return samples_from_json(value, lead_map.n_given)
    except InvalidSignal as err:
        if leads_implied and "must be [samples" in str(err):  # say which leads were expected, and the way out
            raise InvalidSignal(f"{err}. Without 'leads', the columns are the model's leads {lead_map.model_leads} "
                                "in that order; to send fewer or others, name them in 'leads'") from err
        raise


async def classify_signal(served: ServedModel, sent: np.ndarray, lead_map: LeadMap, rate, settings: Settings,
                          metrics: Metrics, scale_weights: bool = False) -> dict:
    """The /classify answer for a checked signal [T, leads sent] at `rate` (also what the KServe endpoint runs);
    HTTPException for what the client must change or retry."""
    model = served.model
    seconds = len(sent) / rate
    if seconds > settings.max_signal_seconds:
        raise HTTPException(413, f"signal of {float(seconds):.0f} s exceeds the {settings.max_signal_seconds:g} s limit")
    # Off the event loop: resampling an hour at 500 Hz takes ~1 s that streams would otherwise wait out. Window by
    # window with the streams' resampler, then into the model's leads, in the order a stream does it.
    signal_ = await asyncio.to_thread(lambda: lead_map(resample_recording(sent, rate, model.sample_rate, model.window)))
    started = time.perf_counter()
    try:
        result = await served.batcher.classify(signal_, scale_weights)
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
    # A signal below the model's minimum is still answered (a stream's early predictions are the same numbers, and
    # the contract ties the two), but flagged: a prediction from a few samples is not one to rely on.
    short = len(signal_) < model.min_samples
    flags = {"too_short": True, "warning": (
        f"signal of {len(signal_)} samples at {model.sample_rate} Hz is below this model's minimum of "
        f"{model.min_samples} ({model.min_samples / model.sample_rate:g} s): not a prediction to rely on")} \
        if short else {"too_short": False}
    mixer = {"scales": model.scales, "scale_weights": result["scale_weights"].tolist()} if scale_weights else {}
    return {"model": model.name, "labels": model.labels, "probabilities": probabilities.tolist(),
            "predicted": predicted, "samples": len(signal_), **flags, **mixer,
            "windows": [{"start": w["start"], "probabilities": w["probabilities"].tolist(),
                         **({"scale_weights": w["scale_weights"].tolist()} if scale_weights else {})}
                        for w in result["windows"]]}
