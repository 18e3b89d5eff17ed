#!/usr/bin/env python
"""MS-SSM vs the single-scale baseline at equal total state size, on the same data, side by side.

    python training/ablation.py --data-dir DIR [--labels CSV] [--epochs N] [--out runs/ablation] [fit.py flags...]

The baseline is `n_scales = 0` (one Mamba-style SSM per channel) with d_state = (S+2) * N, so both models keep
the same number of SSM state entries per channel. Both runs share every other flag, the seed and the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from msssm_serve.checkpoint import CheckpointError
from msssm_serve.training import fit
from msssm_serve.training.loop import train
from msssm_serve.training.ptbxl import DataError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation")
    known, rest = p.parse_known_args(argv)
    base = fit.parse_args(["--task", "ptbxl", *rest])
    n_scales = base.n_scales or 3
    variants = {
        f"MS-SSM (S={n_scales}, N={base.d_state})": {"n_scales": n_scales, "d_state": base.d_state},
        f"single-scale (S=0, N={(n_scales + 2) * base.d_state})": {"n_scales": 0,
                                                                   "d_state": (n_scales + 2) * base.d_state},
    }
    rows = []
    for i, (name, overrides) in enumerate(variants.items()):
        args = fit.parse_args(["--task", "ptbxl", *rest, "--out", str(Path(known.out) / f"variant{i}")])
        vars(args).update(overrides)
        try:
            metrics = train(args)
        except (DataError, CheckpointError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if not metrics:  # a torchrun rank other than 0: rank 0 reports
            continue
        best = metrics["best"]
        rows.append({"model": name, "val_macro_auroc": best["macro_auroc"], "ci95": [best["bootstrap_ci_low"],
                     best["bootstrap_ci_high"]], "best_epoch": best["epoch"],
                     "train_minutes": metrics["train_wall_seconds"] / 60})
    if not rows:
        return 0
    print(f"| model | state per channel | validation macro AUROC (95% CI) | best epoch | train min |")
    print("|---|---|---|---|---|")
    for row, overrides in zip(rows, variants.values()):
        states = (overrides["n_scales"] + 2 if overrides["n_scales"] else 1) * overrides["d_state"]
        low, high = row["ci95"]
        ci = f"{low:.4f}-{high:.4f}" if low is not None else "no interval"
        print(f"| {row['model']} | {states} | {row['val_macro_auroc']:.4f} ({ci}) | {row['best_epoch']} "
              f"| {row['train_minutes']:.1f} |")
    (Path(known.out) / "ablation.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
