"""docs/api.md cannot drift from the API: every route of the app, and every parameter, status and response field
of the OpenAPI document, is named on that page."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from conftest import REPO_ROOT

DOC = (REPO_ROOT / "docs/api.md").read_text()


@pytest.fixture(scope="module")
def app_and_document(model_dir):
    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings(model_dir=model_dir))
    with TestClient(app) as client:
        yield app, client.get("/openapi.json").json()


def test_every_route_is_described(app_and_document):
    app, _ = app_and_document
    paths = {getattr(r, "path", None) for r in app.routes} - {None, "/openapi.json", "/docs", "/docs/oauth2-redirect",
                                                                "/redoc"}
    assert {"/classify", "/stream", "/models", "/v2/models/{name}/infer"} <= paths  # the app's routes were read
    missing = sorted(p for p in paths if not re.search(re.escape(p) + r"[`\s,?]", DOC))
    assert not missing, f"docs/api.md does not describe {missing}"


def test_every_parameter_status_and_field_of_the_document_is_described(app_and_document):
    _, document = app_and_document
    problems = []
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            for parameter in op.get("parameters", []):
                if f"`{parameter['name']}`" not in DOC:
                    problems.append(f"{method.upper()} {path}: parameter {parameter['name']}")
            for status, response in op["responses"].items():
                if status != "200" and status not in DOC:
                    problems.append(f"{method.upper()} {path}: status {status}")
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                for field in schema.get("properties", {}):
                    if f'"{field}"' not in DOC and f"`{field}`" not in DOC:
                        problems.append(f"{method.upper()} {path}: field {field}")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            for field in body.get("properties", {}):
                if f"`{field}`" not in DOC:
                    problems.append(f"{method.upper()} {path}: body field {field}")
    assert len(document["paths"]) >= 7 and not problems, problems
