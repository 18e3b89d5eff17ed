"""The seeded WebSocket fuzzer (loadtest/fuzz.py) in a bounded form: hostile connections beside honest streams
against a real server; it exits non-zero on a 1011, a traceback, a leaked slot or an honest prediction off
/classify."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_leaves_no_1011_no_traceback_no_leaked_slot(model_dir, seed):
    run = subprocess.run([sys.executable, "loadtest/fuzz.py", "--model", str(model_dir), "--connections", "120", "--gateways", "30",
                          "--parallel", "30", "--honest", "6", "--max-streams", "40", "--seed", str(seed),
                          "--p99-ms", "2000"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                         env={"MSSSM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    report = json.loads("\n".join(lines[len(lines) - 1 - lines[::-1].index("{"):]))  # the last line "{" opens it
    assert report["problems"] == [] and report["honest_predictions_checked"] >= 6, report
    assert "1011" not in report["close_codes"], report
