"""The Open Inference Protocol (KServe v2) endpoints, called by a real client of that protocol (tritonclient's HTTP
client) and by plain JSON as the protocol's published request shape has it."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from msssm_serve.runtime import OnnxModel

from conftest import RHYTHM_LABELS
from test_devices import with_only


def test_tritonclient_calls_it_unchanged(multi_server, model_dir, records):
    import tritonclient.http as http  # a declared test dependency: missing, the test fails rather than skips
    client = http.InferenceServerClient(url=multi_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("default")
    meta = client.get_model_metadata("default")
    assert meta["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, 12]}
    expected = OnnxModel(model_dir, threads=1).classify(records[0])["probabilities"]
    for binary in (True, False):  # tritonclient's default binary tensors, and JSON
        x = http.InferInput("x", list(records[0].shape), "FP32")
        x.set_data_from_numpy(records[0], binary_data=binary)
        result = client.infer("default", inputs=[x],
                              outputs=[http.InferRequestedOutput("probabilities", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)


def test_the_published_json_shape_with_a_batch_and_parameters(multi_server, rhythm, records):
    two = records[:2][:, :, [1, 6]]
    body = {"id": "r1", "inputs": [{"name": "x", "shape": list(two.shape), "datatype": "FP32",
                                    "data": two.tolist()}], "parameters": {"leads": "MLII,V1"}}
    r = httpx.post(multi_server.url + "/v2/models/rhythm/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == "rhythm" and out["id"] == "r1"
    (output,) = out["outputs"]
    assert output["name"] == "probabilities" and output["shape"] == [2, len(RHYTHM_LABELS)]
    expected = [rhythm.classify(with_only(records[i], [1, 6]))["probabilities"] for i in range(2)]
    np.testing.assert_allclose(np.reshape(output["data"], (2, -1)), expected, atol=1e-5)


@pytest.mark.parametrize("body, status, fragment", [
    ({"inputs": []}, 400, "exactly one input"),
    ({"inputs": [{"name": "y", "shape": [2, 12], "datatype": "FP32", "data": [0] * 24}]}, 400, "named 'x'"),
    ({"inputs": [{"name": "x", "shape": [2, 12], "datatype": "FP64", "data": [0] * 24}]}, 400, "FP32"),
    ({"inputs": [{"name": "x", "shape": [2, 12], "datatype": "FP32", "data": [0] * 23}]}, 400, "needs 24"),
    ({"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": [0] * 16}]}, 400, "must be [samples, 12]"),
    ({"inputs": [{"name": "x", "shape": [2, -1], "datatype": "FP32", "data": []}]}, 400, "positive integers"),
])
def test_bad_requests_get_the_protocols_error_shape(multi_server, body, status, fragment):
    r = httpx.post(multi_server.url + "/v2/models/default/infer", json=body, timeout=30)
    assert r.status_code == status and fragment in r.json()["error"], r.text


def test_an_unknown_model_is_404(multi_server):
    r = httpx.post(multi_server.url + "/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404 and "rhythm" in r.json()["error"]
    assert httpx.get(multi_server.url + "/v2/models/nope").status_code == 404
