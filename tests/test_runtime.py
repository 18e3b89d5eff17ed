"""The torch-free runtime: streams in random frame sizes equal whole-window classification; bad model dirs."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from msssm_serve.runtime import ModelDirError, OnnxModel, Stream

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(model_dir):
    return OnnxModel(model_dir, threads=1)


def test_stream_in_random_frames_equals_classify_of_each_window_and_prefix(model, records):
    signal = records.reshape(-1, records.shape[-1])[: 3 * model.window + 321]  # 3 whole windows and a partial one
    rng = np.random.default_rng(0)
    stream = Stream(model, hop=25)
    predictions, start = [], 0
    while start < len(signal):
        size = int(rng.choice([1, 3, 25, 64, 333, 1000, 2500]))
        predictions += stream.push(signal[start : start + size])
        start += size
    predictions += stream.flush()
    finals = [p for p in predictions if p.final]
    assert [p.window for p in finals] == [0, 1, 2]
    whole = model.classify(signal)
    assert len(whole["windows"]) == 4
    for p, w in zip(finals, whole["windows"]):
        assert np.abs(p.probabilities - w["probabilities"]).max() <= 1e-4
    partial = predictions[-1]
    assert (partial.window, partial.t, partial.final) == (3, 321, False)
    assert np.abs(partial.probabilities - whole["windows"][3]["probabilities"]).max() <= 1e-4
    # every intermediate prediction is the classifier on that window's first t samples
    hops = [p for p in predictions if p.window == 1 and not p.final]
    assert [p.t for p in hops] == list(range(25, model.window, 25))
    for p in hops[::7]:
        prefix = signal[model.window : model.window + p.t]
        assert np.abs(p.probabilities - model.classify(prefix)["probabilities"]).max() <= 1e-4


def test_advance_streams_batches_streams_at_different_positions(model, records):
    x = records[:3]
    states, segments, expected = [], [], []
    for i, offset in enumerate([0, 100, 475]):
        _, st = model.advance(x[i : i + 1, :offset], model.zero_state(1)) if offset else (None, model.zero_state(1))
        states.append(st)
        segments.append(x[i, offset : offset + 50])
        expected.append(model.advance(x[i : i + 1, : offset + 50], model.zero_state(1))[0][0, -50:])
    for (probs, _), want in zip(model.advance_streams(segments, states), expected):
        assert np.abs(probs - want).max() <= 1e-4


def test_pooled_streams_advance_as_their_own_states_do(model, records):
    """The server's primitive: states kept as rows of a StatePool (blocks of 2 rows here, so one call spans blocks,
    and rows handed out out of order) give the same probabilities and new states as streams with their own."""
    from msssm_serve.runtime import StatePool

    x = records[:3]
    states, segments = [], []
    for i, (offset, length) in enumerate([(0, 50), (100, 50), (475, 25), (30, 50)]):
        _, st = model.advance(x[i % 3 : i % 3 + 1, :offset], model.zero_state(1)) if offset else (None, model.zero_state(1))
        states.append(st)
        segments.append(x[i % 3, offset : offset + length])
    pool = StatePool(model, block_rows=2)
    spare = pool.acquire()  # row 0; the streams' rows are then 1..4, in three blocks
    slots = [0] * 4
    for i in (3, 1, 2, 0):  # rows not in the streams' order
        slots[i] = pool.acquire(states[i])
    pooled = model.advance_pooled(segments, pool, slots)
    own = model.advance_streams(segments, states)
    for (probs, new_state), (want, want_state), slot in zip(pooled, own, slots):
        assert new_state is None and np.abs(probs - want).max() <= 1e-6
        for got, value in zip(pool.row(slot), want_state):
            assert np.abs(got - value).max() <= 1e-6
    assert all(not row.any() for row in pool.row(spare))  # a row no call named is untouched
    # a row given back and handed out again starts from the zero state, or from the state it is handed
    pool.release(slots[0])
    again = pool.acquire()
    assert again == slots[0] and all(not row.any() for row in pool.row(again))


def test_a_stream_moves_its_state_into_a_pool_and_out_again(model, records):
    from msssm_serve.runtime import StatePool, Stream

    pool = StatePool(model, block_rows=4)
    alone, pooled = Stream(model, hop=25), Stream(model, hop=25)
    alone.push(records[0][:60])
    pooled.push(records[0][:10])
    pooled.use_pool(pool)  # mid-window: the state it had goes with it
    pooled.feed(records[0][10:60])
    while n := pooled.next_segment_length():
        segment = pooled.take(n)
        (result,) = model.advance_pooled([segment], pool, [pooled.slot])
        pooled.apply(*result)
    assert pooled.t == alone.t == 50
    for got, want in zip(pooled.state, alone.state):
        assert np.abs(got - want).max() <= 1e-6
    slot = pooled.slot
    pooled.leave_pool()
    assert pooled.slot is None and pool.acquire() == slot  # the row is free again; the stream keeps its state
    for got, want in zip(pooled.state, alone.state):
        assert np.abs(got - want).max() <= 1e-6


def test_long_input_is_split_at_max_chunk(model, records):
    x = np.tile(records[:1], (1, 40, 1))[:, : model.max_chunk + 500]
    probs, state = model.advance(x, model.zero_state(1))
    assert probs.shape == (1, model.max_chunk + 500, len(model.labels))
    assert float(state[-1][0, 0]) == model.max_chunk + 500


def test_advance_in_blocks_equals_one_call(model, records):
    """advance cuts a batch into calls of ROWS_PER_CALL rows and about SAMPLES_PER_CALL samples; the cut is exact."""
    from msssm_serve.runtime import ROWS_PER_CALL, SAMPLES_PER_CALL

    rows, length = ROWS_PER_CALL + 5, SAMPLES_PER_CALL + 300
    x = np.tile(records, (rows // len(records) + 1, 1, 1))[:rows, :length]
    x = x + np.random.default_rng(0).normal(0, 0.05, x.shape).astype(np.float32)  # distinct rows
    probs, state = model.advance(x, model.zero_state(rows))
    feeds = {"x": x, **dict(zip(model.state_names, model.zero_state(rows)))}
    want, *want_state = model.session.run(model.output_names, feeds)
    assert probs.shape == want.shape
    assert np.abs(probs - want).max() <= 1e-5
    for got, ref in zip(state, want_state):
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_runtime_imports_without_torch():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'): raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import msssm_serve.runtime, server.app\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case", ["missing_onnx", "corrupt_onnx", "missing_json", "corrupt_json", "json_lacks_keys"])
def test_bad_model_directory_names_the_file(model_dir, tmp_path, case):
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    target = broken / ("model.onnx" if "onnx" in case else "model.json")
    if case.startswith("missing"):
        target.unlink()
    elif case == "json_lacks_keys":
        target.write_text('{"name": "x"}')
    else:
        target.write_bytes(b"\x08\x01not a model{")
    with pytest.raises(ModelDirError, match=target.name):
        OnnxModel(broken)
