"""Refit a trained model's read-out to what it pools (a linear probe), optionally widening what it pools first.

    python training/fit_head.py --init RUN/checkpoint.pt --data-dir DIR --labels DIR/labels/rhythm.csv \\
        --label-set rhythm [--pool mean_std | mean_std_extrema] --out RUN2

The blocks stay as they are. What the head reads at a window's last step (the causal mean of the final features;
with mean_std also their standard deviation; with mean_std_extrema also their maximum and minimum from the second on)
is computed once for every training window of PTB-XL folds 1-8 (a lead-subset model sees each window with a lead
subset drawn as in training) and for fold 9. The head is then fit by L-BFGS on the training windows as a correction
of the present head (the new statistics' columns start at zero), with an L2 penalty on the correction, once per
strength in --l2; the strength whose head scores the best validation macro AUROC is kept. A trained head has to
grow its weights on a new statistic step by step under the trainer's small learning rate, which a 3-epoch
fine-tune did not do (docs/experiments.md); the fit gets there at once. Writes RUN2/checkpoint.pt (export takes it
like any checkpoint) and RUN2/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from msssm_serve.config import POOL_STATISTICS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="the trained checkpoint.pt whose head is refit")
    p.add_argument("--data-dir", required=True, help="PTB-XL in its official layout")
    p.add_argument("--labels", help="label table CSV (see fit.py)")
    p.add_argument("--label-set", default="superdiagnostic", help="the classes (see fit.py)")
    p.add_argument("--sampling-rate", type=int, default=100, choices=[100, 500])
    p.add_argument("--cache-dir", default=None, help="where decoded signals are cached (see fit.py)")
    p.add_argument("--pool", choices=list(POOL_STATISTICS), default=None,
                   help="widen the checkpoint's pooling to this first (mean_std: also the spread; mean_std_extrema: "
                        "also the maximum and minimum; unset: the checkpoint's)")
    p.add_argument("--l2", default="1e-3,3e-4,1e-4,3e-5",
                   help="penalty strengths on the correction, per mean loss over windows and classes")
    p.add_argument("--batch", type=int, default=32, help="windows per forward pass")
    p.add_argument("--seed", type=int, default=0, help="the training windows' lead subsets")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the interval")
    p.add_argument("--out", required=True, help="run directory for checkpoint.pt and metrics.json")
    return p.parse_args(argv)


def last_step_features(model, x: np.ndarray, batch: int, lead_names=None, rng=None):
    """[n, F] what the head reads after each whole window of x [n, L, C] (from the zero state); with `rng`, each
    window first loses leads as in training (mask_leads)."""
    import torch

    from msssm_serve.training.augment import mask_leads
    from msssm_serve.training.inference import row_batches

    out = []
    for xb in row_batches(x, batch):
        if rng is not None:
            xb = mask_leads(xb, rng, lead_names)
        with torch.no_grad():
            pooled, _, _ = model.pooled(torch.from_numpy(xb), model.zero_state(len(xb)))
        out.append(pooled[:, -1].double().numpy())
    return np.concatenate(out)


def fit_correction(features, labels, head_w, head_b, l2: float, multi_label: bool):
    """The head (weight [K, F], bias [K]) minimising the mean loss on (features [n, F], labels [n, K]) plus
    l2 / 2 * |correction|^2, the correction being measured on standardised features from head (head_w, head_b)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(features)
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = (x - mu) / sd
    y = torch.from_numpy(np.asarray(labels, dtype=np.float64))
    w0, b0 = torch.from_numpy(head_w).double(), torch.from_numpy(head_b).double()
    offset = x @ w0.T + b0
    delta = torch.zeros(x.shape[1], len(b0), dtype=torch.float64, requires_grad=True)
    delta_b = torch.zeros(len(b0), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([delta, delta_b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = offset + z @ delta + delta_b
        loss = (F.binary_cross_entropy_with_logits(logits, y) if multi_label
                else F.cross_entropy(logits, y.argmax(1)))
        loss = loss + l2 / 2 * (delta**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardisation into the weights: logits = x @ W.T + b
        scaled = delta / sd[:, None]
        return (w0 + scaled.T).float().numpy(), (b0 + delta_b - mu @ scaled).float().numpy()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from msssm_serve.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from msssm_serve.model import with_pool
    from msssm_serve.training.data import load_task
    from msssm_serve.training.loop import extrema_from, score_lead_subsets
    from msssm_serve.training.metrics import bootstrap_macro_auroc, macro_auroc, per_class_auroc_by_name
    from msssm_serve.training.ptbxl import DataError

    started = time.time()
    try:
        model, meta, _ = load_checkpoint(args.init)
        data = load_task(argparse.Namespace(task="ptbxl", **{k: getattr(args, k) for k in (
            "data_dir", "labels", "label_set", "sampling_rate", "cache_dir")}))
        if meta["labels"] != data.classes:
            raise DataError(f"--init: model classes {meta['labels']} differ from the data's {data.classes}")
        # extremes added here start where the trainer's default puts them
        model = with_pool(model, args.pool, extrema_from=extrema_from(data.x_train.shape[1])).eval()
    except (CheckpointError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    rng = np.random.default_rng(args.seed) if model.cfg.lead_mask else None
    train = last_step_features(model, data.x_train, args.batch, data.leads, rng)
    val = last_step_features(model, data.x_val, args.batch)
    if "std" in model.cfg.pool_statistics:  # the spread about the features' mean: the same value, less float32 rounding
        model.pool_center.copy_(torch.from_numpy(train[:, : model.cfg.d_model].mean(0)).float())
    head_w, head_b = model.head.weight.detach().numpy(), model.head.bias.detach().numpy()

    def scores(w, b):
        logits = torch.from_numpy(val @ w.T.astype(np.float64) + b)
        return model.probabilities(logits).numpy()

    trials = [{"l2": None, "val_macro_auroc": macro_auroc(data.y_val, scores(head_w, head_b))}]  # the head as it was
    best = (trials[0]["val_macro_auroc"], head_w, head_b, None)
    for l2 in (float(v) for v in args.l2.split(",")):
        w, b = fit_correction(train, data.y_train, head_w, head_b, l2, model.cfg.multi_label)
        trials.append({"l2": l2, "val_macro_auroc": macro_auroc(data.y_val, scores(w, b))})
        print(json.dumps(trials[-1]), flush=True)
        if trials[-1]["val_macro_auroc"] > best[0]:
            best = (trials[-1]["val_macro_auroc"], w, b, l2)
    _, w, b, l2 = best
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(w))
        model.head.bias.copy_(torch.from_numpy(b))

    probs = scores(w, b)
    interval = bootstrap_macro_auroc(data.y_val, probs, n_boot=args.n_boot)
    validation = {**interval, "per_class_auroc": per_class_auroc_by_name(data.classes, data.y_val, probs),
                  "weights": "head refit", "l2": l2}
    if model.cfg.lead_mask:
        validation["lead_subsets"] = score_lead_subsets(model, data, args.batch, args.n_boot, (probs, interval))
    command = shlex.join(["python", "training/fit_head.py", *(argv if argv is not None else sys.argv[1:])])
    meta = {**meta, "validation": validation, "command": command, "stages": [*meta.get("stages", []),
                                                                             meta.get("command")]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "checkpoint.pt", model, meta)
    metrics = {"init": args.init, "pool": model.cfg.pool, "trials": trials, "chosen_l2": l2,
               "validation": validation, "seconds": round(time.time() - started, 1), "command": command}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps({"out": str(out), "val_macro_auroc": validation.get("macro_auroc"), "l2": l2}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
