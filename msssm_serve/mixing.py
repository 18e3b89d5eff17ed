"""Mean mixing distance (paper section 3.1 and appendix A.3): how far back, on average, an output looks.

    d(m) = sum_{n<=m} |J_{m,n}| / |sum_{k<=m} J_{m,k}| * (m - n)

with J_{m,n} = d y_{m,c} / d x_{n,c}, the Jacobian of a sequence map restricted to one channel, averaged over the
channels (and, for a model, over its layers).
"""

from __future__ import annotations

import torch


def mean_mixing_distance(fn, x: torch.Tensor, position: int = -1) -> float:
    """fn: [1, L, D] -> [1, L, D]; x: [L, D]. Distance of output `position` (default: the last token)."""
    length, channels = x.shape
    m = position % length
    x = x.detach().unsqueeze(0).requires_grad_(True)
    y = fn(x)
    distances = torch.arange(m, -1, -1, dtype=x.dtype)  # m - n for n = 0..m
    total = 0.0
    for c in range(channels):
        (grad,) = torch.autograd.grad(y[0, m, c], x, retain_graph=c < channels - 1)
        row = grad[0, : m + 1, c]
        total += float((row.abs() * distances).sum() / row.sum().abs().clamp_min(1e-12))
    return total / channels


def model_mean_mixing_distance(model, x: torch.Tensor, position: int = -1) -> float:
    """Mean over the residual blocks of an MSSSMClassifier, each fed what it sees inside the model for x [L, C]."""
    with torch.no_grad():
        positions = torch.arange(len(x), dtype=x.dtype)[None, :, None]
        h = model.embed(model.input_features(x.unsqueeze(0), positions))
    values = []
    for block, (conv_history, ssm_h) in zip(model.blocks, model.layer_states(model.zero_state(1))):

        def block_fn(inp, block=block, conv_history=conv_history, ssm_h=ssm_h):
            return block(inp, conv_history, ssm_h, "auto")[0]

        values.append(mean_mixing_distance(block_fn, h[0], position))
        with torch.no_grad():
            h = block_fn(h)
    return sum(values) / len(values)
