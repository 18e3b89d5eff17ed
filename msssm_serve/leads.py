"""Lead names and lead subsets: what a client's leads mean to a model (numpy only).

Names are matched case-insensitively after aliases (MIT-BIH's modified limb leads MLI/MLII/MLIII are the limb leads
they are placed as). A model trained on lead subsets (`lead_subsets` in model.json) takes any of its leads and reads
the others as missing (NaN); any other model needs each of its leads, and a request that lacks one is refused naming
it. Nothing is ever silently zero-filled.
"""

from __future__ import annotations

import numpy as np

ALIASES = {"MLI": "I", "MLII": "II", "MLIII": "III", "ML2": "II", "D1": "I", "D2": "II", "D3": "III"}


class LeadError(ValueError):
    pass


def canonical(name: str) -> str:
    key = name.strip().upper()
    return ALIASES.get(key, key)


class LeadMap:
    """Columns of a client's signal [T, n_given] -> the model's lead order [T, C]; missing leads NaN."""

    def __init__(self, given: list[str] | None, model_leads: list[str], lead_subsets: bool):
        self.model_leads = list(model_leads)
        if given is None:
            given = self.model_leads
        if not isinstance(given, list) or not given or not all(isinstance(n, str) for n in given):
            raise LeadError("'leads' must be a non-empty list of lead names")
        wanted = [canonical(n) for n in self.model_leads]
        keys = [canonical(n) for n in given]
        unknown = [name for name, key in zip(given, keys) if key not in wanted]
        twice = sorted({name for name, key in zip(given, keys) if keys.count(key) > 1})
        if unknown or twice:
            raise LeadError(f"'leads' must name leads of the model {self.model_leads} at most once "
                            f"(aliases: {', '.join(f'{a} = {c}' for a, c in ALIASES.items())}); "
                            f"unknown: {unknown}, named twice: {twice}")
        missing = [name for name, key in zip(self.model_leads, wanted) if key not in keys]
        if missing and not lead_subsets:
            raise LeadError(f"this model needs all of its leads {self.model_leads}; missing: {missing}. "
                            "Send them, or use a model trained on lead subsets (GET /models: lead_subsets)")
        self.n_given = len(given)
        self.missing = missing
        # source column of each model lead, -1 where the client has none
        self.source = np.array([keys.index(key) if key in keys else -1 for key in wanted])
        self.identity = not missing and (self.source == np.arange(len(wanted))).all()

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        if self.identity:
            return samples
        out = np.full((len(samples), len(self.model_leads)), np.nan, np.float32)
        present = self.source >= 0
        out[:, present] = samples[:, self.source[present]]
        return out


def parse_lead_list(value) -> list[str] | None:
    """`leads` as a JSON list or a comma-separated query string; None when not given."""
    if value is None:
        return None
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return value
