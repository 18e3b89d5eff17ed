#!/usr/bin/env python
"""Evaluate a model on one PTB-XL fold: macro AUROC (and per class) with a bootstrap 95 % interval, JSON on stdout.

    python training/evaluate.py --model MODEL_DIR_OR_CHECKPOINT --task ptbxl --data-dir DIR [--labels CSV] --fold 9 \\
        [--readouts]

The default fold is 9 (validation); the test fold 10 is scored only when asked for with --fold 10.
A model directory is run through onnxruntime (exactly what the server runs); a checkpoint through PyTorch.
Several --model paths score the average of their probabilities: what an ensemble of them would reach.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from training.metrics import bootstrap_macro_auroc, macro_auroc, per_class_auroc_by_name  # noqa: E402
from training.ptbxl import DataError, load_labels, load_signals  # noqa: E402


def step_probabilities(model, x: np.ndarray, batch: int = 64, last_only: bool = False) -> np.ndarray:
    """Per-step probabilities [N, T, classes] of each row of x, each from the zero state (onnxruntime); with
    `last_only`, [N, 1, classes]: the last step, without holding every step of every row."""
    out = []
    for i in range(0, len(x), batch):
        xb = np.asarray(x[i : i + batch], np.float32)
        probs, _ = model.advance(xb, model.zero_state(len(xb)))
        out.append(probs[:, -1:] if last_only else probs)
    return np.concatenate(out)


def readout_aurocs(model, x: np.ndarray, steps: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Macro AUROC of other ways to turn the model's outputs into one score per recording, beside the served one
    (the last step of the window): the mean over `steps` (x's per-step probabilities), and the max / mean over
    shorter windows, each from zero."""
    length = x.shape[1]
    scores = {"last step (served)": steps[:, -1],
              f"mean of steps {length // 4 + 1}-{length}": steps[:, length // 4 :].mean(1)}
    for width in (length // 4, length // 2):
        windows = np.stack([step_probabilities(model, x[:, s : s + width], last_only=True)[:, -1]
                            for s in range(0, length, width)])
        scores[f"max over {len(windows)} windows of {width}"] = windows.max(0)
        scores[f"mean over {len(windows)} windows of {width}"] = windows.mean(0)
    return {name: macro_auroc(labels, score) for name, score in scores.items()}


def load_model(path: Path, classes: list[str], sample_rate: int, weights: bool = False, threads: int | None = None):
    """-> the model at `path`: a model directory through onnxruntime (exactly what the server runs), a checkpoint
    through PyTorch. DataError unless it predicts `classes` at `sample_rate`: checked before any record is scored,
    as a mismatch would otherwise score nonsense rather than fail. `weights`: the caller needs the torch weights
    (to train or average them), so a model directory is refused. `threads`: onnxruntime's, for a model directory
    (default: the runtime's, all cores)."""
    if path.is_dir() and weights:
        raise DataError(f"{path}: an exported model directory holds no trainable weights; give the checkpoint.pt "
                        "it was exported from")
    if path.is_dir():
        from msssm_serve.runtime import OnnxModel

        model = OnnxModel(path, threads=threads)
        labels, rate = model.labels, model.sample_rate
    else:
        from msssm_serve.checkpoint import load_checkpoint

        model, meta, _ = load_checkpoint(path)
        labels, rate = meta["labels"], int(meta["sample_rate"])
    if labels != classes:
        raise DataError(f"{path}: model classes {labels} differ from the data's {classes}")
    if rate != sample_rate:
        raise DataError(f"{path}: the model runs at {rate} Hz, the records were asked for at {sample_rate} Hz "
                        f"(--sampling-rate {rate})")
    return model


def last_step_probabilities(model, x: np.ndarray) -> np.ndarray:
    """[N, classes]: each row's probabilities after its whole window, from the zero state."""
    from msssm_serve.runtime import OnnxModel

    if isinstance(model, OnnxModel):
        return step_probabilities(model, x, last_only=True)[:, -1]
    import torch

    from training.fit import predict

    return predict(model, x, torch.device("cpu"), 16)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, nargs="+",
                   help="model directory (model.onnx + model.json) or checkpoint.pt; several: their probabilities "
                        "are averaged (an ensemble, to see what it would add)")
    p.add_argument("--task", choices=["ptbxl"], default="ptbxl")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--cache-dir", default=None,
                   help="where decoded signals are cached (default: $MSSSM_CACHE_DIR, else ~/.cache/msssm)")
    p.add_argument("--labels", help="label table CSV (see fit.py)")
    p.add_argument("--label-set", default="superdiagnostic")
    p.add_argument("--sampling-rate", type=int, default=100)
    p.add_argument("--fold", type=int, default=9, help="9 = validation (default); 10 = the test fold, only on request")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--readouts", action="store_true", help="model directory: also score other read-outs")
    args = p.parse_args(argv)
    try:
        records = load_labels(args.data_dir, args.label_set, args.labels, args.sampling_rate)
        chosen = records.subset(records.folds == args.fold)
        if len(chosen.ids) == 0:
            raise DataError(f"{args.data_dir}: no labelled records in fold {args.fold}")
        if args.readouts and (len(args.model) > 1 or not Path(args.model[0]).is_dir()):
            raise DataError("--readouts needs one model directory (it runs onnxruntime)")
        models = [load_model(Path(path), records.classes, args.sampling_rate) for path in args.model]
        x = load_signals(args.data_dir, chosen, cache_dir=args.cache_dir, sampling_rate=args.sampling_rate)
        readouts = None
        if args.readouts:
            # One pass serves the score and every read-out built on the same steps.
            model = models[0]
            steps = step_probabilities(model, x)
            scores, readouts = steps[:, -1], readout_aurocs(model, x, steps, chosen.labels)
        else:
            scores = np.mean([last_step_probabilities(model, x) for model in models], axis=0)
    except Exception as err:  # every failure is reported as one line, never as a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {
        "model": args.model[0] if len(args.model) == 1 else args.model,
        "fold": args.fold,
        "records": len(chosen.ids),
        **bootstrap_macro_auroc(chosen.labels, scores, n_boot=args.n_boot),
        "per_class_auroc": per_class_auroc_by_name(records.classes, chosen.labels, scores),
    }
    if readouts is not None:
        result["readouts"] = readouts
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
