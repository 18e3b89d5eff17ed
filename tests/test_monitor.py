"""The monitor page at `/`, driven in headless Chromium (Debian's `chromium`, through playwright-python; no browser is
downloaded). The server holds the bundled models and wants an API key, so the page's key field and model selector
are part of what is tested. Locally the test skips without Chromium; under CI (`MSSSM_REQUIRE_BROWSER=1`, set by
`.ci/run`, which installs the browser) a missing browser fails it instead.

A screenshot of the page after a record has played is written to MSSSM_SCREENSHOT when set (docs/monitor.png was made
so), else to the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from msssm_serve.server.launcher import LocalServer

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORDS = REPO_ROOT / "server" / "static" / "records"
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "ptbxl" / "records100" / "00000"
KEY = "page-key"


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        executable = None
    if executable is None:
        if os.environ.get("MSSSM_REQUIRE_BROWSER"):
            pytest.fail("MSSSM_REQUIRE_BROWSER is set but Chromium or playwright is missing")
        pytest.skip("needs Debian's chromium and playwright (pip install -e '.[test]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("monitor") / "server.log"
    with LocalServer(REPO_ROOT / "models", log, repository=True, env={"MSSSM_API_KEY": KEY}) as server:
        yield server


def classify(server, body: dict, model: str) -> dict:
    response = httpx.post(f"{server.url}/classify?model={model}", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def open_page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 1500})
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server.url + "/")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("window.monitor.models.length >= 2 && window.monitor.source !== null", timeout=20_000)
    return page, errors


def play_and_wait(page, windows: int, speed: str = "0"):
    page.select_option("#speed", speed)
    page.click("#play")
    page.wait_for_function(f"document.querySelectorAll('#windows tbody tr').length >= {windows}"
                           " && document.querySelector('#connection').dataset.state === 'done'", timeout=60_000)


def shown_windows(page) -> list[dict]:
    """What the results table shows: per window, the probabilities as printed and the predicted labels."""
    return page.eval_on_selector_all("#windows tbody tr", """rows => rows.map(r => ({
        window: Number(r.dataset.window),
        shown: [...r.querySelectorAll('td[data-p]')].map(td => Number(td.textContent)),
        predicted: r.querySelector('.predicted-labels').textContent.split(', ').filter(Boolean)}))""")


def test_a_bundled_record_plays_and_shows_what_classify_says(browser, page_server, tmp_path):
    page, errors = open_page(browser, page_server)
    name = "ptbxl_00077"
    page.select_option("#record-select", name)
    page.wait_for_function(f"window.monitor.source.name === '{name}'")
    play_and_wait(page, windows=1, speed="16")  # paced: 10 s of signal in 0.6 s
    record = json.loads((RECORDS / f"{name}.json").read_text())
    expected = classify(page_server, {"signal": record["signal"], "leads": record["leads"]}, "default")
    (shown,) = shown_windows(page)
    # printed to 4 decimals: within rounding (5e-5) of /classify, plus the contract's 1e-4
    assert np.abs(np.array(shown["shown"]) - np.array(expected["windows"][0]["probabilities"])).max() <= 1.5e-4
    assert shown["predicted"] == (expected["predicted"] or [expected["labels"][int(np.argmax(expected["probabilities"]))]])
    state = page.evaluate("window.monitor")
    # a prediction every hop of the window (the last is the final one), each with its scale shares
    assert [p["t"] for p in state["predictions"]] == list(range(25, 1001, 25))
    scales = expected_scales = len(page.evaluate("window.monitor.model.scale_weights.scales"))
    assert all(len(p["scale_weights"]) == scales and abs(sum(p["scale_weights"]) - 1) < 1e-5
               for p in state["predictions"])
    # the hop shares, averaged over the window, are /classify's window shares (?mixer=1)
    with_mixer = httpx.post(f"{page_server.url}/classify?mixer=1", json={"signal": record["signal"]},
                            headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()
    mean_shares = np.mean([p["scale_weights"] for p in state["predictions"]], axis=0)
    assert np.abs(mean_shares - np.array(with_mixer["windows"][0]["scale_weights"])).max() <= 1e-4
    assert expected_scales == len(with_mixer["scales"])
    # the canvases were drawn on (not blank)
    for canvas in ("ecg", "probabilities", "scales"):
        inked = page.evaluate(f"""(() => {{ const c = document.getElementById('{canvas}');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }})()""")
        assert inked > 1000, canvas
    assert "validation macro AUROC" in page.inner_text("#model-summary")
    shot = Path(os.environ.get("MSSSM_SCREENSHOT", tmp_path / "monitor.png"))
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    assert not errors, errors


def test_an_uploaded_wfdb_record_plays_on_the_rhythm_model(browser, page_server):
    page, errors = open_page(browser, page_server)
    page.select_option("#model-select", "rhythm")
    page.set_input_files("#upload", [str(FIXTURES / "00002_lr.hea"), str(FIXTURES / "00002_lr.dat")])
    page.wait_for_function("window.monitor.source.name === '00002_lr'")
    play_and_wait(page, windows=1)
    import wfdb

    signal, fields = wfdb.rdsamp(str(FIXTURES / "00002_lr"))
    expected = classify(page_server, {"signal": np.nan_to_num(signal).tolist(),
                                      "leads": fields["sig_name"]}, "rhythm")
    (shown,) = shown_windows(page)
    assert np.abs(np.array(shown["shown"]) - np.array(expected["windows"][0]["probabilities"])).max() <= 1.5e-4
    assert shown["predicted"] == [expected["labels"][int(np.argmax(expected["probabilities"]))]] or \
        set(shown["predicted"]) == set(expected["predicted"])
    assert page.evaluate("window.monitor.predictions[0].model") == "rhythm"
    assert not errors, errors


def test_an_uploaded_two_lead_npy_at_360_hz(browser, page_server, tmp_path):
    """A Holter-like source: leads II and V1 at 360 Hz, as .npy, on the lead-subset model; then the same file on
    the 12-lead model, which refuses it and the page says why."""
    from scipy.signal import resample_poly

    import wfdb

    signal, _ = wfdb.rdsamp(str(FIXTURES / "00001_lr"))
    holter = resample_poly(np.nan_to_num(signal[:, [1, 6]]), 18, 5, axis=0).astype(np.float32)  # 3,600 samples
    path = tmp_path / "holter.npy"
    np.save(path, holter)
    page, errors = open_page(browser, page_server)
    page.select_option("#model-select", "rhythm")
    page.fill("#upload-rate", "360")
    page.fill("#upload-leads", "MLII, V1")
    page.set_input_files("#upload", str(path))
    page.wait_for_function("window.monitor.source.name === 'holter.npy'")
    play_and_wait(page, windows=1)
    expected = classify(page_server, {"signal": holter.tolist(), "sample_rate": 360, "leads": ["MLII", "V1"]},
                        "rhythm")
    (shown,) = shown_windows(page)
    assert np.abs(np.array(shown["shown"]) - np.array(expected["windows"][0]["probabilities"])).max() <= 1.5e-4

    page.select_option("#model-select", "default")
    page.click("#play")
    page.wait_for_function("document.querySelector('#connection').dataset.state === 'error'", timeout=30_000)
    assert "1007" in page.inner_text("#connection")
    assert "V2" in page.inner_text("#errors")  # names leads the 12-lead model needs
    assert not errors, errors


def test_an_uploaded_csv_with_lead_names_plays_on_the_default_model(browser, page_server, tmp_path):
    record = json.loads((RECORDS / "ptbxl_00022.json").read_text())
    order = [5, 0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]  # the columns in another order: the header names them
    path = tmp_path / "record.csv"
    path.write_text(",".join(record["leads"][i].lower() for i in order) + "\n"
                    + "\n".join(",".join(str(row[i]) for i in order) for row in record["signal"]) + "\n")
    page, errors = open_page(browser, page_server)
    page.set_input_files("#upload", str(path))
    page.wait_for_function("window.monitor.source.name === 'record.csv'")
    assert "100 Hz" in page.inner_text("#source-info")  # no rate in a CSV: the model's
    play_and_wait(page, windows=1)
    expected = classify(page_server, {"signal": record["signal"], "leads": record["leads"]}, "default")
    (shown,) = shown_windows(page)
    assert np.abs(np.array(shown["shown"]) - np.array(expected["windows"][0]["probabilities"])).max() <= 1.5e-4
    assert not errors, errors
