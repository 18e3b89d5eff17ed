"""Export: checkpoint -> model.onnx that onnxruntime runs like the PyTorch model, and a truthful model.json."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from msssm_serve.export import export as exporter
from msssm_serve.checkpoint import load_checkpoint, save_checkpoint
from msssm_serve.config import ModelConfig
from msssm_serve.model import EnsembleClassifier, MSSSMClassifier, StreamingGraph
from msssm_serve.runtime import OnnxModel

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORDS = sorted((REPO_ROOT / "tests/fixtures/ptbxl/records100").glob("*/*.hea"))[:4]
LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
LABELS = ["NORM", "MI", "STTC", "CD", "HYP"]


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    """Real ECG windows [n, 1000, 12] (10 s at 100 Hz), in millivolts as the trainer reads them."""
    wfdb = pytest.importorskip("wfdb")
    if not RECORDS:
        pytest.skip("no PTB-XL fixture records under tests/fixtures/ptbxl/records100")
    signals = [wfdb.rdsamp(str(path.with_suffix("")))[0] for path in RECORDS]
    return torch.tensor(np.stack(signals), dtype=torch.float32)


def make_checkpoint(path: Path, windows: torch.Tensor, seed=0, **overrides) -> MSSSMClassifier:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"d_model": 16, "n_layers": 2, "d_state": 4, "n_classes": 5, **overrides})
    model = MSSSMClassifier(cfg).eval()
    # Non-trivial normalisation, so that the graph is seen to apply it.
    model.input_mean.normal_(0, 0.1)
    model.input_std.uniform_(0.5, 2.0)
    if cfg.template_length:
        model.template.normal_(0, 0.1)
        model.template_std.uniform_(0.5, 2.0)
    meta = {
        "labels": LABELS,
        "multi_label": cfg.multi_label,
        "sample_rate": 100,
        "leads": LEADS,
        "window": windows.shape[1],
        "task": "ptbxl",
        "data": {"dataset": "PTB-XL 1.0.3 (ptbxl_database.csv)", "licence": "CC BY 4.0"},
        "label_set": "superdiagnostic",
        "command": "python training/fit.py --task ptbxl --data-dir data/ptbxl",
        "validation": {"macro_auroc": 0.5, "epoch": 1},
        "parity_windows": windows,
    }
    save_checkpoint(path, model, meta)
    return model


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, windows):
    root = tmp_path_factory.mktemp("export")
    model = make_checkpoint(root / "checkpoint.pt", windows)
    desc = exporter.export_model(root / "checkpoint.pt", root / "model", name="tiny")
    return model, desc, root / "model"


def test_export_round_trips_within_tolerance(exported, windows):
    model, desc, out = exported
    assert json.loads((out / "model.json").read_text()) == desc
    parity = desc["parity"]
    assert parity["windows"] == len(windows) and parity["tolerance"] == 1e-4
    # What export recorded is what it measured: the whole-window run, redone here against the eager model.
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    state = model.zero_state(len(windows))
    feeds = {"x": windows.numpy(), **{n: s.numpy() for n, s in zip(desc["inputs"][1:], state)}}
    with torch.no_grad():
        expected = model.advance(windows, state)[0].numpy()
    measured = float(np.abs(session.run(["probabilities"], feeds)[0] - expected).max())
    assert measured <= 1e-4 and abs(parity["whole_window"] - measured) <= 1e-6, (parity["whole_window"], measured)
    assert max(parity["onnxruntime_consistency"].values()) <= 2e-4

    assert desc["name"] == "tiny" and desc["labels"] == LABELS and desc["leads"] == LEADS
    assert desc["window"] == 1000 and desc["default_hop"] == 25 and desc["max_chunk"] == 8**5
    assert desc["normalisation"]["std"] == pytest.approx(model.input_std.tolist())
    states = zip(desc["inputs"][1:], model.zero_state(1))  # the tensors the model itself starts a stream from
    assert desc["state"] == [{"name": n, "shape": list(s.shape[1:])} for n, s in states]
    assert desc["state_bytes_per_stream"] == 4 * sum(s.numel() for s in model.zero_state(1))
    assert desc["training"]["label_set"] == "superdiagnostic" and "parity_windows" not in desc["training"]
    assert desc["validation"] == {"macro_auroc": 0.5, "epoch": 1}
    assert desc["onnx"]["size_bytes"] == (out / "model.onnx").stat().st_size
    assert "CC BY 4.0" in (out / "README.md").read_text()
    # The graph carries its own description (less the file's hash and size, which it cannot contain).
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    embedded = json.loads(props["model.json"])
    assert embedded["parity"] == desc["parity"] and embedded["state"] == desc["state"]


def test_graph_io_names_and_dynamic_dims(exported):
    model, desc, out = exported
    graph = onnx.load(str(out / "model.onnx")).graph
    states = [n for n, _ in model.state_spec()]
    assert [i.name for i in graph.input] == ["x", *states] == desc["inputs"]
    assert [o.name for o in graph.output] == ["probabilities", *[f"{n}_out" for n in states],
                                              "scale_weights"] == desc["outputs"]
    assert dims(graph.input[0]) == ["batch", "T", 12]
    assert dims(graph.output[0]) == ["batch", "T", 5]
    assert dims(graph.output[-1]) == ["batch", "T", model.cfg.n_layers, model.cfg.n_ssm]
    for name, shape in model.state_spec():
        assert dims(next(i for i in graph.input if i.name == name)) == ["batch", *shape]
        assert dims(next(o for o in graph.output if o.name == f"{name}_out")) == ["batch", *shape]


def test_graph_takes_one_sample_and_more_than_max_chunk(exported):
    """The recurrence is an ONNX Scan: any T works; max_chunk only bounds the memory of one runtime call. Its body
    holds only what must be sequential (onnxruntime pays per op and step: export/lowering.py)."""
    model, desc, out = exported
    nodes = onnx.load(str(out / "model.onnx")).graph.node
    scans = [n for n in nodes if n.op_type == "Scan"]
    assert len(scans) == model.cfg.n_layers
    for scan in scans:
        body = next(a.g for a in scan.attribute if a.name == "body")
        assert sorted(n.op_type for n in body.node) == ["Add", "Identity", "Mul"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch, length in ((3, 1), (1, desc["max_chunk"] + 1)):
        x = torch.randn(batch, length, 12)
        state = model.zero_state(batch)
        feeds = {"x": x.numpy(), **{n: s.numpy() for n, s in zip(desc["inputs"][1:], state)}}
        probs = session.run(["probabilities"], feeds)[0]
        with torch.no_grad():
            expected = model.advance(x, state)[0].numpy()
        assert probs.shape == (batch, length, 5)
        assert np.abs(probs - expected).max() <= 1e-4


def test_the_scale_mixer_output_is_the_models_in_any_chunking(exported, windows):
    """The graph's scale_weights are the eager model's mixer weights E_t at every step, however the window is fed;
    export recorded the same check, and model.json describes the output."""
    model, desc, out = exported
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = windows[:2, :300]
    with torch.no_grad():
        _, _, expected = model.advance(x, model.zero_state(2), scale_weights=True)
    for chunks in ([300], [1] * 7 + [93, 200], [37, 263]):
        state, pieces, start = [s.numpy() for s in model.zero_state(2)], [], 0
        for size in chunks:
            feeds = {"x": x[:, start : start + size].numpy(), **dict(zip(desc["inputs"][1:], state))}
            _, *state, weights = session.run(desc["outputs"], feeds)
            pieces.append(weights)
            start += size
        got = np.concatenate(pieces, axis=1)
        assert got.shape == (2, 300, model.cfg.n_layers, model.cfg.n_ssm)
        assert np.abs(got - expected.numpy()).max() <= 1e-4 * max(1.0, float(expected.abs().max()))
    S = model.cfg.n_scales
    assert desc["scale_weights"]["scales"] == ["raw", *(f"detail {s}" for s in range(1, S + 1)), "coarse"]
    assert desc["scale_weights"]["layers"] == model.cfg.n_layers


@pytest.mark.parametrize("overrides", [{"ssm": "s4"}, {"n_scales": 0}, {"multi_label": False},
                                       {"template_length": 600},  # windows of 1,000: past the template too
                                       {"pool": "mean_std"}, {"pool": "mean_std_extrema"}])
def test_variants_export(tmp_path, windows, overrides):
    model = make_checkpoint(tmp_path / "checkpoint.pt", windows[:2], **overrides)
    desc = exporter.export_model(tmp_path / "checkpoint.pt", tmp_path / "model")
    assert desc["config"] == {**desc["config"], **overrides}
    graph = tmp_path / "model" / "model.onnx"
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    state = model.zero_state(2)
    feeds = {"x": windows[:2].numpy(), **{n: s.numpy() for n, s in zip(desc["inputs"][1:], state)}}
    with torch.no_grad():
        expected = model.advance(windows[:2], state)[0].numpy()
    assert np.abs(session.run(["probabilities"], feeds)[0] - expected).max() <= 1e-4
    assert desc["normalisation"].get("template_length", 0) == overrides.get("template_length", 0)
    # a plain SSM (no scales) has no mixer, so the graph has no scale_weights output
    outputs = [o.name for o in onnx.load(str(graph)).graph.output]
    assert ("scale_weights" in outputs) == (overrides.get("n_scales", 3) > 0) == ("scale_weights" in desc)


def test_an_ensemble_exports_as_one_graph_with_each_members_state(tmp_path, windows):
    members = [make_checkpoint(tmp_path / f"member{k}.pt", windows[:2], seed=k) for k in range(2)]
    meta = load_checkpoint(tmp_path / "member0.pt")[1]
    save_checkpoint(tmp_path / "checkpoint.pt", EnsembleClassifier(members),
                    {**meta, "ensemble": {"members": 2, "seeds": [0, 1], "combined": "mean"}})
    desc = exporter.export_model(tmp_path / "checkpoint.pt", tmp_path / "model")
    assert desc["ensemble"]["members"] == 2 and "ensemble" not in desc["training"]
    assert [s["name"] for s in desc["state"]] == [f"m{k}_{n}" for k in range(2) for n, _ in members[0].state_spec()]
    assert desc["state_bytes_per_stream"] == 2 * 4 * sum(int(np.prod(shape)) for _, shape in members[0].state_spec())
    assert max(desc["parity"][k] for k in ("whole_window", "sample_by_sample", "random_chunks")) <= 1e-4
    assert "An ensemble of 2 models of this configuration (seeds 0, 1)" in (tmp_path / "model" / "README.md").read_text()
    # a checkpoint whose meta says nothing of the ensemble is still described as one
    save_checkpoint(tmp_path / "bare.pt", EnsembleClassifier(members), meta)
    assert exporter.export_model(tmp_path / "bare.pt", tmp_path / "bare")["ensemble"] == {"members": 2}
    # served by the runtime as any model: the mean of what each member's own graph answers
    for k in range(2):
        exporter.export_model(tmp_path / f"member{k}.pt", tmp_path / f"alone{k}")
    served = OnnxModel(tmp_path / "model")
    got = served.advance(windows[:2].numpy(), served.zero_state(2))[0]
    alone = [OnnxModel(tmp_path / f"alone{k}") for k in range(2)]
    expected = np.mean([m.advance(windows[:2].numpy(), m.zero_state(2))[0] for m in alone], axis=0)
    np.testing.assert_allclose(got, expected, atol=1e-5)


class SkewedGraph(StreamingGraph):
    """An export bug stand-in: the traced graph is slightly off from the eager model."""

    def forward(self, x, *state):
        probs, *new_state = super().forward(x, *state)
        return (probs * 0.999, *new_state)


def test_parity_violation_fails_and_installs_nothing(tmp_path, windows, monkeypatch, capsys):
    make_checkpoint(tmp_path / "checkpoint.pt", windows[:2])
    monkeypatch.setattr(exporter, "StreamingGraph", SkewedGraph)
    code = exporter.main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "model")])
    assert code == 1
    assert "disagrees with the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no staging left behind


def test_checkpoint_without_parity_windows_is_refused(tmp_path, windows):
    model = make_checkpoint(tmp_path / "checkpoint.pt", windows[:1])
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del payload["meta"]["parity_windows"]
    save_checkpoint(tmp_path / "checkpoint.pt", model, payload["meta"])
    with pytest.raises(exporter.ExportError, match="parity_windows"):
        exporter.export_model(tmp_path / "checkpoint.pt", tmp_path / "model")


def test_cli(tmp_path, windows):
    make_checkpoint(tmp_path / "checkpoint.pt", windows[:2])
    out = tmp_path / "model"
    cmd = [sys.executable, "export/export.py", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--out", str(out)]
    done = subprocess.run([*cmd, "--opset", "18"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    desc = json.loads((out / "model.json").read_text())
    # named after task, label set and run (the checkpoint's directory), so two exports can be told apart
    assert desc["onnx"]["opset"] == 18 and desc["name"] == f"msssm-s6-ptbxl-superdiagnostic-{tmp_path.name}"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.json", "model.onnx"]
    assert "SelectiveScan" not in done.stderr  # no spurious shape-inference warnings
    before = (out / "model.onnx").read_bytes()
    again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "--force" in again.stderr and (out / "model.onnx").read_bytes() == before
    forced = subprocess.run([*cmd, "--force", "--name", "mine"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    assert forced.returncode == 0 and json.loads((out / "model.json").read_text())["name"] == "mine"
