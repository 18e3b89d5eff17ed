#!/usr/bin/env python
"""Train MS-SSM: python training/fit.py --task ptbxl --data-dir DIR [--labels CSV] [--out RUN_DIR]

With no tuning flag, --task ptbxl trains the bundled recipe (models/default/README.md). Writes RUN_DIR/checkpoint.pt
(best on validation macro AUROC), RUN_DIR/last.pt (for --resume, on any machine), RUN_DIR/metrics.json and PNG
plots. Folds 1-8 train, fold 9 selects, fold 10 is never read. Several processes or GPUs:
torchrun --nproc_per_node N training/fit.py ...
"""

from __future__ import annotations

import argparse
import json
import sys


from msssm_serve.checkpoint import CheckpointError
from msssm_serve.config import POOL_STATISTICS
from msssm_serve.training.ptbxl import LABEL_SETS, DataError
from msssm_serve.training.recipe import folds_wanted, refit_wanted


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default shown, the description kept as written."""


def members_flag(text: str) -> str:
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"expected auto or a whole number of at least 1, got {text!r}")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python training/fit.py", description=__doc__, formatter_class=HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--task", choices=["ptbxl", "ucr"], required=True, help="PTB-XL layout, or a UCR dataset folder")
    data.add_argument("--data-dir", required=True, help="the dataset (PTB-XL: the folder holding records100/)")
    data.add_argument("--cache-dir", default=None,
                      help="where decoded signals are cached (unset: $MSSSM_CACHE_DIR, else ~/.cache/msssm)")
    data.add_argument("--label-set", default="superdiagnostic",
                      help=f"ptbxl: the classes, one of {', '.join(LABEL_SETS)} (computed from the official metadata "
                           "unless --labels is given)")
    data.add_argument("--labels", help="label table CSV: ecg_id, strat_fold, filename_lr, then one 0/1 column per class")
    data.add_argument("--sampling-rate", type=int, default=100, choices=[100, 500], help="ptbxl: records100 or 500")
    data.add_argument("--val-fraction", type=float, default=0.2, help="ucr: share of TRAIN held out for validation")
    model = p.add_argument_group("model")
    model.add_argument("--ssm", choices=["s6", "s4"], default="s6", help="input-dependent (s6) or fixed (s4) SSMs")
    model.add_argument("--n-scales", type=int, default=3, help="S, dilated-conv levels (0: single-scale baseline)")
    model.add_argument("--d-model", type=int, default=32, help="width of the residual stream")
    model.add_argument("--n-layers", type=int, default=3, help="residual MS-SSM blocks")
    model.add_argument("--d-state", type=int, default=4, help="N, state size of each SSM")
    model.add_argument("--a-init", choices=["scale", "mamba"], default="scale",
                       help="scale-dependent A initialisation (the paper's) or Mamba's")
    model.add_argument("--mixer", choices=["input", "static", "softmax"], default="input", help="the scale mixer")
    model.add_argument("--dropout", type=float, default=0.1, help="dropout on each block's output")
    model.add_argument("--template", choices=["auto", "on", "off"], default="auto",
                       help="feed each sample's deviation from the training mean series beside it (auto: off for "
                            "ptbxl and with --crop; for ucr, selected without and with it and the better on validation "
                            "kept; needs whole series)")
    model.add_argument("--pool", choices=list(POOL_STATISTICS), default=None,
                       help="what the head reads: the causal mean of the features; also their standard deviation "
                            "(mean_std); also their maximum and minimum after a warm-up (mean_std_extrema, see "
                            "--extrema-from). Unset: mean, or the --init checkpoint's; a wider pooling than --init's "
                            "adds the new statistics' head columns at zero")
    model.add_argument("--extrema-from", type=int, default=None,
                       help="mean_std_extrema: the sample position the running extremes start at (default: a tenth "
                            "of the window; the mean stands in before it)")
    model.add_argument("--lead-subsets", action="store_true",
                       help="train on random lead subsets (missing leads as NaN, seen by the model as absent) so the "
                            "exported model serves any subset of the leads")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=None,
                     help="unset: 30 for ptbxl; for ucr, ~2,000 optimiser steps' worth (100-600, training/recipe.py)")
    opt.add_argument("--batch-size", type=int, default=None,
                     help="unset: 48 for ptbxl; for ucr, an eighth of the training series (4-32)")
    opt.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, warm-up then cosine)")
    opt.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on norms, biases, "
                     "SSM dynamics)")
    opt.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length")
    opt.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    opt.add_argument("--ema", type=float, default=0.998,
                     help="decay of the moving average of the weights scored beside them (0: off); short runs use "
                          "less, so that the average spans at most a fifth of the run")
    opt.add_argument("--crop", type=float, default=None,
                     help="training crop in samples, or below 1 a fraction of the series (unset: 250 for ptbxl, "
                          "the whole series for ucr)")
    opt.add_argument("--supervise-from", type=int, default=None,
                     help="loss on every step from this many samples on (0: the last step of the crop only; "
                          "unset: 100 for ptbxl, 0 for ucr)")
    opt.add_argument("--amp-jitter", type=float, default=0.0, help="per-record gain in [1/(1+a), 1+a] (0: off)")
    opt.add_argument("--noise-std", type=float, default=0.0, help="white noise std, in the signal's units (0: off)")
    opt.add_argument("--mixup", type=float, default=None,
                     help="mixup: each training record blended with another of its batch, labels alike, by a weight "
                          "from Beta(a, a) (0: off; unset: 0.4 for ucr, off for ptbxl)")
    opt.add_argument("--steps-per-epoch", type=int, default=0, help="cap on optimiser steps per epoch (0: a full pass)")
    opt.add_argument("--seed", type=int, default=0, help="weights, crops and order")
    run = p.add_argument_group("run")
    run.add_argument("--out", default="runs/latest", help="run directory")
    run.add_argument("--refit", choices=["auto", "on", "off"], default="auto",
                     help="train again on all of TRAIN for the epochs chosen on validation (auto: on for ucr when "
                          "it selects on one held-out split, see --folds); the selection run is kept in "
                          "RUN_DIR/selection")
    run.add_argument("--members", type=members_flag, default="auto",
                     help="refits from seeds --seed, --seed + 1, ... served as one ensemble (their mean probabilities; "
                          "members in RUN_DIR/members/K); needs the refit. auto: 1 for ptbxl, 5 for ucr "
                          "(training/recipe.py)")
    run.add_argument("--folds", type=int, default=None,
                     help="ucr: select by cross-validation on TRAIN: N stratified folds, a model trained on each "
                          "fold's complement and stopped on the fold; the template is chosen on all their out-of-fold "
                          "predictions, and the N models are served as one ensemble (no refit). 1: one held-out "
                          "split (--val-fraction), then --refit and --members. Unset: 5 for a ucr set of under 250 "
                          "TRAIN series unless --refit on or --members is given, else 1 (training/recipe.py)")
    run.add_argument("--patience", type=int, default=None,
                     help="stop a selection run after this many epochs without a better validation figure (0: "
                          "never; unset: a third of the epochs, at least 20, for ucr; never for ptbxl)")
    run.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt (same flags)")
    run.add_argument("--init", help="warm start from this checkpoint's weights and architecture (new optimiser, "
                     "schedule)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when torch sees it")
    run.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    # Small evaluation batches keep a whole 10 s window's activations in cache: on this 2-core CPU, 1,000-sample
    # windows score ~40 % faster in batches of 16 than of 128 (the training step itself works on 2.5 s crops).
    run.add_argument("--eval-batch-size", type=int, default=16, help="validation windows per call")
    run.add_argument("--parity-windows", type=int, default=8, help="validation windows kept for export's parity check")
    run.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the final interval")
    args = p.parse_args(argv)
    # PTB-XL: the bundled recipe, batches of 48 and the loss on every step from the 100th sample (1 s), as a stream
    # is served every hop. UCR: batch size and epochs follow the training set's size once it is read
    # (training/recipe.py); the loss on the last step (a series is classified whole).
    if args.task == "ptbxl":
        args.epochs = 30 if args.epochs is None else args.epochs
        args.batch_size = 48 if args.batch_size is None else args.batch_size
    if folds_wanted(args) < 1:
        p.error("--folds: at least 1")
    if folds_wanted(args) > 1:
        if args.task != "ucr":
            p.error("--folds: cross-validated selection is for ucr (PTB-XL selects on fold 9)")
        if args.refit == "on" or args.members != "auto":
            p.error("--folds: the folds' models are the served ensemble; --refit on and --members need --folds 1")
    if args.members not in ("auto", "1") and not refit_wanted(args):
        p.error("--members: the members are refits on all of TRAIN; they need the refit (not --refit off)")
    if args.supervise_from is None:
        args.supervise_from = 0 if args.task == "ucr" else 100
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from msssm_serve.training.loop import train  # torch is imported here, after --help and argument errors

    try:
        metrics = train(args)
    except (DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if metrics:
        best = metrics["best"]
        print(json.dumps({"out": args.out, "val_macro_auroc": best["macro_auroc"],
                          "ci95": [best["bootstrap_ci_low"], best["bootstrap_ci_high"]], "epoch": best["epoch"],
                          **{k: metrics[k] for k in ("test_accuracy", "test_macro_auroc") if k in metrics}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
