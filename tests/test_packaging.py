"""The package as the Python ecosystem expects it: one import name in site-packages, console scripts, the bundled
models shipped as package data, and a served model path that does not depend on the working directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
def test_the_wheel_installs_one_import_name_with_the_models_and_console_scripts(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(REPO_ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("msssm_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"msssm_serve"}, top
    for needed in ("msssm_serve/server/app.py", "msssm_serve/training/fit.py", "msssm_serve/export/export.py",
                   "msssm_serve/models/default/model.onnx", "msssm_serve/models/default/model.json",
                   "msssm_serve/server/static/index.html", "msssm_serve/server/static/monitor.js",
                   "msssm_serve/server/static/records/index.json"):
        assert needed in names, needed
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("msssm-serve = msssm_serve.server.__main__:main", "msssm-train = msssm_serve.training.fit:main",
                   "msssm-export = msssm_serve.export.export:main"):
        assert script in scripts, scripts


def test_the_console_scripts_run_from_anywhere(tmp_path):
    bindir = __import__("pathlib").Path(sys.executable).parent
    for script in ("msssm-serve", "msssm-train", "msssm-export"):
        done = subprocess.run([str(bindir / script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout, (script, done.stderr[-1000:])
    assert "(default:" in subprocess.run([str(bindir / "msssm-serve"), "--help"], cwd=tmp_path, capture_output=True,
                                         text=True, timeout=120).stdout
