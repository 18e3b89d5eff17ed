#!/usr/bin/env python
"""Writes the real records the monitor page offers (server/static/records/): PTB-XL records of several classes, as
JSON the page plays through /stream. Run from the repository root with the PTB-XL layout beside it:

    python examples/build_page_records.py --data-dir ../shared/data/ptbxl

Each file: the record's 10 s at 100 Hz, 12 leads in mV (PTB-XL's own resolution, 0.001 mV), its superdiagnostic and
rhythm statements and the credit. Records come from folds 1-8 only (fold 9 selects models; fold 10 is the test fold).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
from pathlib import Path

import numpy as np
import wfdb

OUT = Path(__file__).resolve().parents[1] / "server" / "static" / "records"
# ecg_id -> what it shows
RECORDS = {1: "normal ECG, sinus rhythm", 32: "conduction disturbance", 22: "ST/T change", 96: "hypertrophy",
           77: "myocardial infarction with conduction disturbance", 282: "atrial fibrillation",
           103: "sinus tachycardia"}
CREDIT = ("PTB-XL (Wagner et al., Scientific Data 7, 154, 2020; PhysioNet), CC BY 4.0: "
          "https://doi.org/10.1038/s41597-020-0495-6")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="PTB-XL in its official layout")
    args = parser.parse_args()
    data = Path(args.data_dir)
    meta = {int(r["ecg_id"]): r for r in csv.DictReader(open(data / "ptbxl_database.csv"))}
    labels = {}
    for label_set in ("superdiagnostic", "rhythm"):
        for r in csv.DictReader(open(data / "labels" / f"{label_set}.csv")):
            names = [k for k, v in r.items() if v == "1" and k not in ("ecg_id", "patient_id", "strat_fold")]
            labels.setdefault(int(r["ecg_id"]), {})[label_set] = names
    index = []
    OUT.mkdir(parents=True, exist_ok=True)
    for ecg_id, shows in RECORDS.items():
        row = meta[ecg_id]
        if int(row["strat_fold"]) > 8:
            raise SystemExit(f"record {ecg_id} is in fold {row['strat_fold']}: only folds 1-8 are shown")
        signal, fields = wfdb.rdsamp(str(data / row["filename_lr"]))
        name = f"ptbxl_{ecg_id:05d}"
        record = {"name": name, "ecg_id": ecg_id, "shows": shows, "sample_rate": int(fields["fs"]),
                  "leads": [n.upper() for n in fields["sig_name"]], "units": "mV",
                  "scp_codes": ast.literal_eval(row["scp_codes"]), "labels": labels.get(ecg_id, {}),
                  "source": CREDIT, "signal": np.round(np.nan_to_num(signal), 3).tolist()}
        (OUT / f"{name}.json").write_text(json.dumps(record, separators=(",", ":")))
        index.append({k: record[k] for k in ("name", "ecg_id", "shows", "sample_rate", "leads", "labels")})
        print(f"{name}: {shows}; {record['labels']}")
    (OUT / "index.json").write_text(json.dumps({"source": CREDIT, "records": index}, indent=1) + "\n")


if __name__ == "__main__":
    main()
