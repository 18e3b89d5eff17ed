"""The linear recurrence h_t = a_t * h_{t-1} + u_t, two ways.

`sequential_scan` is the obviously-correct reference. `blocked_scan` is the parallel form (CUDA training, and the
loop-free `static` export form): it scans blocks of `block` steps in parallel across all blocks, then scans the
block carries one level up, recursively. Every loop has a static trip count (the block size), so it traces into
plain tensor ops with a dynamic time axis, and it is numerically safe: it multiplies by decays in (0, 1] only, never
divides by them. (CPU training runs the fused kernel in `selective`; see there for the dispatch.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequential_scan(a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """a, u: [B, L, *S]; h0: [B, *S] -> h: [B, L, *S], one step at a time."""
    hs = []
    h = h0
    for a_t, u_t in zip(a.unbind(1), u.unbind(1)):
        h = a_t * h + u_t
        hs.append(h)
    return torch.stack(hs, dim=1)


def _pad_time(x: torch.Tensor, pad: int, value: float) -> torch.Tensor:
    # F.pad pads from the last dim; time is dim 1 of [B, L, *S].
    spec = [0, 0] * (x.dim() - 2) + [0, pad]
    return F.pad(x, spec, value=value)


def blocked_scan(
    a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor, block: int = 8, levels: int | None = None
) -> torch.Tensor:
    """a, u: [B, L, *S]; h0: [B, *S] -> h: [B, L, *S].

    levels=None recurses as deep as L needs (eager use). A fixed `levels` gives a graph whose depth does not depend
    on L (export): then L must be at most block ** levels.
    """
    length = a.shape[1]
    if levels == 1 or (levels is None and length <= block):
        # Top level: at most `block` steps, padded to exactly `block` so the loop is static.
        pad = block - length
        a = _pad_time(a, pad, 1.0)
        u = _pad_time(u, pad, 0.0)
        hs = []
        h = h0
        # unbind, not a[:, t]: the backward of one unbind is one stack, of `block` selects `block` full-size zeros.
        for a_t, u_t in zip(a.unbind(1), u.unbind(1)):
            h = a_t * h + u_t
            hs.append(h)
        return torch.stack(hs, dim=1)[:, :length]

    batch, state_shape = a.shape[0], a.shape[2:]
    pad = (-length) % block
    a = _pad_time(a, pad, 1.0).reshape(batch, -1, block, *state_shape)
    u = _pad_time(u, pad, 0.0).reshape(batch, -1, block, *state_shape)
    # Within every block at once: the state reached from a zero start, and the product of decays so far.
    local, decay = [], []
    h = torch.zeros_like(u[:, :, 0])
    p = torch.ones_like(a[:, :, 0])
    for a_t, u_t in zip(a.unbind(2), u.unbind(2)):
        h = a_t * h + u_t
        p = p * a_t
        local.append(h)
        decay.append(p)
    local_h = torch.stack(local, dim=2)
    decay_p = torch.stack(decay, dim=2)
    # Block carries obey the same recurrence one level up: H_j = P_j * H_{j-1} + local_end_j.
    ends = blocked_scan(decay_p[:, :, -1], local_h[:, :, -1], h0, block, None if levels is None else levels - 1)
    starts = torch.cat([h0.unsqueeze(1), ends[:, :-1]], dim=1)
    h = local_h + decay_p * starts.unsqueeze(2)
    return h.reshape(batch, -1, *state_shape)[:, :length]
