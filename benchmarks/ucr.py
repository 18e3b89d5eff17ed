#!/usr/bin/env python
"""The UCR defaults on every dataset of a folder, beside ROCKET's published accuracy.

    python benchmarks/ucr.py --data-dir ../shared/data/ucr [--jobs 2] [--only CBF,Beef] [-- extra fit.py flags]

For each dataset DIR/NAME (UCR 2018 format) it runs `python training/fit.py --task ucr --data-dir DIR/NAME` with no
tuning flag (anything after `--` is passed on, for experiments), one torch thread per run and `--jobs` runs at a
time, and reads the run's metrics.json: TEST accuracy of the checkpoint chosen on validation carved from TRAIN, and
the wall time. ROCKET's accuracy is read from the folder's README table (`| name | train | test | length | classes |
ROCKET |`). Prints the table with the ratio accuracy / ROCKET per dataset and their mean, and writes it to
benchmarks/results/ucr.md (and .json), also part-way as each dataset finishes. Run directories go under --runs
(default: a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"


def rocket_table(readme: Path) -> dict[str, dict]:
    """name -> {train, test, length, classes, rocket} from the README's markdown table."""
    rows = {}
    for line in readme.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"0?\.\d+|1\.0+|1", cells[5]) and cells[1].isdigit():
            rows[cells[0]] = {"train": int(cells[1]), "test": int(cells[2]), "length": int(cells[3]),
                              "classes": int(cells[4]), "rocket": float(cells[5])}
    return rows


def run_one(name: str, data_dir: Path, runs: Path, extra: list[str]) -> dict:
    out = runs / name
    command = [sys.executable, str(REPO_ROOT / "training" / "fit.py"), "--task", "ucr", "--data-dir",
               str(data_dir / name), "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.time() - started
    if done.returncode != 0:
        return {"name": name, "error": done.stderr[-1500:], "seconds": seconds}
    metrics = json.loads((out / "metrics.json").read_text())
    return {"name": name, "test_accuracy": metrics["test_accuracy"], "seconds": seconds,
            "val_macro_auroc": metrics["best"]["macro_auroc"], "epoch": metrics["best"]["epoch"],
            "val_accuracy": metrics["best"].get("accuracy"), "val_loss": _best_val_loss(out, metrics),
            # the epochs the served model trained: the refit's, or the folds' mean stopping epoch
            "epochs": metrics["best"]["epoch"] if "cross_validated" in metrics["best"] else len(metrics["epochs"]),
            "config": {k: metrics["config"][k] for k in ("d_model", "n_layers")},
            "recipe": metrics.get("ucr_recipe"), "train_seconds": _train_seconds(out, metrics),
            "members": metrics.get("members")}


def _train_seconds(out: Path, metrics: dict) -> float:
    """The trainer's own clock, every selection run and the refit together (it survives --resume, which the wall
    time does not); `metrics`: the run's metrics.json."""
    selection = metrics.get("selection", {})
    if selection.get("promoted") or "cross_validation" in selection:  # the figure already sums the selection runs
        return metrics["train_wall_seconds"]
    runs = sorted((out / "selection").glob("**/metrics.json"))  # (an ensemble's figure already sums its members)
    return metrics["train_wall_seconds"] + sum(json.loads(path.read_text())["train_wall_seconds"] for path in runs)


def _best_val_loss(out: Path, metrics: dict) -> float | None:
    """The selection run's validation loss at its chosen epoch, or the out-of-fold loss of a cross-validated
    selection (what comparing recipes may look at; TEST never)."""
    if "loss" in metrics["best"]:
        return metrics["best"]["loss"]
    chosen = metrics.get("selection", {}).get("dir")
    m = json.loads((out / chosen / "metrics.json").read_text()) if chosen else metrics
    best = m["best"]["epoch"]
    return next((e.get("val_loss") for e in m["epochs"] if e["epoch"] == best), None)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="a folder of UCR datasets with a README table of ROCKET")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--only", default="", help="comma-separated dataset names (default: all in the table)")
    parser.add_argument("--runs", default=None, help="where the run directories go (default: a temporary one)")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where ucr<tag>.md and .json are written")
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir)
    table = rocket_table(data_dir / "README.md")
    names = [n for n in (args.only.split(",") if args.only else table) if (data_dir / n).is_dir()]
    if not names:
        raise SystemExit(f"no UCR datasets of the README table under {data_dir}")
    runs = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="msssm-ucr-"))
    started = time.time()
    # The longest first, so that the pool ends together. The results are written as each dataset finishes, so that
    # a run stopped part-way (a session's end) leaves what it measured; run again with `-- --resume` and the same
    # --runs, it reads the finished runs and continues the others.
    order = sorted(names, key=lambda n: -table[n]["train"] * table[n]["length"])
    results = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for done in as_completed([pool.submit(run_one, n, data_dir, runs, extra) for n in order]):
            r = done.result()
            results[r["name"]] = r
            if "error" in r:
                print(f"{r['name']} failed:\n{r['error']}", file=sys.stderr)
            wall = time.time() - started
            text, mean = report(names, table, results, extra, args.jobs, data_dir, wall)
            write(text, mean, results, extra, wall, args)
    print(text)


