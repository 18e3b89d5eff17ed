#!/usr/bin/env python
"""Evaluate a model on one PTB-XL fold: macro AUROC (and per class) with a bootstrap 95 % interval, JSON on stdout.

    python training/evaluate.py --model MODEL_DIR_OR_CHECKPOINT --task ptbxl --data-dir DIR [--labels CSV] --fold 9

The default fold is 9 (validation); the test fold 10 is scored only when asked for with --fold 10.
A model directory is run through onnxruntime (exactly what the server runs); a checkpoint through PyTorch.
Several --model paths score the average of their probabilities: what an ensemble of them would reach.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


import numpy as np

from msssm_serve.training.augment import keep_leads
from msssm_serve.training.inference import load_model, window_probabilities
from msssm_serve.training.metrics import bootstrap_macro_auroc, per_class_auroc_by_name
from msssm_serve.training.ptbxl import LEADS, DataError, load_labels, load_signals


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default shown, the description kept as written."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python training/evaluate.py", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, nargs="+",
                   help="model directory (model.onnx + model.json) or checkpoint.pt; several: their probabilities "
                        "are averaged (an ensemble, to see what it would add)")
    p.add_argument("--task", choices=["ptbxl"], default="ptbxl")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--cache-dir", default=None,
                   help="where decoded signals are cached (default: $MSSSM_CACHE_DIR, else ~/.cache/msssm)")
    p.add_argument("--labels", help="label table CSV (see fit.py)")
    p.add_argument("--label-set", default="superdiagnostic", help="the classes (see fit.py)")
    p.add_argument("--sampling-rate", type=int, default=100, help="records100 or records500")
    p.add_argument("--fold", type=int, default=9, help="9 = validation; 10 = the test fold, only on request")
    p.add_argument("--leads", default=None,
                   help="comma-separated leads to keep, the others missing (a lead-subset model; e.g. I,II)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    args = p.parse_args(argv)
    try:
        result = score(args.model, args.data_dir, label_set=args.label_set, labels=args.labels, fold=args.fold,
                       sampling_rate=args.sampling_rate, leads=args.leads, n_boot=args.n_boot,
                       cache_dir=args.cache_dir)
    except Exception as err:  # every failure is reported as one line, never as a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def score(model_paths: list[str], data_dir: str, *, label_set: str = "superdiagnostic", labels: str | None = None,
          fold: int = 9, sampling_rate: int = 100, leads: str | None = None, n_boot: int = 1000,
          cache_dir: str | None = None) -> dict:
    """Macro AUROC with its bootstrap interval and per-class AUROC of the models' averaged probabilities on `fold`."""
    records = load_labels(data_dir, label_set, labels, sampling_rate)
    chosen = records.subset(records.folds == fold)
    if len(chosen.ids) == 0:
        raise DataError(f"{data_dir}: no labelled records in fold {fold}")
    models = [load_model(Path(path), records.classes, sampling_rate) for path in model_paths]
    x = load_signals(data_dir, chosen, cache_dir=cache_dir, sampling_rate=sampling_rate)
    if leads:
        keep = [name.strip().upper() for name in leads.split(",")]
        unknown = sorted(set(keep) - set(LEADS))
        if unknown:
            raise DataError(f"--leads: unknown {unknown}; PTB-XL's are {LEADS}")
        x = keep_leads(x, LEADS, keep)
    print(f"scoring {len(chosen.ids)} records of fold {fold} with {len(models)} model(s)", file=sys.stderr)
    scores = np.mean([window_probabilities(model, x, progress="scoring") for model in models], axis=0)
    return {
        "model": model_paths[0] if len(model_paths) == 1 else model_paths,
        "fold": fold,
        **({"leads": leads} if leads else {}),
        "records": len(chosen.ids),
        **bootstrap_macro_auroc(chosen.labels, scores, n_boot=n_boot),
        "per_class_auroc": per_class_auroc_by_name(records.classes, chosen.labels, scores),
    }


if __name__ == "__main__":
    sys.exit(main())
