"""Checkpoint meta as JSON: what numpy, torch and paths become."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def jsonable(value):
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable in checkpoint meta: {type(value).__name__}")
