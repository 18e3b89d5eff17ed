"""The OpenAPI document is the API: schemathesis with all its checks (seeded, bounded) against a real server, with
and without an API key. tests/schemathesis.toml says the one expectation that is configured, and why."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import REPO_ROOT, ServerProcess

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def run_schemathesis(url: str, headers: list[str], seed: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCHEMATHESIS), "--config-file", str(REPO_ROOT / "tests/schemathesis.toml"), "run",
                           url + "/openapi.json", "--checks", "all", "--max-examples", "60", "--seed", str(seed),
                           "--no-color", *headers], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)


@pytest.mark.parametrize("key", [None, "s3cret"])
def test_schemathesis_all_checks_pass(model_dir, key):
    if not SCHEMATHESIS.exists() and shutil.which("schemathesis") is None:
        pytest.fail("schemathesis is a test dependency (pip install -e '.[test]')")
    env = {"MSSSM_API_KEY": key} if key else {}
    server = ServerProcess(model_dir, env)
    try:
        headers = ["-H", f"Authorization: Bearer {key}"] if key else []
        run = run_schemathesis(server.url, headers, seed=0)
        assert run.returncode == 0, run.stdout[-6000:]
        assert " passed" in run.stdout
    finally:
        server.stop()


def test_the_document_describes_classify_bodies_and_errors(server):
    document = httpx.get(server.url + "/openapi.json").json()
    classify = document["paths"]["/classify"]["post"]
    assert set(classify["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert {"200", "400", "413", "415", "422", "503"} <= set(classify["responses"])
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
