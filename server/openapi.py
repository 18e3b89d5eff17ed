"""The OpenAPI document as the API is: every body, parameter, status and content type, with the loaded model's
leads, labels and limits filled in, so that a generated client can call `/classify` and schemathesis (all checks,
tests/test_openapi.py) finds nothing it does not describe. The WebSocket protocol is in docs/api.md."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from msssm_serve.runtime import OnnxModel

from .auth import is_open
from .settings import Settings
from .signals import MAX_ABS_VALUE, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE

ERROR = {"type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR}}}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operations(model: OnnxModel, names: list[str], settings: Settings) -> dict:
    """Bodies and answers are those of the default model `model` (other models of the server differ in leads and
    labels: GET /models lists them)."""
    c, labels = model.n_channels, model.labels
    fewest = 1 if model.lead_subsets else c
    probabilities = {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1},
                     "minItems": len(labels), "maxItems": len(labels)}
    sample_rate = {"type": "number", "minimum": MIN_SAMPLE_RATE, "maximum": MAX_SAMPLE_RATE,
                   "description": f"samples per second of the signal (default: the model's {model.sample_rate})"}
    leads = {"type": "array", "items": {"type": "string", "enum": model.leads}, "minItems": fewest, "maxItems": c,
             "uniqueItems": True,
             "description": f"the signal's columns (default: the model's leads, {model.leads}); names are "
                            "case-insensitive, MLII means II" + ("; any subset (the others are missing)"
                                                                 if model.lead_subsets else "; all of them")}
    row = {"type": "array", "items": {"type": "number", "minimum": -MAX_ABS_VALUE, "maximum": MAX_ABS_VALUE},
           "minItems": fewest, "maxItems": c}
    classify_body = {
        "type": "object", "required": ["signal"],
        "properties": {"signal": {"type": "array", "items": row, "minItems": 1, "maxItems": 4 * model.window,
                                  "description": "time-major samples in mV: one row of channel values per sample"},
                       "sample_rate": sample_rate, "leads": leads}}
    shares = {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1},
              "minItems": len(model.scales), "maxItems": len(model.scales),
              "description": "with ?mixer=1: each scale's share of the scale mixer's weights (GET /model)"}
    classify_answer = {
        "type": "object", "required": ["model", "labels", "probabilities", "predicted", "samples", "windows"],
        "properties": {
            "model": {"type": "string"}, "labels": {"type": "array", "items": {"type": "string", "enum": labels}},
            "probabilities": probabilities,
            "predicted": {"type": "array", "items": {"type": "string", "enum": labels}},
            "samples": {"type": "integer", "minimum": 1, "description": "samples at the model's rate"},
            "too_short": {"type": "boolean", "description": f"fewer than the model's minimum of {model.min_samples} "
                                                            "samples: answered, but not to be relied on"},
            "warning": {"type": "string", "description": "why the answer is flagged, when it is"},
            **({"scales": {"type": "array", "items": {"type": "string", "enum": model.scales},
                           "description": "with ?mixer=1: the scales of `scale_weights`, in order"},
                "scale_weights": shares} if model.has_scale_weights else {}),
            "windows": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["start", "probabilities"],
                "properties": {"start": {"type": "integer", "minimum": 0}, "probabilities": probabilities,
                               **({"scale_weights": shares} if model.has_scale_weights else {})}}}}}
    query = [
        {"name": "channels", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": fewest, "maximum": c},
         "description": f"binary bodies: required, the number of leads sent ({c} unless ?leads= names fewer)"},
        {"name": "sample_rate", "in": "query", "required": False, "schema": sample_rate,
         "description": "binary bodies only (JSON bodies carry their own)"},
        {"name": "leads", "in": "query", "required": False,
         "schema": {"type": "string", "description": "binary bodies only: comma-separated lead names"}},
        {"name": "dtype", "in": "query", "required": False,
         "schema": {"type": "string", "enum": ["float32", "int16"], "default": "float32"},
         "description": "binary bodies only: float32 in mV, or int16 ADC counts (then with ?gain=)"},
        {"name": "gain", "in": "query", "required": False, "schema": {"type": "number", "exclusiveMinimum": 0},
         "description": "with dtype=int16: counts per mV"},
        *([{"name": "mixer", "in": "query", "required": False,
            "schema": {"type": "string", "enum": ["1", "0", "true", "false"], "default": "0"},
            "description": "1: add the scale mixer's weights (`scale_weights`) per window and for the signal"}]
          if model.has_scale_weights else []),
    ]
    model_param = {"name": "model", "in": "query", "required": False, "schema": {"type": "string", "enum": names},
                   "description": "which of the server's models (default: the default model; GET /models)"}
    return {
        "/classify": {"post": {
            "summary": "Classify a recording",
            "description": "A signal longer than the model's window is cut into consecutive windows (the last may be "
                           "shorter), each classified from the zero state; `probabilities` is their element-wise "
                           "max. `predicted`: the labels with probability >= 0.5 (multi-label models) or the most "
                           "probable one.",
            "parameters": [model_param, *query],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": classify_body},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                        "description": "little-endian float32, time-major, "
                                                                       "?channels= values per sample"}}}},
            "responses": {"200": _json(classify_answer),
                          "400": _error("the body is not valid JSON, or not a whole number of float32 samples"),
                          "408": _error(f"the body did not arrive within {settings.body_timeout_s:g} s"),
                          "413": _error(f"the body exceeds {settings.max_body_bytes} bytes or the signal "
                                        f"{settings.max_signal_seconds:g} s"),
                          "404": _error("no model of that name"),
                          "415": _error("a content type other than application/json or application/octet-stream"),
                          "422": _error("the signal, its leads, its sample rate or ?channels= are invalid"),
                          "503": _error("inference failed, or the server is at its latency bound (then with "
                                        "Retry-After): retry")}}},
        "/models": {"get": {"summary": "Every model the server holds", "responses": {"200": _json({
            "type": "object", "required": ["default", "models"],
            "properties": {"default": {"type": "string"}, "models": {"type": "array", "items": {
                "type": "object",
                "required": ["name", "labels", "leads", "lead_subsets", "sample_rate", "window", "state_bytes"],
                "properties": {"name": {"type": "string"}, "labels": {"type": "array", "items": {"type": "string"}},
                               "leads": {"type": "array", "items": {"type": "string"}},
                               "lead_subsets": {"type": "boolean"}, "sample_rate": {"type": "integer"},
                               "window": {"type": "integer"}, "state_bytes": {"type": "integer"}}}}}})}}},
        "/model": {"get": {"summary": "One model (?model=NAME; default: the default model)",
                           "parameters": [model_param],
                           "responses": {"404": _error("no model of that name"), "200": _json({
            "type": "object",
            "required": ["name", "labels", "sample_rate", "leads", "window", "default_hop", "state_bytes"],
            "properties": {"name": {"type": "string"}, "labels": {"type": "array", "items": {"type": "string"}},
                           "sample_rate": {"type": "integer"}, "window": {"type": "integer"},
                           "leads": {"type": "array", "items": {"type": "string"}},
                           "default_hop": {"type": "integer"}, "state_bytes": {"type": "integer"}}})}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "Prometheus text exposition format", "content": {"text/plain": {"schema": {
                "type": "string"}}}}}}},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _json({
            "type": "object", "properties": {"status": {"type": "string", "enum": ["ok"]}}})}}},
        "/readyz": {"get": {"summary": "Readiness", "responses": {
            "200": _json({"type": "object", "properties": {"status": {"type": "string", "enum": ["ready"]}}}),
            "503": _json({"type": "object", "properties": {"status": {"type": "string"}}}, "not ready")}}},
        "/": {"get": {"summary": "The monitor page", "responses": {"200": {
            "description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
    }


def install(app: FastAPI, settings: Settings) -> None:
    """Replace FastAPI's generated document (which cannot see bodies read by hand) by the described one."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = get_openapi(title="msssm-serve", version="1", routes=[],
                                   description="MS-SSM streaming ECG classification. WebSockets /stream and /gateway: see "
                                               "docs/api.md.")
            document["paths"] = _operations(app.state.model, sorted(app.state.models), settings)
            if settings.api_key:
                document.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}}
                for path, operations in document["paths"].items():
                    if is_open(path):
                        continue
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
                        operation["responses"]["401"] = _error("missing or wrong API key")
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi
