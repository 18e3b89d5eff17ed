"""Replicas behind a real load balancer: deploy/nginx.conf, started on loopback in front of two servers; one replica
is killed (SIGKILL) mid-stream, its clients reconnect through the proxy to the other and resume, and every prediction
of every stream equals an uninterrupted reference. Debian's nginx (.ci/run installs it)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time

import httpx
import numpy as np
import pytest
import yaml

from conftest import REPO_ROOT, ServerProcess
from msssm_serve.client import ResumableStream
from server.launcher import free_port

SECRET = "replicas-share-this"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.fixture
def proxy(tmp_path, model_dir):
    if not shutil.which(NGINX):
        pytest.fail("nginx is needed (apt-get install nginx; .ci/run installs it)")
    ports = [free_port(), free_port()]
    replicas = [ServerProcess(model_dir, {"MSSSM_STATE_SECRET": SECRET}, port=p) for p in ports]
    front = free_port()
    conf = (REPO_ROOT / "deploy/nginx.conf").read_text()
    conf = conf.replace("127.0.0.1:8001", f"127.0.0.1:{ports[0]}").replace("127.0.0.1:8002", f"127.0.0.1:{ports[1]}")
    conf = conf.replace("listen 127.0.0.1:8000", f"listen 127.0.0.1:{front}")
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx.conf").write_text(conf)
    nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                              "-g", f"daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/logs/error.log;"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{front}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        nginx.kill()
        raise RuntimeError(f"nginx did not start: {nginx.stderr.read().decode()[-2000:]}")
    yield front, replicas
    nginx.terminate()
    nginx.wait(10)
    for replica in replicas:
        replica.stop()


def test_a_killed_replica_loses_no_prediction_of_any_stream(proxy, records):
    front, replicas = proxy
    url = f"ws://127.0.0.1:{front}/stream"
    signals_ = [np.concatenate([records[i % 4], records[(i + 1) % 4]])[: 1600 + 100 * i].astype("<f4")
                for i in range(4)]
    references = [asyncio.run(ResumableStream(url, {"hop": 50}, frame_samples=50).send(s)) for s in signals_]
    clients = [ResumableStream(url, {"hop": 50}, frame_samples=50, snapshot_every=4, realtime_rate=800)
               for _ in signals_]

    async def run_all():
        tasks = [asyncio.create_task(c.send(s)) for c, s in zip(clients, signals_)]
        await asyncio.sleep(1.0)
        # streams spread over both replicas (least_conn); kill the first one outright
        active = [httpx.get(f"{r.url}/model", timeout=5).json()["active_streams"] for r in replicas]
        replicas[0].process.send_signal(signal.SIGKILL)
        return active, await asyncio.gather(*tasks)

    active, results = asyncio.run(run_all())
    assert active[0] >= 1 and active[1] >= 1 and sum(active) == 4, active
    assert sum(c.reconnects for c in clients) >= active[0]  # every stream of the killed replica came back
    for got, reference in zip(results, references):
        assert [(m["window"], m["t"]) for m in got] == [(m["window"], m["t"]) for m in reference]
        for m, r in zip(got, reference):
            np.testing.assert_allclose(m["probabilities"], r["probabilities"], atol=1e-4)


def test_the_kubernetes_example_probes_what_the_server_serves():
    docs = list(yaml.safe_load_all((REPO_ROOT / "deploy/kubernetes.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["args"][0] == "msssm-serve" and "--models" in container["args"]
    assert any(e["name"] == "MSSSM_STATE_SECRET" for e in container["env"])
    from server.app import create_app

    paths = {getattr(r, "path", None) for r in create_app().routes}
    assert {"/readyz", "/healthz", "/stream"} <= paths
