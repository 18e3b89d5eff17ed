"""Streams from real devices: lead subsets and names, several models on one server (issue: any rate, any lead
subset, several models). Real PTB-XL fixture records throughout."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect

from msssm_serve.leads import LeadError, LeadMap
from msssm_serve.runtime import OnnxModel

from conftest import LEADS, RHYTHM_LABELS
from test_server import closing, post_json


def with_only(signal_: np.ndarray, keep: list[int]) -> np.ndarray:
    """The model-order signal with every lead but `keep` missing (NaN), as the server builds it."""
    out = np.full_like(signal_, np.nan)
    out[:, keep] = signal_[:, keep]
    return out


# --- names and subsets ---------------------------------------------------------------------------------------------
def test_lead_names_are_matched_case_insensitively_and_through_aliases():
    lead_map = LeadMap(["MLII", "v1", "avr"], LEADS, lead_subsets=True)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = lead_map(x)
    assert out.shape == (2, 12)
    np.testing.assert_array_equal(out[:, 1], x[:, 0])  # MLII -> II
    np.testing.assert_array_equal(out[:, 6], x[:, 1])  # v1 -> V1
    np.testing.assert_array_equal(out[:, 3], x[:, 2])  # avr -> aVR
    assert np.isnan(out[:, [0, 2, 4, 5, 7, 8, 9, 10, 11]]).all()
    assert lead_map.missing == [n for i, n in enumerate(LEADS) if i not in (1, 3, 6)]


def test_a_model_without_lead_subsets_names_the_leads_it_misses():
    with pytest.raises(LeadError, match=r"missing: \['V5', 'V6'\]"):
        LeadMap(LEADS[:10], LEADS, lead_subsets=False)
    with pytest.raises(LeadError, match=r"unknown: \['V7'\]"):
        LeadMap(["II", "V7"], LEADS, lead_subsets=True)
    with pytest.raises(LeadError, match=r"named twice: \['II', 'MLII'\]"):
        LeadMap(["II", "MLII"], LEADS, lead_subsets=True)
    assert LeadMap(None, LEADS, lead_subsets=False).identity


def test_classify_names_missing_leads(server, records):
    r = post_json(server.url, records[0][:, :8], leads=LEADS[:8])
    assert r.status_code == 422 and "V3" in r.json()["detail"] and "V6" in r.json()["detail"]
    r = post_json(server.url, records[0][:, :8])  # no names: the columns are taken to be the model's 12
    assert r.status_code == 422 and "name them in 'leads'" in r.json()["detail"]


# --- several models --------------------------------------------------------------------------------------------------
def test_models_lists_every_model_with_its_leads_rates_and_state(multi_server, model_dir, subset_model_dir):
    body = httpx.get(multi_server.url + "/models").json()
    assert body["default"] == "default"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"default", "rhythm"}
    assert by_name["rhythm"]["labels"] == RHYTHM_LABELS and by_name["rhythm"]["lead_subsets"] is True
    assert by_name["default"]["lead_subsets"] is False
    for name, path in (("default", model_dir), ("rhythm", subset_model_dir)):
        model = OnnxModel(path, threads=1)
        assert by_name[name]["state_bytes"] == model.state_bytes and by_name[name]["sample_rate"] == 100
    assert httpx.get(multi_server.url + "/model", params={"model": "rhythm"}).json()["labels"] == RHYTHM_LABELS


@pytest.mark.parametrize("leads, columns", [(["MLII", "V1"], [1, 6]), (["II"], [1]), (["I", "II"], [0, 1])])
def test_classify_a_lead_subset_on_the_subset_model(multi_server, rhythm, records, leads, columns):
    signal_ = records[1]
    r = httpx.post(multi_server.url + "/classify", params={"model": "rhythm"}, timeout=30,
                   json={"signal": signal_[:, columns].tolist(), "leads": leads})
    assert r.status_code == 200, r.text
    expected = rhythm.classify(with_only(signal_, columns))["probabilities"]
    np.testing.assert_allclose(r.json()["probabilities"], expected, atol=1e-5)
    assert r.json()["labels"] == RHYTHM_LABELS
    # the same subset on the 12-lead default model is refused, naming what it needs
    r = httpx.post(multi_server.url + "/classify", timeout=30,
                   json={"signal": signal_[:, columns].tolist(), "leads": leads})
    assert r.status_code == 422 and "missing" in r.json()["detail"]


def test_classify_an_unknown_model_is_404_naming_the_models(multi_server, records):
    r = httpx.post(multi_server.url + "/classify", params={"model": "nope"}, json={"signal": records[0].tolist()})
    assert r.status_code == 404 and "default" in r.json()["detail"] and "rhythm" in r.json()["detail"]


async def stream_all(url, config, signal_, frame=137, model_samples=None):
    """Send the config and the signal in frames; -> (config reply, prediction messages by model)."""
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps(config))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "config", reply
        for start in range(0, len(signal_), frame):
            await ws.send(signal_[start : start + frame].astype("<f4").tobytes())
        n_models = len(config.get("models", [1]))
        expected = n_models * ((model_samples or len(signal_)) // config.get("hop", 25))
        messages = [json.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(expected)]
    by_model: dict[str, list] = {}
    for m in messages:
        assert m["type"] == "prediction", m
        by_model.setdefault(m["model"], []).append(m)
    return reply, by_model


def test_one_stream_to_two_models_equals_classify_of_each(multi_server, rhythm, model_dir, records):
    signal_ = np.concatenate([records[2], records[3]])  # two windows
    reply, by_model = asyncio.run(stream_all(multi_server.ws_url, {"models": ["default", "rhythm"], "hop": 100},
                                             signal_))
    assert [m["model"] for m in reply["models"]] == ["default", "rhythm"]
    default = OnnxModel(model_dir, threads=1)
    for name, model in (("default", default), ("rhythm", rhythm)):
        finals = [m for m in by_model[name] if m["final"]]
        assert [m["window"] for m in finals] == [0, 1]
        for m in finals:
            window = signal_[m["window"] * 1000 : (m["window"] + 1) * 1000]
            np.testing.assert_allclose(m["probabilities"], model.classify(window)["probabilities"], atol=1e-4)


@pytest.mark.parametrize("leads, columns", [(["MLII", "V1"], [1, 6]), (["II"], [1])])
def test_a_two_lead_and_a_one_lead_stream_on_the_subset_model(multi_server, rhythm, records, leads, columns):
    signal_ = records[0]
    reply, by_model = asyncio.run(stream_all(multi_server.ws_url, {"model": "rhythm", "leads": leads, "hop": 50},
                                             signal_[:, columns]))
    assert reply["model"] == "rhythm" and reply["models"][0]["missing_leads"] == \
        [n for i, n in enumerate(LEADS) if i not in columns]
    (final,) = [m for m in by_model["rhythm"] if m["final"]]
    expected = rhythm.classify(with_only(signal_, columns))["probabilities"]
    np.testing.assert_allclose(final["probabilities"], expected, atol=1e-4)
    # and every partial prediction is the window's first t samples
    ref = rhythm.advance(with_only(signal_, columns)[None], rhythm.zero_state(1))[0][0]
    for m in by_model["rhythm"]:
        np.testing.assert_allclose(m["probabilities"], ref[m["t"] - 1], atol=1e-4)


@pytest.mark.parametrize("config, fragment", [
    ({"model": "nope"}, "no model named"),
    ({"models": ["default", "default"]}, "distinct"),
    ({"model": "default", "models": ["rhythm"]}, "not both"),
    ({"model": "rhythm", "leads": ["II", "V7"]}, "unknown: ['V7']"),
    ({"model": "default", "leads": ["II"]}, "missing"),
    ({"models": ["rhythm", "default"], "leads": ["I", "II"]}, "missing"),
])
def test_stream_config_errors_close_1007(multi_server, config, fragment):
    received, code = asyncio.run(closing(multi_server.ws_url, [json.dumps(config)]))
    assert code == 1007 and fragment in received[-1]["detail"], received


# --- device rates ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [360, 500, 128, 257.3, 50])
def test_the_streaming_resampler_is_resample_poly_per_window_whatever_the_frames(rate):
    from scipy.signal import resample_poly

    from msssm_serve.resample import WindowResampler, resample_recording

    rng = np.random.default_rng(0)
    resampler = WindowResampler(rate, 100, 1000, 3)
    w = resampler.device_window
    x = rng.standard_normal((2 * w + w // 3, 3)).astype(np.float32)
    pieces, start = [], 0
    for size in (rng.integers(1, 700, 1000)):
        if start >= len(x):
            break
        pieces.append(resampler.push(x[start : start + size]))
        start += size
    streamed = np.concatenate(pieces + [resampler.finish()])
    np.testing.assert_array_equal(streamed, resample_recording(x, rate, 100, 1000))  # frames change nothing
    reference = np.concatenate([resample_poly(x[s : s + w], resampler.up, resampler.down, axis=0)
                                for s in range(0, len(x), w)])
    np.testing.assert_allclose(streamed, reference, atol=1e-5)
    assert len(streamed[:2000]) == 2000 and resampler.delay_seconds <= 0.21


def device_signal(records, rate: int) -> np.ndarray:
    """Two real windows at a device's rate (PTB-XL's 100 Hz resampled up, as a 360 or 500 Hz device records)."""
    from scipy.signal import resample_poly

    x = np.concatenate([records[0], records[1]])
    return resample_poly(x, rate, 100, axis=0).astype(np.float32)


@pytest.mark.parametrize("rate", [360, 500])
def test_a_stream_at_a_device_rate_equals_classify_at_that_rate(server, model_dir, records, rate):
    signal_ = device_signal(records, rate)
    windows = []
    for k in range(2):
        part = signal_[k * rate * 10 : (k + 1) * rate * 10]
        r = httpx.post(server.url + "/classify", timeout=30,
                       json={"signal": part.tolist(), "sample_rate": rate, "leads": LEADS})
        assert r.status_code == 200 and r.json()["samples"] == 1000, r.text
        windows.append(r.json()["probabilities"])
    whole = httpx.post(server.url + "/classify", timeout=30, json={"signal": signal_.tolist(), "sample_rate": rate})
    assert [w["start"] for w in whole.json()["windows"]] == [0, 1000]  # windows in model-rate samples

    async def run():
        async with connect(server.ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"sample_rate": rate, "hop": 100}))
            reply = json.loads(await ws.recv())
            assert reply["device_rate"] == rate and reply["models"][0]["device_window"] == 10 * rate
            sizes, start, i = [1, 333, 77, 2048, 5], 0, 0
            while start < len(signal_):
                await ws.send(signal_[start : start + sizes[i % 5]].astype("<f4").tobytes())
                start += sizes[i % 5]
                i += 1
            return [json.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(20)]

    messages = asyncio.run(run())
    finals = [m for m in messages if m["final"]]
    assert [m["window"] for m in finals] == [0, 1]
    for m, expected in zip(finals, windows):
        np.testing.assert_allclose(m["probabilities"], expected, atol=1e-4)
        np.testing.assert_allclose(m["probabilities"], whole.json()["windows"][m["window"]]["probabilities"],
                                   atol=1e-4)


def test_a_two_lead_360_hz_holter_stream_on_the_subset_model(multi_server, records):
    """MIT-BIH's layout: MLII + V1 at 360 Hz, into the rhythm model at 100 Hz."""
    signal_ = device_signal(records, 360)[:, [1, 6]]
    expected = httpx.post(multi_server.url + "/classify", params={"model": "rhythm"}, timeout=30,
                          json={"signal": signal_[:3600].tolist(), "sample_rate": 360, "leads": ["MLII", "V1"]})
    assert expected.status_code == 200, expected.text
    reply, by_model = asyncio.run(stream_all(multi_server.ws_url, {"model": "rhythm", "leads": ["MLII", "V1"],
                                                                   "sample_rate": 360, "hop": 250}, signal_[:3600],
                                             model_samples=1000))
    (final,) = [m for m in by_model["rhythm"] if m["final"]]
    np.testing.assert_allclose(final["probabilities"], expected.json()["probabilities"], atol=1e-4)