def report(names: list[str], table: dict, results: dict, extra: list[str], jobs: int, data_dir: Path,
           wall: float) -> tuple[str, float]:
    """The markdown table of the datasets finished so far (all of them at the end), and their mean ratio."""
    flags = " ".join(extra)
    finished = [n for n in names if n in results]
    progress = "" if len(finished) == len(names) else (
        f" **Part-way: {len(finished)} of {len(names)} datasets finished so far; the mean is over those.**")
    lines = ["# UCR: the defaults against ROCKET", "",
             f"`python benchmarks/ucr.py --data-dir {os.path.relpath(data_dir)} --jobs {jobs}"
             + (f" -- {flags}" if flags else "") + f"`: {len(names)} datasets, {wall / 60:.1f} min wall on "
             f"{os.cpu_count()} cores ({jobs} runs at a time, one thread each). TEST accuracy of the checkpoint "
             f"chosen on validation carved from TRAIN; ROCKET: its authors' mean of 10 runs.{progress}"
             + (" With `--resume` the wall time is this invocation's: runs it found finished were read, not trained "
                "again (the train time column is each dataset's whole training)." if "--resume" in extra else ""), "",
             "Template: whether the model chosen on validation is fed each sample's deviation from the training mean "
             "series (the trainer selects without and with it), with the share of the variance that mean series "
             "explains. Model: layers x width, times the members served as one ensemble (the cross-validation folds' "
             "models, or the refits); one member: their TEST accuracies' mean (what one of them scores, on average). "
             "Epochs: what the served models trained (the folds' mean stopping epoch, or the refit's). Train time: the "
             "trainer's clock, every run (both template choices, every fold or refit).",
             "",
             "| dataset | train | length | classes | model | template | epochs | one member | accuracy | ROCKET | ratio "
             "| train time s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios, one_ratios = [], []
    for name in finished:
        t, r = table[name], results[name]
        if "error" in r:
            lines.append(f"| {name} | {t['train']} | {t['length']} | {t['classes']} | failed | | | | | {t['rocket']:.3f} "
                         f"| | {r['seconds']:.0f} |")
            continue
        ratio = r["test_accuracy"] / t["rocket"]
        ratios.append(ratio)
        model = f"{r['config']['n_layers']}x{r['config']['d_model']}"
        members = r.get("members") or []
        one = sum(m["test_accuracy"] for m in members) / len(members) if members else r["test_accuracy"]
        model += f" ×{len(members)}" if members else ""
        one_ratios.append(one / t["rocket"])
        recipe = r.get("recipe") or {}
        template = f"{recipe['template']} ({recipe['template_share']:.2f})" if "template" in recipe else ""
        lines.append(f"| {name} | {t['train']} | {t['length']} | {t['classes']} | {model} | {template} | {r['epochs']} "
                     f"| {one:.3f} | {r['test_accuracy']:.3f} | {t['rocket']:.3f} | {ratio:.3f} "
                     f"| {r['train_seconds']:.0f} |")
    mean = sum(ratios) / len(ratios) if ratios else float("nan")
    ok = [results[n] for n in finished if "error" not in results[n]]
    val_acc = [r["val_accuracy"] for r in ok if r.get("val_accuracy") is not None]
    val_loss = [r["val_loss"] for r in ok if r.get("val_loss") is not None]
    lines += ["", f"**Mean ratio {mean:.3f}** over {len(ratios)} datasets; lowest "
                  f"{min(ratios):.3f}; {sum(r < 0.85 for r in ratios)} below 0.85." if ratios else "no results"]
    if ratios and one_ratios != ratios:
        lines += ["", f"One member alone (the mean of each ensemble's members): mean ratio "
                      f"{sum(one_ratios) / len(one_ratios):.3f}."]
    if val_acc and val_loss:  # what recipes are compared on: validation carved from TRAIN, never TEST
        lines += ["", f"Validation (selection runs, chosen epoch): mean accuracy {sum(val_acc) / len(val_acc):.3f}, "
                      f"mean loss {sum(val_loss) / len(val_loss):.3f}."]
    return "\n".join(lines) + "\n", mean


def write(text: str, mean: float, results: dict, extra: list[str], wall: float, args) -> None:
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"ucr{args.tag}.md").write_text(text)
    (results_dir / f"ucr{args.tag}.json").write_text(json.dumps({
        "flags": extra, "wall_seconds": wall, "mean_ratio": mean, "results": results}, indent=2))


if __name__ == "__main__":
    main()
