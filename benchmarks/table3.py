#!/usr/bin/env python
"""The paper's Table 3 side by side: train and evaluate the four PTB-XL label sets we have labels for and print
validation macro AUROC (bootstrap 95 % interval) beside the paper's MS-SSM (S6) and Mamba figures.

    python benchmarks/table3.py --data-dir /tmp/ptbxl-full [--out runs/table3] [-- fit.py flags...]

Each label set trains with the trainer's defaults (the bundled recipe) into OUT/<label set>, from the label tables
DATA_DIR/labels/<label set>.csv; a run already finished is read, a run interrupted is resumed (--resume), so the
command can be stopped and run again, on any machine. Selection and scores are on fold 9 (validation); fold 10 is
never read. The paper reports the test fold after 100 epochs on whole windows: a like-for-like comparison of
recipes, not of folds. Results: benchmarks/results/table3.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from msssm_serve.training import fit

LABEL_SETS = ("superdiagnostic", "subdiagnostic", "form", "rhythm")
PAPER = {  # Table 3, AUROC: MS-SSM (S6), Mamba
    "superdiagnostic": (0.935, 0.912), "subdiagnostic": (0.936, 0.905), "form": (0.901, 0.876),
    "rhythm": (0.979, 0.952),
}


def run_one(data_dir: Path, label_set: str, out: Path, extra: list[str]) -> dict:
    metrics_path = out / "metrics.json"
    if not metrics_path.is_file():
        argv = ["--task", "ptbxl", "--data-dir", str(data_dir), "--labels", str(data_dir / "labels" /
                f"{label_set}.csv"), "--label-set", label_set, "--out", str(out), "--resume", *extra]
        print(f"== {label_set}: python training/fit.py {' '.join(argv)}", file=sys.stderr, flush=True)
        if fit.main(argv) != 0:
            raise SystemExit(f"error: training {label_set} failed")
    return json.loads(metrics_path.read_text())


def table(results: dict[str, dict]) -> str:
    lines = ["| label set | classes | validation macro AUROC (95 % CI) | paper MS-SSM (S6) | paper Mamba | epochs |",
             "|---|---|---|---|---|---|"]
    for name, m in results.items():
        best = m["best"]
        ms, mamba = PAPER[name]
        lines.append(f"| {name} | {len(m['classes'])} | {best['macro_auroc']:.4f} ({best['bootstrap_ci_low']:.4f}–"
                     f"{best['bootstrap_ci_high']:.4f}) | {ms:.3f} | {mamba:.3f} | {len(m['epochs'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path, help="PTB-XL folds 1-9 with labels/<set>.csv")
    parser.add_argument("--out", default=Path("runs/table3"), type=Path, help="one run directory per label set")
    parser.add_argument("--label-sets", default=",".join(LABEL_SETS), help="comma-separated subset to run")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    chosen = [s.strip() for s in args.label_sets.split(",")]
    unknown = sorted(set(chosen) - set(LABEL_SETS))
    if unknown:
        parser.error(f"unknown label sets {unknown}; these have paper figures: {', '.join(LABEL_SETS)}")
    results = {name: run_one(args.data_dir, name, args.out / name, extra) for name in chosen}
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
