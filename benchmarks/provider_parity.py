#!/usr/bin/env python
"""A model directory under onnxruntime's preferred provider (CUDA with onnxruntime-gpu) against PyTorch and the CPU
provider, on the checkpoint's real validation windows: the whole window, sample by sample, random chunks.

    python benchmarks/provider_parity.py --checkpoint runs/default/checkpoint.pt [--model models/default]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np
import onnxruntime as ort


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(ROOT / "models" / "default"))
    p.add_argument("--checkpoint", required=True, help="the checkpoint the model was exported from")
    args = p.parse_args()
    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu finds CUDA/cuDNN from the nvidia-* pip packages
        ort.preload_dlls()
    import torch

    from msssm_serve.export.export import parity_schedules
    from msssm_serve.checkpoint import load_checkpoint
    from msssm_serve.runtime import OnnxModel

    model, meta, _ = load_checkpoint(args.checkpoint)
    windows = np.asarray(meta["parity_windows"], dtype=np.float32)
    with torch.no_grad():
        reference = model.advance(torch.from_numpy(windows), model.zero_state(len(windows)))[0].numpy()
    preferred = OnnxModel(args.model)
    cpu = OnnxModel(args.model, providers=["CPUExecutionProvider"])
    print(f"onnxruntime {ort.__version__}, providers {preferred.providers}, {len(windows)} windows of {windows.shape[1]}")
    worst = 0.0
    for name, sizes in parity_schedules(windows.shape[1]).items():
        outputs = []
        for runtime in (preferred, cpu):
            state, pieces, start = runtime.zero_state(len(windows)), [], 0
            t0 = time.perf_counter()
            for size in sizes:
                probs, state = runtime.advance(windows[:, start : start + size], state)
                pieces.append(probs)
                start += size
            outputs.append((np.concatenate(pieces, axis=1), time.perf_counter() - t0))
        (got, seconds), (on_cpu, _) = outputs
        diff = float(np.abs(got - reference).max())
        worst = max(worst, diff)
        print(f"{preferred.providers[0]} {name.replace('_', ' '):17s}: max |ORT - PyTorch| {diff:.2e}, "
              f"|preferred - CPU provider| {np.abs(got - on_cpu).max():.2e} ({seconds:.2f} s)")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
