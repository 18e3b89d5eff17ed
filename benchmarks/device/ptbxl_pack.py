"""Carry PTB-XL to a GPU machine that has no wfdb and takes at most 64 MiB: an exact, compressed signal pack.

    here:   python benchmarks/device/ptbxl_pack.py pack   --data-dir ../shared/data/ptbxl --labels LABELS.csv --out DIR
    there:  python benchmarks/device/ptbxl_pack.py unpack --pack DIR --data-dir /tmp/ptbxl

PTB-XL's 100 Hz records are int16 at gain 1000 and baseline 0, so the float32 signals round-trip exactly through
int16 (checked on packing). Differences along time compress best (lzma: 0.39 of the int16 bytes, 56 MiB for folds
1-9). Unpacking writes the label table and the float32 signal caches that training.ptbxl would build from WFDB,
named by training.ptbxl itself, for the train (folds 1-8) and validation (fold 9) subsets: the ones fit.py,
evaluate.py and soup.py load, so they then run there unchanged.
"""
from __future__ import annotations

import argparse
import lzma
import shutil
from pathlib import Path

import numpy as np

from msssm_serve.training import ptbxl

GAIN = 1000  # PTB-XL stores microvolts: physical mV = digital / 1000


def pack(data_dir: Path, labels: Path, out: Path) -> None:
    records = ptbxl.load_labels(data_dir, labels_csv=labels)
    signals = np.asarray(ptbxl.load_signals(data_dir, records))  # the full set, in sorted path order
    digital = np.round(signals.astype(np.float64) * GAIN).astype(np.int16)
    if not np.array_equal((digital.astype(np.float64) / GAIN).astype(np.float32), signals):
        raise SystemExit("error: these signals are not int16 at gain 1000; the pack would not be exact")
    steps = np.diff(digital.astype(np.int32), axis=1, prepend=0)
    if np.abs(steps).max() >= 2**15:
        raise SystemExit("error: a sample-to-sample step does not fit in int16")
    out.mkdir(parents=True, exist_ok=True)
    (out / "signals.i16d.xz").write_bytes(lzma.compress(steps.astype(np.int16).tobytes(), preset=6))
    np.save(out / "shape.npy", np.array(digital.shape))
    shutil.copy(labels, out / "labels.csv")


def unpack(pack_dir: Path, data_dir: Path) -> None:
    (data_dir / "records100").mkdir(parents=True, exist_ok=True)  # fit.py's layout check; the caches replace it
    (data_dir / "labels").mkdir(exist_ok=True)
    labels = data_dir / "labels" / "labels.csv"
    shutil.copy(pack_dir / "labels.csv", labels)
    shape = tuple(np.load(pack_dir / "shape.npy"))
    steps = np.frombuffer(lzma.decompress((pack_dir / "signals.i16d.xz").read_bytes()), np.int16).reshape(shape)
    signals = (np.cumsum(steps.astype(np.int32), axis=1).astype(np.float64) / GAIN).astype(np.float32)
    records = ptbxl.load_labels(data_dir, labels_csv=labels)
    row = {path: i for i, path in enumerate(sorted(set(records.paths)))}

    def from_pack(_data_dir, paths, _rate, cache_file):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache_file, signals[[row[p] for p in paths]])

    ptbxl._build_cache = from_pack  # the caches' names and row order stay training.ptbxl's own
    folds = ptbxl.split_folds(records)
    for part in (records.subset(folds["train"]), records.subset(folds["val"])):
        print("cache", ptbxl.load_signals(data_dir, part).shape)
    print(f"labels: {labels}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--labels", type=Path, help="pack: the label table CSV")
    p.add_argument("--out", type=Path, help="pack: the folder to write")
    p.add_argument("--pack", type=Path, help="unpack: the folder pack wrote")
    a = p.parse_args()
    if a.action == "pack":
        pack(a.data_dir, a.labels, a.out)
    else:
        unpack(a.pack, a.data_dir)


if __name__ == "__main__":
    main()
