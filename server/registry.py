"""The models a server holds: one directory (`--model DIR`, named `default`) or a repository of them (`--models DIR`,
one subdirectory per model, named after it). Each model gets its own batcher: streams of one model batch together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException

from msssm_serve.runtime import SCALE_WEIGHT_SUMMARY, ModelDirError, OnnxModel

from .batcher import Batcher
from .metrics import Metrics

DEFAULT_NAME = "default"


@dataclass
class ServedModel:
    name: str
    model: OnnxModel
    batcher: Batcher

    def describe(self) -> dict:
        m = self.model
        return {"name": self.name, "model": m.name, "version": m.meta.get("version"), "labels": m.labels,
                "multi_label": m.multi_label, "leads": m.leads, "lead_subsets": m.lead_subsets,
                "sample_rate": m.sample_rate, "window": m.window, "default_hop": m.default_hop,
                "state_bytes": m.state_bytes, "validation": validation_summary(m.meta),
                "scale_weights": scale_weights_summary(m)}


def scale_weights_summary(model: OnnxModel) -> dict | None:
    """What `scale_weights` in predictions means for this model (None: its graph has no mixer output)."""
    if not model.has_scale_weights:
        return None
    return {"scales": model.scales, "definition": SCALE_WEIGHT_SUMMARY,
            "layers": model.meta.get("scale_weights", {}).get("layers"),
            "mixer": model.meta.get("scale_weights", {}).get("mixer")}


def served_model(models: dict[str, ServedModel], name: str) -> ServedModel:
    """The model called `name`; HTTP 404 naming those the server holds."""
    if name not in models:
        raise HTTPException(404, f"no model named {name!r}; this server holds {sorted(models)} (GET /models)")
    return models[name]


def all_running(models: dict[str, ServedModel] | None) -> bool:
    """Every model's batcher is running: the server is ready."""
    return bool(models) and all(m.batcher.running for m in models.values())


def validation_summary(meta: dict) -> dict | None:
    """What the model card says about held-out data: macro AUROC (with interval), per class, lead subsets."""
    v = meta.get("validation")
    if not isinstance(v, dict):
        return None
    keys = ("macro_auroc", "bootstrap_ci_low", "bootstrap_ci_high", "per_class_auroc", "lead_subsets", "epoch")
    data = meta.get("training", {}).get("data", {})
    return {**{k: v[k] for k in keys if k in v},
            "data": {k: data[k] for k in ("name", "label_set", "train_records", "val_records") if k in data}}


def model_dirs(model_dir: Path, models_dir: Path | None) -> dict[str, Path]:
    """Name -> directory of every model to serve, in name order."""
    if models_dir is None:
        return {DEFAULT_NAME: Path(model_dir)}
    root = Path(models_dir)
    if not root.is_dir():
        raise ModelDirError(f"{root}: model repository not found")
    found = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and (p / "model.json").is_file()}
    if not found:
        raise ModelDirError(f"{root}: no model directories in it (subdirectories holding model.json)")
    return found


def default_name(names) -> str:
    """`default` when the repository has it, else the first name in order."""
    names = sorted(names)
    return DEFAULT_NAME if DEFAULT_NAME in names else names[0]


def load(model_dir: Path, models_dir: Path | None, metrics: Metrics, batch_wait_ms: float,
         admit_latency_ms: float = 0.0, streams_on_loop: bool = False) -> dict[str, ServedModel]:
    bound = admit_latency_ms if admit_latency_ms > 0 else float("inf")
    return {name: ServedModel(name, model := OnnxModel(path),
                              Batcher(model, metrics, batch_wait_ms, bound, streams_on_loop))
            for name, path in model_dirs(model_dir, models_dir).items()}
