"""The Open Inference Protocol (KServe v2, as Triton and Seldon speak it) for windows, beside /classify.

    GET  /v2/health/live, /v2/health/ready, /v2
    GET  /v2/models/{name}, /v2/models/{name}/ready
    POST /v2/models/{name}/infer   {"inputs": [{"name": "x", "shape": [T, C], "datatype": "FP32", "data": [...]}]}

`data` may be flat (row-major) or nested; the binary tensor extension (a JSON header of `Inference-Header-Content-
Length` bytes, then raw little-endian tensors, `parameters.binary_data_size` per input) is read too, and outputs are
sent binary when asked, which is what tritonclient does by default. `shape` [B, T, C] classifies B recordings.
Request `parameters` may give `sample_rate` and `leads` (comma-separated), as /classify's query does. The answer is
/classify's `probabilities` (the element-wise max over the signal's windows): output `probabilities`, [K] or [B, K].
Errors are `{"error": "..."}`, as the protocol has them.
"""

from __future__ import annotations

import json

import numpy as np
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response

from msssm_serve.leads import LeadError, LeadMap, parse_lead_list

from .classify import classify_signal, read_body
from .registry import ServedModel, all_running, served_model
from .signals import InvalidSignal, checked, parse_sample_rate

HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUT = "probabilities"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


def install(app, settings, metrics) -> None:
    router = app  # routes registered on the app itself, so that each is an ordinary route with its path

    def served_or_404(request: Request, name: str) -> ServedModel:
        return served_model(request.app.state.models, name)

    def ready(request: Request) -> bool:
        return all_running(getattr(request.app.state, "models", None))

    @router.get("/v2/health/live")
    async def live():
        return {"live": True}

    @router.get("/v2/health/ready")
    async def health_ready(request: Request):
        return JSONResponse({"ready": ready(request)}, 200 if ready(request) else 503)

    @router.get("/v2")
    async def server_metadata():
        import msssm_serve

        return {"name": "msssm-serve", "version": msssm_serve.__version__, "extensions": ["binary_tensor_data"]}

    @router.get("/v2/models/{name}")
    async def model_metadata(request: Request, name: str):
        try:
            m = served_or_404(request, name).model
        except HTTPException as err:
            return _error(err.status_code, err.detail)
        return {"name": name, "versions": [str(m.meta.get("version", "1"))], "platform": "onnxruntime_onnx",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, m.n_channels]}],
                "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [len(m.labels)]}],
                "parameters": {"labels": m.labels, "leads": m.leads, "sample_rate": m.sample_rate,
                               "window": m.window, "lead_subsets": m.lead_subsets}}

    @router.get("/v2/models/{name}/ready")
    async def model_ready(request: Request, name: str):
        models = request.app.state.models
        ok = name in models and models[name].batcher.running
        return JSONResponse({"name": name, "ready": ok}, 200 if ok else (404 if name not in models else 503))

    @router.post("/v2/models/{name}/infer")
    async def infer(request: Request, name: str):
        try:
            served = served_or_404(request, name)
            body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
            header, tensors, binary_out, rate, leads = _parse_request(body, request.headers, served)
            lead_map = LeadMap(leads, served.model.leads, served.model.lead_subsets)
            rows = [await classify_signal(served, _checked(x, lead_map), lead_map, rate, settings, metrics)
                    for x in tensors]
        except HTTPException as err:
            return _error(err.status_code, str(err.detail))
        except (InvalidSignal, LeadError) as err:
            return _error(400, str(err))
        probabilities = np.array([r["probabilities"] for r in rows], np.float32)
        batched = header["inputs"][0]["shape"].__len__() == 3
        out = probabilities if batched else probabilities[0]
        answer = {"model_name": name, "model_version": str(served.model.meta.get("version", "1")),
                  **({"id": header["id"]} if "id" in header else {})}
        output = {"name": OUTPUT, "datatype": "FP32", "shape": list(out.shape)}
        if not binary_out:
            return {**answer, "outputs": [{**output, "data": out.ravel().tolist()}]}
        raw = out.astype("<f4").tobytes()
        text = json.dumps({**answer, "outputs": [{**output, "parameters": {"binary_data_size": len(raw)}}]}).encode()
        return Response(text + raw, media_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(text))})


def _checked(x: np.ndarray, lead_map: LeadMap) -> np.ndarray:
    return checked(x, lead_map.n_given, "x")


def _parse_request(body: bytes, headers, served: ServedModel):
    """-> (the JSON header, one [T, C] float32 array per recording, binary output?, sample rate, leads)."""
    model = served.model
    declared = headers.get(HEADER_LENGTH)
    if declared is not None and (not declared.isdigit() or int(declared) > len(body)):
        raise InvalidSignal(f"{HEADER_LENGTH} {declared!r} is not a length within the body of {len(body)} bytes")
    split = int(declared) if declared is not None else len(body)
    try:
        header = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidSignal(f"the request is not valid JSON ({err})") from err
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or len(header["inputs"]) != 1:
        raise InvalidSignal('the request must be {"inputs": [{"name": "x", "shape": [T, C], "datatype": "FP32", '
                            '"data": [...]}]} with exactly one input')
    spec = header["inputs"][0]
    if not isinstance(spec, dict) or spec.get("name") != "x":
        raise InvalidSignal(f"the input must be named 'x', got {spec.get('name') if isinstance(spec, dict) else spec!r}")
    if spec.get("datatype") != "FP32":
        raise InvalidSignal(f"input 'x' must be FP32, got {spec.get('datatype')!r}")
    shape = spec.get("shape")
    if (not isinstance(shape, list) or len(shape) not in (2, 3)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise InvalidSignal(f"input 'x' shape must be [T, C] or [B, T, C] of positive integers, got {shape!r}")
    size = int(np.prod(shape))
    params = spec.get("parameters") or {}
    if "binary_data_size" in params:
        n_bytes = params["binary_data_size"]
        raw = body[split:]
        if not isinstance(n_bytes, int) or n_bytes != len(raw) or n_bytes != 4 * size:
            raise InvalidSignal(f"binary input 'x' of shape {shape} needs {4 * size} bytes, "
                                f"binary_data_size says {n_bytes!r}, the body holds {len(raw)}")
        values = np.frombuffer(raw, "<f4").astype(np.float32)
    else:
        data = spec.get("data")
        try:
            values = np.asarray(data, dtype=np.float64).ravel()
        except (TypeError, ValueError) as err:
            raise InvalidSignal(f"input 'x' data must be numbers ({err})") from err
        if values.size != size:
            raise InvalidSignal(f"input 'x' has {values.size} values, shape {shape} needs {size}")
        values = values.astype(np.float32)
    x = values.reshape(shape if len(shape) == 3 else [1, *shape])
    request_params = header.get("parameters") or {}
    rate = parse_sample_rate(request_params.get("sample_rate"), model.sample_rate)
    leads = parse_lead_list(request_params.get("leads"))
    outputs = header.get("outputs") or []
    binary_out = bool(request_params.get("binary_data_output")) or any(
        isinstance(o, dict) and (o.get("parameters") or {}).get("binary_data") for o in outputs)
    unknown = [o.get("name") for o in outputs if isinstance(o, dict) and o.get("name") != OUTPUT]
    if unknown:
        raise InvalidSignal(f"unknown outputs {unknown}; this model has {OUTPUT!r}")
    return header, list(x), binary_out, rate, leads
