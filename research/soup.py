#!/usr/bin/env python
"""Research, not product: weight averaging ("model soup"), one checkpoint whose weights are the mean of several fine-tunes of one model.

    python research/soup.py --models A/checkpoint.pt B/checkpoint.pt ... --data-dir DIR [--labels CSV] \\
        [--greedy] --out runs/soup

Unlike an ensemble (`training/evaluate.py --model A B`), a soup serves at the cost of one model: same graph, same
state. It only works for models that sit in one basin of the loss, i.e. fine-tuned from one starting checkpoint
(`fit.py --init`); independently trained models average to noise (Wortsman et al., "Model soups", ICML 2022).
Every ingredient and the soup are scored on the validation fold (9); `--greedy` adds the ingredients best first and
keeps each one only if the soup's validation macro AUROC does not drop. The test fold is never read. On PTB-XL no
soup beat the bundled recipe beyond its interval (docs/experiments.md); it stays here, importing the product.
Writes OUT/checkpoint.pt (exports like any trained checkpoint) and OUT/metrics.json; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


import numpy as np
import torch

from msssm_serve.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from msssm_serve.training.inference import load_model, window_probabilities
from msssm_serve.training.metrics import bootstrap_macro_auroc, macro_auroc, per_class_auroc_by_name
from msssm_serve.training.ptbxl import DataError, load_labels, load_signals

VALIDATION_FOLD = 9


def average_weights(models: list) -> dict[str, torch.Tensor]:
    """The element-wise mean of the models' floating-point weights and buffers; anything else (counters) must agree."""
    states = [m.state_dict() for m in models]
    mean = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            mean[name] = torch.stack([s[name] for s in states]).mean(0)
        elif all(torch.equal(s[name], first) for s in states[1:]):
            mean[name] = first
        else:
            raise DataError(f"ingredients differ in the non-float entry {name}; they are not fine-tunes of one model")
    return mean


def soup_of(models: list):
    soup = type(models[0])(models[0].cfg)
    soup.load_state_dict(average_weights(models))
    return soup.eval()


def load_ingredients(paths: list[str], classes: list[str], sample_rate: int) -> list:
    models = [load_model(Path(path), classes, sample_rate, weights=True) for path in paths]
    for path, model in zip(paths[1:], models[1:]):
        if model.cfg != models[0].cfg:
            raise DataError(f"{path}: architecture {model.cfg} differs from {paths[0]}'s {models[0].cfg}")
        for buffer in ("input_mean", "input_std"):
            if not torch.allclose(getattr(model, buffer), getattr(models[0], buffer)):
                raise DataError(f"{path}: input normalisation differs from {paths[0]}'s (other training data)")
    return models


def cook(models: list, names: list[str], x: np.ndarray, y: np.ndarray, greedy: bool):
    """-> (soup model, names kept, each ingredient's validation AUROC, the soup's validation probabilities)."""
    score = lambda m: window_probabilities(m, x, 16)  # noqa: E731
    probs = [score(m) for m in models]  # scored once: greedy starts from the best ingredient's own probabilities
    alone = {name: macro_auroc(y, p) for name, p in zip(names, probs)}
    print(json.dumps({"ingredients_val_macro_auroc": alone}), file=sys.stderr)
    if not greedy:
        soup = soup_of(models)
        return soup, list(names), alone, score(soup)
    order = sorted(range(len(models)), key=lambda i: alone[names[i]], reverse=True)
    kept = [order[0]]
    best_p = probs[order[0]]
    best = macro_auroc(y, best_p)
    for i in order[1:]:
        trial_p = score(soup_of([models[j] for j in kept + [i]]))
        trial = macro_auroc(y, trial_p)
        print(json.dumps({"add": names[i], "soup_val_macro_auroc": trial, "kept": trial >= best}), file=sys.stderr)
        if trial >= best:
            kept, best, best_p = kept + [i], trial, trial_p
    return soup_of([models[j] for j in kept]), [names[j] for j in kept], alone, best_p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="CHECKPOINT", help="fine-tunes of one checkpoint")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--labels", help="label table CSV (see fit.py)")
    p.add_argument("--label-set", default="superdiagnostic")
    p.add_argument("--sampling-rate", type=int, default=100)
    p.add_argument("--greedy", action="store_true", help="keep an ingredient only if validation AUROC does not drop")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--out", default="runs/soup")
    args = p.parse_args(argv)
    try:
        if len(args.models) < 2:
            raise DataError("a soup needs at least two checkpoints")
        records = load_labels(args.data_dir, args.label_set, args.labels, args.sampling_rate)
        val = records.subset(records.folds == VALIDATION_FOLD)
        if len(val.ids) == 0:
            raise DataError(f"{args.data_dir}: no labelled records in the validation fold {VALIDATION_FOLD}")
        models = load_ingredients(args.models, records.classes, args.sampling_rate)
        x = load_signals(args.data_dir, val, sampling_rate=args.sampling_rate)
        soup, kept, alone, p_val = cook(models, args.models, x, val.labels, args.greedy)
    except (DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metas = {k: load_checkpoint(k)[1] for k in kept}
    meta = metas[kept[0]]
    auroc = macro_auroc(val.labels, p_val)
    per_class = per_class_auroc_by_name(records.classes, val.labels, p_val)
    meta = {**meta, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "soup": {"ingredients": list(args.models), "kept": kept, "ingredients_val_macro_auroc": alone,
                     "ingredient_commands": {k: m.get("command") for k, m in metas.items()}},
            "validation": {"macro_auroc": auroc, "weights": f"mean of {len(kept)} checkpoints",
                           "per_class_auroc": per_class}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "checkpoint.pt", soup, meta)
    boot = bootstrap_macro_auroc(val.labels, p_val, n_boot=args.n_boot)
    metrics = {"classes": records.classes, "config": soup.cfg.to_dict(), "command": meta["command"], **meta["soup"],
               "best": {**meta["validation"], **{f"bootstrap_{k}": v for k, v in boot.items()}}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({"out": str(out), "val_macro_auroc": auroc, "ci95": [boot["ci_low"], boot["ci_high"]],
                      "kept": len(kept), "of": len(args.models)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
