"""Export a trained checkpoint to a model directory: model.onnx + model.json + README.md.

    python export/export.py --checkpoint RUN_DIR/checkpoint.pt --out MODEL_DIR [--opset N] [--name NAME]

The graph is `StreamingGraph` traced by the TorchScript ONNX exporter: (x, *state) -> (probabilities, *new_state),
batch and T dynamic, the recurrence of each layer one ONNX Scan (export/lowering.py). Nothing is written unless onnxruntime reproduces the PyTorch model on the checkpoint's real
windows (whole window, sample by sample, random chunks) within `TOLERANCE`; the files are built in a temporary
directory and moved into MODEL_DIR only then, model.json last, so a model.json always describes a checked graph.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Runnable as `python export/export.py` from the repository root: the package lives one level up.

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

import msssm_serve
from msssm_serve.checkpoint import CheckpointError, load_checkpoint
from msssm_serve.model import Classifier, EnsembleClassifier, StreamingGraph
from msssm_serve.runtime import SCALE_WEIGHT_SUMMARY
from msssm_serve.export.card import model_card
from msssm_serve.export.meta import jsonable as _jsonable
from msssm_serve.export.lowering import expand_softplus, lower_selective_scans

DEFAULT_OPSET = 17
DEFAULT_HOP = 25
TOLERANCE = 1e-4  # max abs probability difference, ONNX Runtime vs eager PyTorch
CHUNK_SIZES = (1, 2, 3, 7, 25, 64, 100, 333, 999)
CHUNK_SEED = 0
# Meta fields that model.json carries at its top level (or not at all), so `training` leaves them out.
TOP_LEVEL_META = ("labels", "multi_label", "sample_rate", "leads", "window", "default_hop", "validation", "name",
                  "ensemble")


class ExportError(Exception):
    pass


# --- the graph -----------------------------------------------------------------------------------------------------
def _io_names(model: Classifier) -> tuple[list[str], list[str]]:
    states = [name for name, _ in model.state_spec()]
    scale_weights = ["scale_weights"] if model.cfg.n_scales > 0 else []  # see StreamingGraph
    return ["x", *states], ["probabilities", *[f"{name}_out" for name in states], *scale_weights]


def scale_names(n_scales: int) -> list[str]:
    """The scale mixer's sequences, in the order of its weights: the raw input, details 1..S, the coarse trend."""
    return ["raw", *(f"detail {s}" for s in range(1, n_scales + 1)), "coarse"]


def _trace(model: Classifier, path: Path, opset: int) -> None:
    """TorchScript exporter: it traces the model with one `msssm::SelectiveScan` placeholder per layer (lowered to an
    ONNX Scan afterwards) in a second or two and keeps batch and T dynamic. (The dynamo exporter's own `scan`
    support failed on this model in torch 2.13 and takes ~40x longer to trace.)"""
    inputs, outputs = _io_names(model)
    per_step = {"x", "probabilities", "scale_weights"}
    dynamic_axes = {name: {0: "batch", 1: "T"} for name in inputs + outputs if name in per_step}
    dynamic_axes.update({name: {0: "batch"} for name in inputs + outputs if name not in per_step})
    # An odd T, neither 1 nor a multiple of the scan block, so no padding or slicing can be traced away as a no-op.
    example = (torch.zeros(2, 37, model.cfg.n_channels), *model.zero_state(2))
    with warnings.catch_warnings():
        # The exporter announces its own deprecation in favour of dynamo; we chose it knowingly (see above).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            StreamingGraph(model).eval(),
            example,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
            custom_opsets={"msssm": 1},
        )


def _declare_output_shapes(graph_model: onnx.ModelProto, model: Classifier) -> None:
    """The tracer cannot see through the scan placeholders, so it leaves the outputs' fixed dims symbolic: the
    classes of `probabilities`, the layers and scales of `scale_weights` and every non-batch dim of the new states.
    They are constants, so say so."""
    cfg = model.cfg
    shapes = {f"{name}_out": shape for name, shape in model.state_spec()}
    per_step = {"probabilities": {2: cfg.n_classes}, "scale_weights": {2: cfg.n_layers, 3: cfg.n_ssm}}
    for output in graph_model.graph.output:
        dims = output.type.tensor_type.shape.dim
        fixed = per_step.get(output.name) or dict(enumerate(shapes.get(output.name, ()), 1))
        for axis, size in fixed.items():
            dims[axis].Clear()
            dims[axis].dim_value = size


