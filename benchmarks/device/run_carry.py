"""Carry unfinished runs to and from a GPU machine under its 64 MiB limit, to continue them with fit.py --resume.

    here:   python benchmarks/device/run_carry.py strip   --runs runs/a runs/b --out DIR
    there:  python benchmarks/device/run_carry.py restore --carried DIR --to /tmp/runs

Each checkpoint holds the same eight validation windows for export's parity check (385 kB of a 1.1 MB last.pt);
they are carried once and put back, so the restored last.pt and checkpoint.pt are the originals.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

FILES = ("last.pt", "checkpoint.pt")


def strip(runs: list[Path], out: Path) -> None:
    shared = None
    for run in runs:
        (out / run.name).mkdir(parents=True, exist_ok=True)
        for name in FILES:
            payload = torch.load(run / name, weights_only=False, map_location="cpu")
            windows = payload["meta"].pop("parity_windows")
            if shared is None:
                shared = windows
                torch.save(windows, out / "parity_windows.pt")
            elif not torch.equal(shared, windows):
                raise SystemExit(f"error: {run / name} holds other parity windows; carry it separately")
            torch.save(payload, out / run.name / name)


def restore(carried: Path, to: Path) -> None:
    windows = torch.load(carried / "parity_windows.pt", weights_only=False)
    for run in sorted(p for p in carried.iterdir() if p.is_dir()):
        (to / run.name).mkdir(parents=True, exist_ok=True)
        for name in FILES:
            payload = torch.load(run / name, weights_only=False, map_location="cpu")
            payload["meta"]["parity_windows"] = windows
            torch.save(payload, to / run.name / name)
        print("restored", to / run.name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("strip")
    s.add_argument("--runs", type=Path, nargs="+", required=True)
    s.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("restore")
    r.add_argument("--carried", type=Path, required=True)
    r.add_argument("--to", type=Path, required=True)
    a = p.parse_args()
    strip(a.runs, a.out) if a.action == "strip" else restore(a.carried, a.to)


if __name__ == "__main__":
    main()
