"""Shared fixtures: a small exported model directory built from the PTB-XL fixture records, and real uvicorn
servers (`python -m server`) on free loopback ports."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.launcher import LocalServer

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORDS = sorted((REPO_ROOT / "tests/fixtures/ptbxl/records100").glob("*/*.hea"))
LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
LABELS = ["CD", "HYP", "MI", "NORM", "STTC"]  # as the trainer orders the superdiagnostic classes
SERVER_START_TIMEOUT_S = 60


@pytest.fixture(scope="session")
def records() -> np.ndarray:
    """Real ECG records [n, 1000, 12] float32 (10 s at 100 Hz, mV)."""
    wfdb = pytest.importorskip("wfdb")
    if len(RECORDS) < 3:
        pytest.skip("needs PTB-XL fixture records under tests/fixtures/ptbxl/records100")
    return np.stack([wfdb.rdsamp(str(p.with_suffix("")))[0] for p in RECORDS[:4]]).astype(np.float32)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, records) -> Path:
    """A tiny random model exported like a trained one (parity-checked on the real records)."""
    torch = pytest.importorskip("torch")
    from msssm_serve.export.export import export_model
    from msssm_serve.checkpoint import save_checkpoint
    from msssm_serve.config import ModelConfig
    from msssm_serve.model import MSSSMClassifier

    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    model = MSSSMClassifier(ModelConfig(d_model=16, n_layers=2, d_state=4, n_classes=len(LABELS))).eval()
    model.input_mean.normal_(0, 0.1)
    model.input_std.uniform_(0.5, 2.0)
    meta = {"labels": LABELS, "multi_label": model.cfg.multi_label, "sample_rate": 100, "leads": LEADS,
            "window": records.shape[1], "task": "ptbxl", "data": {"dataset": "PTB-XL fixture records"},
            "validation": {"macro_auroc": 0.5}, "parity_windows": torch.from_numpy(records)}
    save_checkpoint(root / "checkpoint.pt", model, meta)
    export_model(root / "checkpoint.pt", root / "model", name="tiny-test")
    return root / "model"


RHYTHM_LABELS = ["AFIB", "SBRAD", "SR", "STACH"]


@pytest.fixture(scope="session")
def subset_model_dir(tmp_path_factory, records) -> Path:
    """A tiny random lead-subset model (`lead_mask`: any of the 12 leads may be missing), exported and
    parity-checked on the real records with leads dropped."""
    torch = pytest.importorskip("torch")
    from msssm_serve.export.export import export_model
    from msssm_serve.checkpoint import save_checkpoint
    from msssm_serve.config import ModelConfig
    from msssm_serve.model import MSSSMClassifier

    root = tmp_path_factory.mktemp("subset")
    torch.manual_seed(1)
    model = MSSSMClassifier(ModelConfig(d_model=16, n_layers=2, d_state=4, n_classes=len(RHYTHM_LABELS),
                                        lead_mask=True)).eval()
    model.input_mean.normal_(0, 0.1)
    model.input_std.uniform_(0.5, 2.0)
    meta = {"labels": RHYTHM_LABELS, "multi_label": True, "sample_rate": 100, "leads": LEADS,
            "window": records.shape[1], "task": "ptbxl", "label_set": "rhythm",
            "data": {"dataset": "PTB-XL fixture records"}, "validation": {"macro_auroc": 0.5},
            "parity_windows": torch.from_numpy(records)}
    save_checkpoint(root / "checkpoint.pt", model, meta)
    export_model(root / "checkpoint.pt", root / "model", name="tiny-rhythm")
    return root / "model"


@pytest.fixture(scope="session")
def repository(tmp_path_factory, model_dir, subset_model_dir) -> Path:
    """A model repository: `default` (12 leads required) and `rhythm` (lead subsets)."""
    root = tmp_path_factory.mktemp("repository")
    (root / "default").symlink_to(model_dir)
    (root / "rhythm").symlink_to(subset_model_dir)
    return root


def metric_value(url: str, name: str, headers: dict | None = None) -> float:
    """One unlabelled sample of a server's /metrics: a gauge, or a histogram's `_sum` or `_count`."""
    text = httpx.get(url + "/metrics", headers=headers).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


class ServerProcess(LocalServer):
    """A test server: one onnxruntime thread (tests share two cores), log beside the model."""

    def __init__(self, model_dir: Path, env: dict[str, str], extra_args: list[str] | None = None,
                 repository: bool = False, port: int | None = None):
        log = model_dir.parent / f"server-{time.monotonic_ns()}.log"
        # No latency-based admission or shedding: tests share two cores with their clients, so a busy CI machine
        # must not turn a correctness test into a load test (admission and shedding are tested on their own).
        super().__init__(model_dir, log, env={"MSSSM_THREADS": "1", "MSSSM_ADMIT_LATENCY_MS": "0", **env},
                         extra_args=extra_args,
                         start_timeout_s=SERVER_START_TIMEOUT_S, repository=repository, port=port)


@pytest.fixture(scope="session")
def server(model_dir):
    proc = ServerProcess(model_dir, {"MSSSM_MAX_STREAMS": "60"})
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def strict_server(model_dir):
    """API key, two streams at most, small frames and bodies, short idle timeout."""
    proc = ServerProcess(model_dir, {"MSSSM_API_KEY": "s3cret", "MSSSM_MAX_STREAMS": "2",
                                     "MSSSM_MAX_FRAME_BYTES": "4800", "MSSSM_MAX_BODY_BYTES": "100000",
                                     "MSSSM_IDLE_TIMEOUT_S": "1", "MSSSM_MAX_SIGNAL_SECONDS": "30"})
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def multi_server(repository):
    """A server holding a model repository: `default` and the lead-subset `rhythm`."""
    proc = ServerProcess(repository, {"MSSSM_MAX_STREAMS": "20"}, repository=True)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def rhythm(subset_model_dir):
    from msssm_serve.runtime import OnnxModel

    return OnnxModel(subset_model_dir, threads=1)