# --- parity --------------------------------------------------------------------------------------------------------
def _random_chunks(total: int) -> list[int]:
    rng = np.random.default_rng(CHUNK_SEED)
    chunks: list[int] = []
    while sum(chunks) < total:
        chunks.append(int(rng.choice(CHUNK_SIZES)))
    chunks[-1] -= sum(chunks) - total
    return chunks


def parity_schedules(length: int) -> dict[str, list[int]]:
    """The chunkings every parity check feeds a window of `length` samples in."""
    return {"whole_window": [length], "sample_by_sample": [1] * length, "random_chunks": _random_chunks(length)}


def _run_torch(model: Classifier, windows: torch.Tensor, chunks: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (probabilities [n, T, K], scale-mixer weights [n, T, layers, S+2] or None), fed in `chunks`."""
    state = model.zero_state(windows.shape[0])
    pieces, weight_pieces, start = [], [], 0
    with torch.no_grad():
        for size in chunks:
            probs, state, weights = model.advance(windows[:, start : start + size], state, scale_weights=True)
            pieces.append(probs)
            weight_pieces.append(weights)
            start += size
    weights = None if weight_pieces[0] is None else torch.cat(weight_pieces, dim=1).numpy()
    return torch.cat(pieces, dim=1).numpy(), weights


def _run_onnx(session: ort.InferenceSession, model: Classifier, windows: np.ndarray, chunks: list[int]):
    """As `_run_torch`, by the exported graph."""
    inputs, outputs = _io_names(model)
    n_state = len(inputs) - 1
    state = [s.numpy() for s in model.zero_state(windows.shape[0])]
    pieces, weight_pieces, start = [], [], 0
    for size in chunks:
        probs, *rest = session.run(outputs, {"x": windows[:, start : start + size], **dict(zip(inputs[1:], state))})
        state, weights = rest[:n_state], rest[n_state:]
        pieces.append(probs)
        weight_pieces.append(weights[0] if weights else None)
        start += size
    weights = None if weight_pieces[0] is None else np.concatenate(weight_pieces, axis=1)
    return np.concatenate(pieces, axis=1), weights


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # see `_one_thread`
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _one_thread():
    """The parity runs are a correctness check of small ops (a thousand T=1 steps): thread pools only add their
    spin-waits, which on a busy machine (a training run beside us) made them 5-15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_parity(model: Classifier, onnx_path: Path, windows: torch.Tensor) -> dict:
    """Max abs probability difference over every step, ONNX Runtime vs eager `advance` fed the same chunks (and the
    same for the scale mixer's weights, in `scale_weights`)."""
    session = _session(onnx_path)
    length = windows.shape[1]
    parity, onnx_runs, weight_parity = {}, {}, {}
    with _one_thread():
        for kind, chunks in parity_schedules(length).items():
            onnx_runs[kind], onnx_weights = _run_onnx(session, model, windows.numpy(), chunks)
            torch_probs, torch_weights = _run_torch(model, windows, chunks)
            parity[kind] = float(np.abs(onnx_runs[kind] - torch_probs).max())
            if torch_weights is not None:  # raw weights reach ~10: compared relative to their largest magnitude
                scale = max(1.0, float(np.abs(torch_weights).max()))
                weight_parity[kind] = float(np.abs(onnx_weights - torch_weights).max()) / scale
    if weight_parity:
        parity["scale_weights"] = {**weight_parity, "relative_to": "max(1, max |E|)"}
    # Streaming in any chunking should be the window classifier: ONNX Runtime against itself, recorded.
    whole = onnx_runs["whole_window"]
    parity["onnxruntime_consistency"] = {
        kind: float(np.abs(onnx_runs[kind] - whole).max()) for kind in ("sample_by_sample", "random_chunks")
    }
    parity.update(tolerance=TOLERANCE, windows=int(windows.shape[0]), window_samples=int(length))
    return parity


# --- model.json and README -----------------------------------------------------------------------------------------
def _check_meta(model: Classifier, meta: dict) -> torch.Tensor:
    cfg = model.cfg
    if len(meta["labels"]) != cfg.n_classes:
        raise ExportError(f"meta has {len(meta['labels'])} labels, the model {cfg.n_classes} classes")
    if len(meta["leads"]) != cfg.n_channels:
        raise ExportError(f"meta has {len(meta['leads'])} leads, the model {cfg.n_channels} input channels")
    if bool(meta["multi_label"]) != cfg.multi_label:
        raise ExportError("meta multi_label disagrees with the model config")
    windows = meta.get("parity_windows")
    if windows is None:
        raise ExportError("checkpoint meta has no parity_windows: nothing real to check the exported graph on")
    windows = torch.as_tensor(windows, dtype=torch.float32)
    if windows.dim() != 3 or windows.shape[0] == 0 or windows.shape[2] != cfg.n_channels:
        raise ExportError(f"parity_windows must be [n, window, {cfg.n_channels}], got {list(windows.shape)}")
    if windows.shape[1] > cfg.max_chunk:
        raise ExportError(f"parity windows of {windows.shape[1]} samples exceed one call's max_chunk {cfg.max_chunk}")
    if cfg.lead_mask and cfg.n_channels > 1:
        # A lead-subset model is also checked with leads missing (NaN): every third window keeps one lead, every
        # third after it two, so the graph's masking is compared with the model's too.
        windows = windows.clone()
        for i in range(1, len(windows), 3):
            windows[i, :, [c for c in range(cfg.n_channels) if c != i % cfg.n_channels]] = float("nan")
        for i in range(2, len(windows), 3):
            windows[i, :, 2:] = float("nan")
    return windows


def _default_name(model: Classifier, meta: dict, checkpoint: Path) -> str:
    """msssm-<ssm>-<task>-<label set>-<run>: the run is the checkpoint's directory, so two exports differ."""
    parts = ["msssm", model.cfg.ssm, meta.get("task"), meta.get("label_set"), checkpoint.resolve().parent.name]
    return "-".join(str(p) for p in parts if p)


def describe(model: Classifier, meta: dict, name: str, parity: dict, onnx_info: dict) -> dict:
    inputs, outputs = _io_names(model)
    spec = model.state_spec()
    return {
        "name": name,
        "version": msssm_serve.__version__,
        "labels": list(meta["labels"]),
        "multi_label": bool(meta["multi_label"]),
        "sample_rate": meta["sample_rate"],
        "leads": list(meta["leads"]),
        "window": int(meta["window"]),
        "lead_subsets": bool(model.cfg.lead_mask),  # any subset of `leads` (the others missing) is accepted
        "default_hop": int(meta.get("default_hop", DEFAULT_HOP)),
        "normalisation": {
            "mean": model.input_mean.tolist(),
            "std": model.input_std.tolist(),
            **({"template_length": model.cfg.template_length,
                "template": "each sample's deviation from the training mean series at its position (the last "
                            "sample's past the end) is fed beside it"} if model.cfg.template_length else {}),
            "applied": "inside the graph",
        },
        "state": [{"name": n, "shape": list(shape)} for n, shape in spec],
        "state_bytes_per_stream": 4 * sum(int(np.prod(shape)) for _, shape in spec),
        "max_chunk": model.cfg.max_chunk,
        # several models of one architecture, each with its own state (m<k>_ names), served as their mean
        **({"ensemble": {"members": len(model.members), **meta.get("ensemble", {})}}
           if isinstance(model, EnsembleClassifier) else {}),
        "inputs": inputs,
        "outputs": outputs,
        **({"scale_weights": {
            "output": "scale_weights",
            "shape": ["batch", "T", model.cfg.n_layers, model.cfg.n_ssm],
            "layers": model.cfg.n_layers,
            "scales": scale_names(model.cfg.n_scales),
            "mixer": model.cfg.mixer,
            "graph": "E_t of every layer's scale mixer (z_t = sum_s E_t[s] y_t[s]), per step, unnormalised"
                     + (", the mean over the ensemble's members" if isinstance(model, EnsembleClassifier) else ""),
            "summary": SCALE_WEIGHT_SUMMARY,
        }} if model.cfg.n_scales > 0 else {}),
        "config": model.cfg.to_dict(),
        "training": {k: v for k, v in meta.items() if k not in TOP_LEVEL_META and k != "parity_windows"},
        "validation": meta.get("validation"),
        "parity": parity,
        "onnx": onnx_info,
    }


# --- the whole export ----------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _install(staging: Path, out_dir: Path) -> None:
    """Move the checked files into out_dir. The old model.json goes first and the new one last, so no reader ever
    sees a model.json next to a model.onnx it does not describe."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model.json").unlink(missing_ok=True)
    for name in ("model.onnx", "README.md", "model.json"):
        os.replace(staging / name, out_dir / name)


def export_model(checkpoint_path, out_dir, opset: int | None = None, name: str | None = None, force: bool = False,
                 progress=lambda message: None) -> dict:
    """Export, check and install; -> the model.json dict. Raises ExportError (nothing installed) on any failure.
    An existing `out_dir` is replaced only with `force` (the README's bundled model is one such directory)."""
    opset = opset or DEFAULT_OPSET
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} exists and is not empty; choose another --out, or pass --force to replace it")
    try:
        model, meta, _ = load_checkpoint(checkpoint_path)
    except CheckpointError as err:
        raise ExportError(str(err)) from err
    windows = _check_meta(model, meta)
    name = name or _default_name(model, meta, Path(checkpoint_path))
    progress(f"exporting {name}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}, opset {opset}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Staged beside out_dir (same filesystem) so the final moves are atomic renames.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        onnx_path = staging / "model.onnx"
        _trace(model, onnx_path, opset)
        graph_model = onnx.load(str(onnx_path))
        members = len(model.members) if isinstance(model, EnsembleClassifier) else 1
        if lower_selective_scans(graph_model) != model.cfg.n_layers * members:
            raise ExportError("expected one selective scan per layer (of each ensemble member) in the traced graph")
        expand_softplus(graph_model)
        _declare_output_shapes(graph_model, model)
        onnx.checker.check_model(graph_model, full_check=True)
        onnx.save(graph_model, str(onnx_path))

        progress(f"graph traced and lowered; checking parity on {len(windows)} real windows (whole, sample by "
                 "sample, random chunks)")
        parity = check_parity(model, onnx_path, windows)
        checked = {k: parity[k] for k in ("whole_window", "sample_by_sample", "random_chunks")}
        checked.update({f"scale_weights {k}": v for k, v in parity.get("scale_weights", {}).items()
                        if k != "relative_to"})
        failed = {k: v for k, v in checked.items() if not v <= TOLERANCE}
        if failed:
            figures = ", ".join(f"{k} {v:.3g}" for k, v in failed.items())
            raise ExportError(f"exported graph disagrees with the checkpoint beyond {TOLERANCE:g}: {figures}")

        exporter = f"torch.onnx TorchScript exporter (dynamo=False), torch {torch.__version__}"
        desc = describe(model, meta, name, parity, {"opset": opset, "file": "model.onnx", "exporter": exporter})
        # The copy inside the graph cannot hold the hash and size of the file that contains it; all else is equal.
        embedded = json.dumps(desc, default=_jsonable)
        onnx.helper.set_model_props(graph_model, {"model.json": embedded})
        onnx.save(graph_model, str(onnx_path))
        # Metadata does not touch the computation, but the file installed is the file checked: one last run of it.
        with _one_thread():
            final = _run_onnx(_session(onnx_path), model, windows.numpy(), [windows.shape[1]])[0]
            reference = _run_torch(model, windows, [windows.shape[1]])[0]
        if not float(np.abs(final - reference).max()) <= TOLERANCE:
            raise ExportError("model.onnx changed while its metadata was written")

        desc["onnx"].update(sha256=_sha256(onnx_path), size_bytes=onnx_path.stat().st_size)
        (staging / "model.json").write_text(json.dumps(desc, indent=2, default=_jsonable) + "\n")
        (staging / "README.md").write_text(model_card(desc))
        _install(staging, out_dir)
        return desc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python export/export.py",
                                     description="Export a checkpoint to an ONNX model directory, checked for parity.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoint.pt")
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--name", default=None,
                        help="model name (default: msssm-<ssm>-<task>-<label set>-<run directory>)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        desc = export_model(args.checkpoint, args.out, opset=args.opset, name=args.name, force=args.force,
                            progress=lambda message: print(message, file=sys.stderr, flush=True))
    except ExportError as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 1
    parity = desc["parity"]
    print(
        f"exported {desc['name']} to {args.out} in {time.perf_counter() - started:.1f} s: parity on "
        f"{parity['windows']} windows, whole {parity['whole_window']:.2g}, sample-by-sample "
        f"{parity['sample_by_sample']:.2g}, random chunks {parity['random_chunks']:.2g} (tolerance {TOLERANCE:g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
