"""The model card (the model directory's README.md), written from model.json's description."""

from __future__ import annotations

import json

from msssm_serve.export.meta import jsonable as _jsonable


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(desc: dict) -> str:
    training = desc["training"]
    data = training.get("data")
    lines = [
        f"# {desc['name']}",
        "",
        f"MS-SSM ECG classifier exported by msssm-serve {desc['version']}: {len(desc['labels'])} classes "
        f"({'multi-label, sigmoid' if desc['multi_label'] else 'single-label, softmax'}) from "
        f"{len(desc['leads'])} leads at {desc['sample_rate']} Hz, trained on windows of {desc['window']} samples.",
        "",
        f"Labels: {', '.join(desc['labels'])}",
        "",
        "## Model",
        "",
        "| key | value |",
        "| --- | --- |",
        *(f"| {k} | {_fmt(v)} |" for k, v in desc["config"].items()),
        "",
        *([f"An ensemble of {desc['ensemble']['members']} models of this configuration"
           + (f" (seeds {', '.join(map(str, desc['ensemble']['seeds']))})" if "seeds" in desc["ensemble"] else "")
           + (f", each trained on TRAIN less one of {desc['ensemble']['folds']} cross-validation folds and stopped "
              "on that fold" if "folds" in desc["ensemble"] else "")
           + ", each with its own state, in one graph: it answers the mean of their probabilities.", ""]
          if "ensemble" in desc else []),
        f"Streaming state: {len(desc['state'])} tensors, {desc['state_bytes_per_stream']} bytes per stream. "
        f"The graph takes any number of samples per call (up to {desc['max_chunk']}); on the CPU the runtime cuts work "
        "into calls of about 512 samples, which keeps the graph's intermediates in cache.",
        "",
        "## Data",
        "",
    ]
    if data is not None:
        lines.append(f"```\n{json.dumps(data, indent=2, default=_jsonable)}\n```")
    else:
        lines.append("Not recorded in the checkpoint.")
    if "ptbxl" in json.dumps(data, default=_jsonable).lower().replace("-", ""):
        lines += [
            "",
            "PTB-XL (Wagner et al., PhysioNet) is distributed under the Creative Commons Attribution 4.0 "
            "International licence (CC BY 4.0); this model is derived from it and the attribution applies.",
        ]
    for key in ("task", "label_set"):
        if key in training:
            lines.append(f"\n{key}: {training[key]}")
    lines += ["", "## Training command", "", f"```\n{training.get('command', 'not recorded')}\n```", ""]
    lines += ["## Validation", ""]
    lines += validation_lines(desc["validation"], desc["labels"])
    parity = desc["parity"]
    lines += [
        "",
        "## Export parity",
        "",
        f"Max abs probability difference, ONNX Runtime vs PyTorch, on {parity['windows']} real windows of "
        f"{parity['window_samples']} samples (tolerance {parity['tolerance']:g}):",
        "",
        f"- whole window in one call: {parity['whole_window']:.3g}",
        f"- sample by sample: {parity['sample_by_sample']:.3g}",
        f"- random chunks: {parity['random_chunks']:.3g}",
        f"- ONNX Runtime streaming vs its own whole-window run: sample by sample "
        f"{parity['onnxruntime_consistency']['sample_by_sample']:.3g}, random chunks "
        f"{parity['onnxruntime_consistency']['random_chunks']:.3g}",
        *([f"- scale-mixer weights (output `scale_weights`, scales {', '.join(desc['scale_weights']['scales'])}), "
           "relative to their largest magnitude: "
           + ", ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in parity["scale_weights"].items() if k != "relative_to")]
          if "scale_weights" in parity else []),
        "",
        f"ONNX opset {desc['onnx']['opset']}, {desc['onnx']['exporter']}; `model.onnx` sha256 {desc['onnx']['sha256']}.",
        "",
    ]
    return "\n".join(lines)


def validation_lines(validation: dict | None, labels: list[str]) -> list[str]:
    """Macro AUROC and its selection, then per class, then (a lead-subset model) per lead subset, as tables."""
    if not validation:
        return ["Not recorded in the checkpoint."]
    scalars = {k: v for k, v in validation.items() if not isinstance(v, dict)}
    lines = ["| metric | value |", "| --- | --- |", *(f"| {k} | {_fmt(v)} |" for k, v in scalars.items())]
    per_class = validation.get("per_class_auroc")
    if isinstance(per_class, dict):
        lines += ["", "| class | AUROC |", "| --- | --- |",
                  *(f"| {name} | {_fmt(per_class[name])} |" for name in labels if name in per_class)]
    subsets = validation.get("lead_subsets")
    if isinstance(subsets, dict):
        lines += ["", "Lead subsets (the others missing), validation macro AUROC with its bootstrap 95 % interval:", "",
                  "| leads | macro AUROC | 95 % interval |", "| --- | --- | --- |"]
        for name, row in subsets.items():
            lines.append(f"| {name} | {_fmt(row['macro_auroc'])} | {_fmt(row.get('bootstrap_ci_low'))}–"
                         f"{_fmt(row.get('bootstrap_ci_high'))} |")
    return lines
