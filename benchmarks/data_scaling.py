#!/usr/bin/env python
"""How does validation macro AUROC grow with the number of training records? Trains one recipe on the first k
training folds (k = 2, 4, 8: a quarter, half, all of folds 1-8), always validating on fold 9, and fits
AUROC = a + b * log2(records) to say what one doubling of the data is worth and how many records a target needs.

    python benchmarks/data_scaling.py --data-dir ../shared/data/ptbxl \\
        --labels ../shared/data/ptbxl/labels/superdiagnostic.csv --train-folds 2 4 --seeds 0 1 --parallel 2 \\
        --include 8 'benchmarks/results/h100/seed_sweep/base_s*.json' \\
        --out runs/data_scaling -- --epochs 30 --batch-size 48 --supervise-from 100

Everything after `--` goes to `training/fit.py` unchanged. The subsets are label tables (the `--labels` format)
holding folds 1..k and every non-training fold, so folds are whole (PTB-XL's folds are patient-wise and stratified)
and fold 9 is the same 1,045 records for every k; fold 10 is never read. A run whose `metrics.json` exists is not
trained again, so the command can be stopped and re-run. `--include K GLOB` adds finished runs' `metrics.json` files
(same recipe, trained elsewhere) as points at k folds.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from msssm_serve.training.ptbxl import TRAIN_FOLDS


def write_subset(labels_csv: Path, k: int, out: Path) -> None:
    """Label table with training folds 1..k and all other rows, written as read (columns and values unchanged)."""
    with open(labels_csv, newline="") as f:
        reader = csv.DictReader(f)
        if "strat_fold" not in (reader.fieldnames or []):
            sys.exit(f"error: {labels_csv} has no strat_fold column (the label-table format of fit.py --labels)")
        rows = [r for r in reader if int(r["strat_fold"]) not in TRAIN_FOLDS or int(r["strat_fold"]) <= k]
        fields = reader.fieldnames
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    argv = sys.argv[1:]
    fit_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--labels", required=True, help="label table of all records (the --labels format of fit.py)")
    p.add_argument("--train-folds", type=int, nargs="+", default=[2, 4, 8], help="k: train on folds 1..k")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, default=0, help="threads per run (default: cores // parallel)")
    p.add_argument("--include", nargs=2, action="append", default=[], metavar=("K", "GLOB"),
                   help="finished runs' metrics.json files to add as points at k training folds")
    p.add_argument("--target", type=float, default=0.92)
    p.add_argument("--out", default="runs/data_scaling")
    args = p.parse_args(argv)
    folds = f"{TRAIN_FOLDS[0]}..{TRAIN_FOLDS[-1]}"
    for k in args.train_folds:
        if k not in TRAIN_FOLDS:
            p.error(f"--train-folds: {k} is not in {folds}")
    for k, _ in args.include:
        if not k.isdigit() or int(k) not in TRAIN_FOLDS:
            p.error(f"--include: {k!r} is not a number of training folds in {folds}")
    if not Path(args.labels).is_file():
        p.error(f"--labels: {args.labels} is not a file")

    out = Path(args.out)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    jobs = []
    for k in args.train_folds:
        write_subset(Path(args.labels), k, out / f"labels_folds1-{k}.csv")
    for seed in args.seeds:  # seed-major: a stopped command has whole curves for its first seeds
        for k in args.train_folds:
            run = out / f"folds1-{k}_s{seed}"
            if not (run / "metrics.json").is_file():
                cmd = [sys.executable, str(ROOT / "training" / "fit.py"), "--task", "ptbxl", "--data-dir", args.data_dir,
                       "--labels", str(out / f"labels_folds1-{k}.csv"), "--seed", str(seed), "--out", str(run),
                       *fit_args]
                # Resume a run stopped part-way (fit.py refuses a directory trained another way).
                jobs.append((run, cmd + (["--resume"] if (run / "last.pt").is_file() else [])))

    running: list[tuple[Path, subprocess.Popen, float]] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    while jobs or running:
        while jobs and len(running) < args.parallel:
            run, cmd = jobs.pop(0)
            run.mkdir(parents=True, exist_ok=True)
            log = open(run.with_suffix(".log"), "a")
            print(f"start {run} ({threads} threads): {' '.join(cmd)}", flush=True)
            running.append((run, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time()))
        time.sleep(5)
        for item in list(running):
            run, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"done  {run}: exit {proc.returncode}, {(time.time() - t0) / 60:.1f} min", flush=True)
                if proc.returncode != 0:
                    sys.exit(f"error: {run} failed, see {run.with_suffix('.log')}")

    points: dict[int, list[tuple[str, int, float]]] = {}
    for k in args.train_folds:
        for seed in args.seeds:
            m = json.loads((out / f"folds1-{k}_s{seed}" / "metrics.json").read_text())
            points.setdefault(k, []).append((f"folds1-{k}_s{seed}", m["data"]["train_records"], m["best"]["macro_auroc"]))
    for k, pattern in args.include:
        files = sorted(glob.glob(pattern))
        if not files:
            sys.exit(f"error: --include {k} {pattern}: no file matches")
        for f in files:
            m = json.loads(Path(f).read_text())
            name = Path(f).parent.name if Path(f).name == "metrics.json" else Path(f).stem
            points.setdefault(int(k), []).append((name, m["data"]["train_records"], m["best"]["macro_auroc"]))

    ks = sorted(points)
    means = {k: statistics.mean(y for *_, y in points[k]) for k in ks}
    print(f"\nvalidation (fold 9) macro AUROC by training folds; recipe: fit.py {' '.join(fit_args)}")
    print(f"{'folds':>6} {'records':>8} {'runs':>5} {'mean':>8} {'sd':>7}  each")
    for k in ks:
        ys = [y for *_, y in points[k]]
        sd = f"{statistics.stdev(ys):.4f}" if len(ys) > 1 else "-"
        each = " ".join(f"{name}={y:.4f}" for name, _, y in points[k])
        print(f"{'1-' + str(k):>6} {points[k][0][1]:>8} {len(ys):>5} {means[k]:>8.4f} {sd:>7}  {each}")
    flat = [(n, y) for k in ks for _, n, y in points[k]]
    if len({n for n, _ in flat}) < 2:
        return
    # Least squares over all runs (each seed one point): AUROC = a + b * log2(records).
    b, a = statistics.linear_regression([math.log2(n) for n, _ in flat], [y for _, y in flat])
    needed = 2 ** ((args.target - a) / b) if b > 0 else float("inf")
    top = max(n for n, _ in flat)
    print(f"fit over {len(flat)} runs: AUROC = {a:.4f} + {b:.4f} * log2(records): {b:+.4f} per doubling")
    print(f"the fit reaches {args.target} at about {needed:,.0f} training records ({needed / top:.1f}x the {top:,} "
          "trained on here)")
    # Gains per doubling usually shrink as data grows, so the steps between the means say whether the line is hopeful.
    for lo, hi in zip(ks, ks[1:]):
        gain = (means[hi] - means[lo]) / math.log2(points[hi][0][1] / points[lo][0][1])
        print(f"folds 1-{lo} -> 1-{hi}: {gain:+.4f} per doubling of the mean")
    if gain > 0 and means[ks[-1]] < args.target:
        at = points[ks[-1]][0][1] * 2 ** ((args.target - means[ks[-1]]) / gain)
        print(f"at the last step's gain, {args.target} needs about {at:,.0f} training records; "
              "more if the gain per doubling keeps shrinking")


if __name__ == "__main__":
    main()
