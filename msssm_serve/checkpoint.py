"""Checkpoints: the trained model with everything export and serving need to describe it (torch)."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig
from .model import Classifier, EnsembleClassifier, MSSSMClassifier

# What `meta` holds (written by the trainer, read by export into model.json):
#   labels [str], multi_label bool, sample_rate int, leads [str], window int (samples),
#   task str, data {...: where it came from, licence}, label_set str, command str,
#   validation {...: best validation metrics}, stages [str]: the commands before `command` (training/fit_head.py),
#   parity_windows: float32 tensor [n, window, C] of real held-out windows
META_KEYS = ("labels", "multi_label", "sample_rate", "leads", "window")


class CheckpointError(Exception):
    pass


def save_checkpoint(path: str | Path, model: Classifier, meta: dict, **training_state) -> None:
    """Write atomically (tmp + rename) so an interrupted run never leaves a half-written checkpoint. An ensemble is
    its members' shared config, its state dict (`members.<k>.` keys) and `ensemble`: the number of members."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {missing}")
    path = Path(path)
    payload = {"config": model.cfg.to_dict(), "model": model.state_dict(), "meta": meta, **training_state}
    if isinstance(model, EnsembleClassifier):
        payload["ensemble"] = len(model.members)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, map_location="cpu") -> tuple[Classifier, dict, dict]:
    """-> (model in eval mode, meta, the whole payload); an EnsembleClassifier where the payload has `ensemble`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
        cfg = ModelConfig.from_dict(payload["config"])
        members = payload.get("ensemble")
        model = EnsembleClassifier([MSSSMClassifier(cfg) for _ in range(members)]) if members else MSSSMClassifier(cfg)
        model.load_state_dict(payload["model"])
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    return model.eval(), payload["meta"], payload
