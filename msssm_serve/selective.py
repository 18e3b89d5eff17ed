"""The selective SSM recurrence of an array of diagonal SSMs, with two interchangeable implementations.

    h_t = exp(dt_t * A) h_{t-1} + dt_t * B_t * x_t        (ZOH for A, Euler for B, as in Mamba)
    y_t = C_t . h_t

Implementations, chosen by `selective_scan(..., scan=)`; tests hold all to the sequential reference:
  * `blocked`: tensor ops over [B, L, M, D, N] with the recurrence in `blocked_scan` (parallel; CUDA training);
  * `sequential`: the same with `sequential_scan` (the reference);
  * `fused`: a C++ kernel (CPU, float32/64) with its own backward that never materialises the [B, L, M, D, N]
    tensors, compiled on first use (CPU training and eager inference);
  * `onnx`: for export only. Traces as one placeholder node `msssm::SelectiveScan` that the exporter lowers to an
    ONNX Scan over time whose body is one step (export/lowering.py), so the served graph does one step of work per
    sample, never materialises [B, L, M, D, N] tensors, and takes any T. Computes `sequential` when run in torch.
  * `static`: `blocked` with a fixed number of levels, whatever L: loop-free tensor ops with a dynamic time axis
    (an alternative export form; one call covers at most block ** levels samples).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

from .scan import blocked_scan, sequential_scan

log = logging.getLogger(__name__)
_extension = None
_extension_failed = False


def selective_scan_tensor_ops(x, dt, A, B, C, h0, block: int = 8, levels: int | None = None, reference=False):
    """x, dt: [Bt, L, M, D]; A: [M, D, N]; B, C: broadcastable to [Bt, L, M, D, N]; h0: [Bt, M, D, N]
    -> (y [Bt, L, M, D], h_L [Bt, M, D, N])."""
    decay = torch.exp(dt.unsqueeze(-1) * A)
    drive = (dt * x).unsqueeze(-1) * B
    h = sequential_scan(decay, drive, h0) if reference else blocked_scan(decay, drive, h0, block, levels)
    return (h * C).sum(-1), h[:, -1]


class _OnnxScanPlaceholder(torch.autograd.Function):
    """x, dt [Bt, L, M, D]; A [M, D, N]; B, C [Bt or 1, L, M, D or 1, N] (time axis present); h0 [Bt, M, D, N]."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0):
        return selective_scan_tensor_ops(x, dt, A, B, C, h0, reference=True)

    @staticmethod
    def symbolic(g, x, dt, A, B, C, h0):
        y, h = g.op("msssm::SelectiveScan", x, dt, A, B, C, h0, outputs=2)
        # y is shaped as x, the final state as h0: declared, so the exporter's shape inference has no gap to warn of
        y.setType(x.type())
        h.setType(h0.type())
        return y, h


def selective_scan(x, dt, A, B, C, h0, scan: str = "auto", block: int = 8, levels: int = 5):
    """x, dt: [Bt, L, M, D]; A: [M, D, N]; B, C: [Bt, L, M, 1, N] (input-dependent) or [1, 1, M, D, N]
    (time-invariant); h0: [Bt, M, D, N] -> (y [Bt, L, M, D], h_L).
    scan: auto (fused on CPU for input-dependent B, C when it compiles; blocked otherwise) | fused | blocked |
    sequential | static (blocked at a fixed depth of `levels`: L <= block ** levels) | onnx."""
    if scan == "auto":
        input_dependent = B.shape[:2] == x.shape[:2] and B.shape[3] == 1
        scan = "fused" if input_dependent and fused_available(x.device) else "blocked"
    if scan == "fused":
        return selective_scan_fused(x, dt, A, B.squeeze(3), C.squeeze(3), h0)
    if scan == "onnx":
        length = x.shape[1]
        B, C = B.expand(-1, length, -1, -1, -1), C.expand(-1, length, -1, -1, -1)  # a Scan input needs the time axis
        return _OnnxScanPlaceholder.apply(x, dt, A, B, C, h0)
    if scan == "static":
        return selective_scan_tensor_ops(x, dt, A, B, C, h0, block, levels)
    if scan in ("blocked", "sequential"):
        return selective_scan_tensor_ops(x, dt, A, B, C, h0, block, reference=scan == "sequential")
    raise ValueError(f"unknown scan {scan!r}")


def _load_extension():
    global _extension, _extension_failed
    if _extension is None and not _extension_failed:
        try:
            from torch.utils.cpp_extension import load

            source = Path(__file__).with_name("csrc") / "selective_scan.cpp"
            # The source hash in the name: a changed kernel builds beside, never over, one a running process uses.
            # No -ffast-math: the kernel's own decay exponential vectorises without it, and results stay exact.
            cflags = ["-O3", "-fopenmp", "-march=native"]
            digest = hashlib.sha256(source.read_bytes() + " ".join(cflags).encode()).hexdigest()[:10]
            print("loading the fused CPU scan kernel (compiled on first use, ~30 s; then cached by torch)",
                  file=sys.stderr, flush=True)
            _extension = load(
                name=f"msssm_selective_scan_{digest}",
                sources=[str(source)],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as err:  # no compiler: the tensor-op scan still works, only slower
            _extension_failed = True
            log.warning("fused CPU selective scan unavailable (%s); using the tensor-op scan", err)
    return _extension


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0):
        ext = _load_extension()
        y, h_last = ext.forward(x, dt, A, B, C, h0)
        ctx.save_for_backward(x, dt, A, B, C, h0)
        return y, h_last

    @staticmethod
    def backward(ctx, gy, gh_last):
        ext = _load_extension()
        x, dt, A, B, C, h0 = ctx.saved_tensors
        gy = torch.zeros_like(x) if gy is None else gy.contiguous()
        gh_last = torch.zeros_like(h0) if gh_last is None else gh_last.contiguous()
        return tuple(ext.backward(x, dt, A, B, C, h0, gy, gh_last))


def fused_available(device: torch.device) -> bool:
    if device.type != "cpu" or os.environ.get("MSSSM_DISABLE_FUSED_SCAN") == "1":
        return False
    return _load_extension() is not None


def selective_scan_fused(x, dt, A, B, C, h0):
    """Same contract as the tensor-op form, with B, C: [Bt, L, M, N] (input-dependent, shared by channels)."""
    args = [t.contiguous() for t in (x, dt, A, B, C, h0)]
    return _FusedScan.apply(*args)
