"""The README stays runnable: every command of its bash blocks, and its streaming client, run as written, with the
test fixtures standing in for the data (tiny data and two optimiser steps where training is involved) and a temporary
directory for what they write. Lines that install packages or rebuild ../shared data are left out: the test
environment is what they build."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, ServerProcess
from test_training import write_ucr

README = (REPO_ROOT / "README.md").read_text()
TRAIN_FAST = ["--epochs", "1", "--steps-per-epoch", "2", "--d-model", "8", "--n-layers", "1", "--crop", "64",
              "--n-boot", "20", "--device", "cpu", "--parity-windows", "2"]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_the_readme_has_the_commands_this_test_runs():
    found = commands()
    for needed in ("python -m server", "training/fit.py", "export/export.py", "training/evaluate.py", "curl"):
        assert any(needed in c for c in found), needed
    assert len(README.splitlines()) <= 200  # the front page stays a front page


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path, model_dir):
    data = tmp_path / "ptbxl"
    shutil.copytree(REPO_ROOT / "tests/fixtures/ptbxl", data)
    ucr = write_ucr(tmp_path, name="ItalyPowerDemand")
    server = ServerProcess(REPO_ROOT / "models" if (REPO_ROOT / "models/rhythm").is_dir() else model_dir, {},
                           repository=(REPO_ROOT / "models/rhythm").is_dir())
    env_python = sys.executable
    try:
        for line in commands():
            if line.startswith("pip install") or "ptbxl-full/build.py" in line:
                continue  # the environment, and the data the fixtures stand in for
            if line.startswith("python -m server") and "--help" not in line:
                continue  # the server is `server`, started above with the bundled models
            cmd = (line.replace("/tmp/ptbxl-full", str(data)).replace("../shared/data/ucr/ItalyPowerDemand", str(ucr))
                   .replace("runs/", f"{tmp_path}/runs/").replace("models/mine", f"{tmp_path}/mine")
                   .replace("/tmp/ecg.f32", f"{tmp_path}/ecg.f32").replace("127.0.0.1:8000", server.url[7:]))
            args = shlex.split(cmd)
            if args[0] in ("python", "python3"):
                args[0] = env_python
            if "training/fit.py" in cmd:
                args += TRAIN_FAST
            done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            if args[0] == "curl":
                assert '"probabilities"' in done.stdout, (line, done.stdout)
        (client,) = [b for b in blocks("python") if "websockets.connect" in b]
        script = client.replace("ws://127.0.0.1:8000", server.ws_url[:-len("/stream")])
        done = subprocess.run([env_python, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "window 0" in done.stdout, done.stderr[-2000:]
    finally:
        server.stop()
