#!/usr/bin/env python
"""The paper's Table 3 side by side: train and evaluate the four PTB-XL label sets we have labels for and print
validation macro AUROC (bootstrap 95 % interval) beside the paper's MS-SSM (S6) and Mamba figures.

    python benchmarks/table3.py --data-dir /tmp/ptbxl-full [--out runs/table3] [--model SET=MODEL_DIR]
                                [-- fit.py flags...]

Each label set trains with the trainer's defaults (the bundled recipe) into OUT/<label set>, from the label tables
DATA_DIR/labels/<label set>.csv; a run already finished is read, a run interrupted is resumed (--resume), so the
command can be stopped and run again, on any machine. `--model superdiagnostic=models/default` scores a model
directory trained with those defaults instead of training again (through onnxruntime, as served). Selection and
scores are on fold 9 (validation); fold 10 is never read. The paper reports the test fold after 100 epochs on whole
windows: a like-for-like comparison of recipes, not of folds. The table is printed and written to --results.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from msssm_serve.training import fit
from msssm_serve.training.evaluate import score

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "table3.md"

LABEL_SETS = ("superdiagnostic", "subdiagnostic", "form", "rhythm")
PAPER = {  # Table 3, AUROC: MS-SSM (S6), Mamba
    "superdiagnostic": (0.935, 0.912), "subdiagnostic": (0.936, 0.905), "form": (0.901, 0.876),
    "rhythm": (0.979, 0.952),
}


def run_one(data_dir: Path, label_set: str, out: Path, extra: list[str]) -> dict:
    """Train the label set with the defaults (or read the finished run): its best epoch as a table row."""
    metrics_path = out / "metrics.json"
    if not metrics_path.is_file():
        argv = ["--task", "ptbxl", "--data-dir", str(data_dir), "--labels", str(data_dir / "labels" /
                f"{label_set}.csv"), "--label-set", label_set, "--out", str(out), "--resume", *extra]
        print(f"== {label_set}: python training/fit.py {' '.join(argv)}", file=sys.stderr, flush=True)
        if fit.main(argv) != 0:
            raise SystemExit(f"error: training {label_set} failed")
    m = json.loads(metrics_path.read_text())
    best = m["best"]
    return {"classes": len(m["classes"]), "macro_auroc": best["macro_auroc"], "ci_low": best["bootstrap_ci_low"],
            "ci_high": best["bootstrap_ci_high"], "source": f"{len(m['epochs'])} epochs, `{out}`"}


def score_model(data_dir: Path, label_set: str, model_dir: str) -> dict:
    """A model directory trained with the defaults, scored on fold 9 as served: a table row."""
    print(f"== {label_set}: scoring {model_dir} on fold 9", file=sys.stderr, flush=True)
    r = score([model_dir], str(data_dir), label_set=label_set, labels=str(data_dir / "labels" / f"{label_set}.csv"))
    return {"classes": len(r["per_class_auroc"]), "macro_auroc": r["macro_auroc"], "ci_low": r["ci_low"],
            "ci_high": r["ci_high"], "source": f"`{model_dir}`"}


def table(results: dict[str, dict]) -> str:
    lines = ["| label set | classes | validation macro AUROC (95 % CI) | paper MS-SSM (S6) | paper Mamba | run |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        ms, mamba = PAPER[name]
        ci = f"{r['ci_low']:.4f}–{r['ci_high']:.4f}" if r["ci_low"] is not None else "no interval"
        lines.append(f"| {name} | {r['classes']} | {r['macro_auroc']:.4f} ({ci}) | {ms:.3f} | {mamba:.3f} | "
                     f"{r['source']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path, help="PTB-XL folds 1-9 with labels/<set>.csv")
    parser.add_argument("--out", default=Path("runs/table3"), type=Path, help="one run directory per label set")
    parser.add_argument("--label-sets", default=",".join(LABEL_SETS), help="comma-separated subset to run")
    parser.add_argument("--model", action="append", default=[], metavar="SET=MODEL_DIR",
                        help="score this model directory (trained with the defaults) for SET instead of training")
    parser.add_argument("--results", type=Path, default=None,
                        help="where the table is written, with the command that made it ('-': nowhere; unset: "
                             "benchmarks/results/table3.md when all four label sets run, nowhere for a subset, so "
                             "that a partial run does not replace the whole table)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    chosen = [s.strip() for s in args.label_sets.split(",")]
    unknown = sorted(set(chosen) - set(LABEL_SETS))
    if unknown:
        parser.error(f"unknown label sets {unknown}; these have paper figures: {', '.join(LABEL_SETS)}")
    models = dict(item.split("=", 1) for item in args.model if "=" in item)
    if len(models) != len(args.model) or set(models) - set(chosen):
        parser.error(f"--model takes SET=MODEL_DIR for one of the chosen sets ({', '.join(chosen)})")
    results = {name: score_model(args.data_dir, name, models[name]) if name in models
               else run_one(args.data_dir, name, args.out / name, extra) for name in chosen}
    print(table(results))
    if args.results is None and set(chosen) != set(LABEL_SETS):
        print("a subset of the label sets: the table was not written (--results FILE writes it)", file=sys.stderr)
    elif str(args.results) != "-":
        results_path = args.results or DEFAULT_RESULTS
        command = shlex.join(["python", "benchmarks/table3.py", *(argv if argv is not None else sys.argv[1:])])
        results_path.write_text(f"# The paper's Table 3 beside ours\n\n`{command}`\n\n{table(results)}\n\n"
                                "Ours: fold 9 (validation), folds 1–8 trained, fold 10 never read. The paper's: the "
                                "test fold (fold 10), after 100 epochs on whole windows.\n")
        print(f"wrote {results_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