# --- ADC counts ------------------------------------------------------------------------------------------------------
def test_int16_counts_with_a_gain_read_as_the_same_millivolts(server, model_dir, records):
    gain = 200.0  # counts per mV, as PTB-XL's own ADC
    counts = np.round(records[0] * gain).astype("<i2")
    as_mv = counts.astype(np.float32) / np.float32(gain)
    model = OnnxModel(model_dir, threads=1)
    expected = model.classify(as_mv)["probabilities"]
    r = httpx.post(server.url + "/classify", content=counts.tobytes(), timeout=30,
                   params={"channels": 12, "dtype": "int16", "gain": gain},
                   headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["probabilities"], expected, atol=1e-5)

    async def run():
        async with connect(server.ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"dtype": "int16", "gain": gain, "hop": 500}))
            assert json.loads(await ws.recv())["dtype"] == "int16"
            for start in range(0, 1000, 250):
                await ws.send(counts[start : start + 250].tobytes())
            return [json.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(2)]

    final = asyncio.run(run())[-1]
    assert final["final"]
    np.testing.assert_allclose(final["probabilities"], expected, atol=1e-4)


@pytest.mark.parametrize("config, fragment", [
    ({"dtype": "int16"}, "needs 'gain'"),
    ({"dtype": "int16", "gain": 0}, "positive"),
    ({"dtype": "float64"}, "must be one of"),
    ({"gain": 200}, "goes with"),
])
def test_a_binary_format_that_cannot_be_read_is_refused(server, config, fragment):
    received, code = asyncio.run(closing(server.ws_url, [json.dumps(config)]))
    assert code == 1007 and fragment in received[-1]["detail"], received


