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
