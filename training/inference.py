"""Run any model over windows: a checkpoint through PyTorch, a model directory through onnxruntime (exactly what the
server runs). Both speak one state protocol, `zero_state(batch)` and `advance(x, state) -> (probabilities at every
step, new state)`; only the array type differs (torch tensors or numpy arrays)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from msssm_serve.training.ptbxl import DataError


def load_model(path: Path, classes: list[str], sample_rate: int, weights: bool = False, threads: int | None = None):
    """-> the model at `path`: a model directory (OnnxModel) or a checkpoint (MSSSMClassifier, eval mode, CPU).
    DataError unless it predicts `classes` at `sample_rate`: checked before any record is scored, as a mismatch would
    otherwise score nonsense rather than fail. `weights`: the caller needs the torch weights (to train or average
    them), so a model directory is refused. `threads`: onnxruntime's, for a model directory (default: all cores)."""
    path = Path(path)
    if path.is_dir() and weights:
        raise DataError(f"{path}: an exported model directory holds no trainable weights; give the checkpoint.pt "
                        "it was exported from")
    if path.is_dir():
        from msssm_serve.runtime import OnnxModel

        model = OnnxModel(path, threads=threads)
        labels, rate = model.labels, model.sample_rate
    else:
        from msssm_serve.checkpoint import load_checkpoint
        from msssm_serve.model import EnsembleClassifier

        model, meta, _ = load_checkpoint(path)
        labels, rate = meta["labels"], int(meta["sample_rate"])
        if weights and isinstance(model, EnsembleClassifier):
            raise DataError(f"{path} is an ensemble of {len(model.members)} models, not one set of weights; "
                            "give one member's checkpoint (RUN_DIR/members/K/checkpoint.pt)")
    if labels != classes:
        raise DataError(f"{path}: model classes {labels} differ from the data's {classes}")
    if rate != sample_rate:
        raise DataError(f"{path}: the model runs at {rate} Hz, the records were asked for at {sample_rate} Hz "
                        f"(--sampling-rate {rate})")
    return model


def row_batches(x: np.ndarray, batch: int, progress: str | None = None):
    """float32 copies of x's rows, `batch` at a time (x may be a memmap larger than memory); `progress`: a label for
    a progress bar on stderr (when tqdm is installed)."""
    starts = range(0, len(x), batch)
    if progress:
        try:
            from tqdm import tqdm

            starts = tqdm(starts, desc=progress, unit="batch", leave=False, file=sys.stderr)
        except ImportError:  # the serving install: no bar
            pass
    for i in starts:
        yield np.array(x[i : i + batch], dtype=np.float32)


def window_probabilities(model, x: np.ndarray, batch: int = 16, device=None, progress: str | None = None) -> np.ndarray:
    """[N, classes]: each row of x [N, T, C] classified from the zero state, the probabilities after its last step
    (what the server answers for a window). x may be a memmap; it is read `batch` rows at a time. `progress`: a
    label for a progress bar on stderr (when tqdm is installed)."""
    torch_model = hasattr(model, "parameters")
    if torch_model:
        import torch

        device = device or next(model.parameters()).device
        model.eval()
    out = []
    for xb in row_batches(x, batch, progress):
        if torch_model:
            with torch.no_grad():
                probs, _ = model.advance(torch.from_numpy(xb).to(device), model.zero_state(len(xb), device))
            out.append(probs[:, -1].float().cpu().numpy())
        else:
            probs, _ = model.advance(xb, model.zero_state(len(xb)))
            out.append(probs[:, -1])
    return np.concatenate(out)
