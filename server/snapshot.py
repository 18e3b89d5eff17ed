"""Resume tokens: a stream's whole state, sealed so that any replica holding the same secret and model version can
continue it exactly.

A token is `base64url(body) + "." + base64url(HMAC-SHA256(secret, body))`, body = zlib(npz) of the state tensors,
the samples received but not yet computed, the resampler's carried samples and a JSON header (model, its ONNX
sha256, window position, config). The MAC is checked before anything in the body is parsed; then every field is
checked against the model it is for (names, shapes, dtypes, finite values, ranges), so a token can at worst be
refused, never crash a stream or feed the model something it was not built for.

The secret is `MSSSM_STATE_SECRET` (shared by replicas); without it each process draws its own, and its tokens
resume only on that process.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import os
import secrets
import zlib

import numpy as np

MAX_TOKEN_CHARS = 1 << 20  # ~4 windows of 12-lead samples and the state fit in well under this
FORMAT = 1


class BadToken(ValueError):
    """A token that cannot be used; `code` is the close code (1007 malformed or inconsistent, 1008 not ours)."""

    def __init__(self, code: int, detail: str):
        super().__init__(detail)
        self.code = code


def server_secret() -> bytes:
    secret = os.environ.get("MSSSM_STATE_SECRET")
    if secret:
        return secret.encode()
    if not hasattr(server_secret, "_drawn"):
        server_secret._drawn = secrets.token_bytes(32)  # this process only
    return server_secret._drawn


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def seal(header: dict, arrays: dict[str, np.ndarray], secret: bytes) -> str:
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(json.dumps({"format": FORMAT, **header}).encode(), np.uint8),
             **{f"a_{k}": v for k, v in arrays.items()})
    body = zlib.compress(buffer.getvalue(), 6)
    return _b64(body) + "." + _b64(hmac.new(secret, body, hashlib.sha256).digest())


def open_token(token, secret: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """-> (header, arrays); BadToken when it is not a token of this secret or cannot be read."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        raise BadToken(1007, "'resume' must be a token string from a snapshot message")
    body_text, mac_text = token.split(".")
    try:
        body, mac = _unb64(body_text), _unb64(mac_text)
    except (binascii.Error, ValueError):
        raise BadToken(1007, "the resume token is damaged (not base64url)") from None
    if not hmac.compare_digest(mac, hmac.new(secret, body, hashlib.sha256).digest()):
        raise BadToken(1008, "the resume token was not issued with this server's secret (or was altered)")
    try:
        raw = zlib.decompress(body)
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            header = json.loads(npz["header"].tobytes())
            arrays = {k[2:]: npz[k] for k in npz.files if k.startswith("a_")}
    except Exception as err:  # a token we sealed always reads; anything else is refused
        raise BadToken(1007, f"the resume token cannot be read ({type(err).__name__})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BadToken(1007, "the resume token is of an unknown format")
    return header, arrays


def model_version(model) -> str:
    """What a token is bound to: the exact graph (its sha256), else its name and version."""
    return model.meta.get("onnx", {}).get("sha256") or f"{model.name}@{model.meta.get('version')}"


def checked_array(arrays: dict, name: str, shape: tuple, dtype=np.float32, allow_nan: bool = False) -> np.ndarray:
    value = arrays.get(name)
    if value is None or value.dtype != dtype or value.shape != tuple(shape):
        got = None if value is None else (value.dtype.name, list(value.shape))
        raise BadToken(1007, f"the resume token's {name!r} is not {np.dtype(dtype).name} {list(shape)} (got {got})")
    finite = np.isfinite(value) | (np.isnan(value) if allow_nan else False)
    if value.dtype.kind == "f" and not finite.all():
        raise BadToken(1007, f"the resume token's {name!r} holds non-finite values")
    return value


# --- what a stream's snapshot holds ------------------------------------------------------------------------------
CONFIG_KEYS = ("sample_rate", "leads", "hop", "dtype", "gain", "snapshot_every", "scale_weights")


def capture(stream, resampler, served, config: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """A settled stream's whole state (model state, position, pending samples, resampler carry, hop shares) as the
    header and arrays of a token."""
    position, carry = stream.position(), resampler.carry()
    arrays = {f"state_{i}": s[0] for i, s in enumerate(stream.state)}
    arrays["pending"] = position["pending"]
    if position["last"] is not None:
        arrays["last"] = position["last"]
    if carry is not None:
        arrays["resampler_history"] = carry[0]
    if stream.scale_weights:
        arrays["hop_share_sum"] = position["hop_share_sum"]
    header = {"model": served.name, "version": model_version(served.model),
              "config": {k: config[k] for k in CONFIG_KEYS if k in config},
              "window": position["window"], "t": position["t"], "last_made": position["last_made"],
              "resampler": None if carry is None else list(carry[1:])}
    return header, arrays


def restore(stream, resampler, header: dict, arrays: dict) -> None:
    """Put a token's state into a new stream and resampler of the same model and config, every field checked first
    (BadToken 1007 naming the field that is out of range)."""
    model = stream.model
    window, t = header.get("window"), header.get("t")
    if not (isinstance(window, int) and window >= 0 and isinstance(t, int) and 0 <= t < model.window):
        raise BadToken(1007, "the resume token's window position is out of range")
    state = [checked_array(arrays, f"state_{i}", shape) for i, shape in enumerate(model.state_shapes)]
    pending = arrays.get("pending")
    if pending is None or pending.ndim != 2 or len(pending) > stream.max_pending:
        raise BadToken(1007, "the resume token's pending samples are malformed")
    pending = checked_array(arrays, "pending", (len(pending), model.n_channels), allow_nan=model.lead_subsets)
    last = checked_array(arrays, "last", (len(model.labels),)) if "last" in arrays else None
    if (last is None) != (t == 0):
        raise BadToken(1007, "the resume token's last prediction does not match its position")
    if not resampler.identity:
        counts = header.get("resampler")
        if not (isinstance(counts, list) and len(counts) == 2 and all(isinstance(c, int) and c >= 0 for c in counts)
                and counts[0] < resampler.device_window and counts[1] <= model.window):
            raise BadToken(1007, "the resume token's resampler position is out of range")
        history = resampler.carry()[0]
        resampler.restore(checked_array(arrays, "resampler_history", history.shape, dtype=history.dtype), *counts)
    hop_share_sum = None
    if stream.scale_weights:  # the shares of the hop in progress, summed over its t % hop samples so far
        hop_share_sum = checked_array(arrays, "hop_share_sum", (len(model.scales),), dtype=np.float64)
    last_made = header.get("last_made")
    stream.restore([s[None] for s in state], window, t, pending, last,
                   tuple(last_made) if isinstance(last_made, list) and len(last_made) == 2 else None, hop_share_sum)