def test_classify_flags_a_signal_below_the_documented_minimum(server, records):
    r = post_json(server.url, records[0][:3])
    assert r.status_code == 200 and r.json()["too_short"] is True and "minimum of 100" in r.json()["warning"]
    r = post_json(server.url, records[0][:100])
    assert r.json()["too_short"] is False and "warning" not in r.json()


# --- the bundled models --------------------------------------------------------------------------------------------
def test_the_bundled_rhythm_model_takes_lead_subsets_and_tells_sinus_rhythm_apart():
    """models/rhythm on the real fixture records (of every fold; a behaviour check, not its validation figure):
    sinus rhythm is ranked above the other rhythms from 12 leads, from I + II and from lead II alone."""
    import csv

    import wfdb
    from sklearn.metrics import roc_auc_score

    from conftest import RECORDS, REPO_ROOT

    model = OnnxModel(REPO_ROOT / "models/rhythm", threads=1)
    assert model.lead_subsets and model.sample_rate == 100 and "SR" in model.labels
    with open(REPO_ROOT / "tests/fixtures/ptbxl/labels/rhythm.csv") as f:
        table = {row["filename_lr"].split("/")[-1]: row for row in csv.DictReader(f)}
    chosen = [p for p in RECORDS if p.stem in table]
    sinus = np.array([table[p.stem]["SR"] == "1" for p in chosen])
    x = np.stack([wfdb.rdsamp(str(p.with_suffix("")))[0] for p in chosen]).astype(np.float32)
    assert sinus.sum() >= 10 and (~sinus).sum() >= 2  # 29 in sinus rhythm, SBRAD and one other
    sr = model.labels.index("SR")
    for keep in (list(range(12)), [0, 1], [1]):
        scores = np.array([model.classify(with_only(r, keep))["probabilities"][sr] for r in x])
        assert roc_auc_score(sinus, scores) > 0.7 and (scores[sinus] > 0.5).mean() > 0.8, (keep, scores)
