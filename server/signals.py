"""Turning what clients send into model input [T, C] float32: validation, lead reordering, resampling.
Errors are `InvalidSignal` with a message meant for the client."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction

import numpy as np


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def strict_json_loads(data):
    """The standard module, as strict as orjson: it would otherwise accept NaN and Infinity."""
    return json.loads(data, parse_constant=_refuse_constant)


try:  # a dependency: ~5x faster on 10 s windows; the standard module remains the fallback
    import orjson

    _loads = orjson.loads

    def encode_json(message: dict) -> str:
        return orjson.dumps(message).decode()
except ImportError:  # pragma: no cover - depends on the environment
    _loads = strict_json_loads

    def encode_json(message: dict) -> str:
        return json.dumps(message, allow_nan=False, separators=(",", ":"))

MIN_SAMPLE_RATE = 50
MAX_SAMPLE_RATE = 2000
# Samples beyond this magnitude are refused: an ECG is a few mV, and squares of values near float32's limit (3.4e38)
# overflow inside the model's normalisation, which would turn every probability into NaN.
MAX_ABS_VALUE = 1e6


class InvalidSignal(ValueError):
    pass


class InvalidJSON(ValueError):
    pass


def parse_json(data: bytes | str, what: str):
    """Strict JSON (RFC 8259), whichever parser is installed; -> the value, or InvalidJSON saying what is wrong."""
    try:
        return _loads(data)
    except ValueError as err:  # both parsers' decode errors are ValueErrors
        raw = data.encode() if isinstance(data, str) else data
        hint = "; NaN and Infinity are not JSON numbers" if re.search(rb"\b(NaN|Infinity)\b", raw) else ""
        raise InvalidJSON(f"{what} is not valid JSON ({err}{hint})") from err


def samples_from_json(value, n_channels: int, what: str = "signal") -> np.ndarray:
    """A time-major list of rows of numbers -> [T, C] float32; rejects ragged rows, non-numbers and NaN/Inf."""
    if not isinstance(value, list) or not value:
        raise InvalidSignal(f"'{what}' must be a non-empty list of rows of {n_channels} numbers")
    try:
        # No dtype: numpy would otherwise silently parse strings like "1.5" as numbers.
        array = np.array(value)
    except ValueError as err:  # ragged rows
        raise InvalidSignal(f"'{what}' rows must all have {n_channels} values ({err})") from err
    if array.dtype.kind not in "iuf":
        raise InvalidSignal(f"'{what}' must hold only numbers")
    if array.ndim == 2 and array.size and np.abs(array).max() > MAX_ABS_VALUE:
        # checked before float32 rounds 1e6 + 1e-10 down to 1e6: the bound is on the value sent
        raise InvalidSignal(f"'{what}' holds values beyond +-{MAX_ABS_VALUE:g} (signals are in mV); "
                            f"largest magnitude {float(np.abs(array).max()):.3g}")
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, which `checked` rejects
        return checked(array.astype(np.float32), n_channels, what)


BINARY_DTYPES = {"float32": "<f4", "int16": "<i2"}  # little-endian; int16 are ADC counts, divided by the gain


def parse_binary_format(dtype, gain) -> tuple[str, float]:
    """A stream's (or request's) declared binary sample type: float32 in mV, or int16 counts with `gain` counts per
    mV. -> (dtype name, gain); InvalidSignal when unknown, or when int16 comes without a positive finite gain."""
    dtype = "float32" if dtype is None else dtype
    if dtype not in BINARY_DTYPES:
        raise InvalidSignal(f"'dtype' must be one of {sorted(BINARY_DTYPES)}, got {dtype!r}")
    if dtype == "float32":
        if gain is not None:
            raise InvalidSignal("'gain' goes with 'dtype': 'int16' (float32 samples are in mV already)")
        return dtype, 1.0
    try:
        if isinstance(gain, bool):
            raise TypeError
        value = float(gain)
    except (TypeError, ValueError) as err:
        raise InvalidSignal(f"'dtype': 'int16' needs 'gain', the ADC counts per mV (e.g. 200), got {gain!r}") from err
    if not (math.isfinite(value) and value > 0):
        raise InvalidSignal(f"'gain' must be a positive number of counts per mV, got {gain!r}")
    return dtype, value


def samples_from_bytes(data: bytes, n_channels: int, what: str = "body", dtype: str = "float32",
                       gain: float = 1.0) -> np.ndarray:
    """Little-endian float32 (mV) or int16 (counts / gain), time-major -> [T, C] float32 in mV."""
    code = BINARY_DTYPES[dtype]
    size = np.dtype(code).itemsize
    if len(data) % (size * n_channels):
        raise InvalidSignal(f"{what} of {len(data)} bytes is not a whole number of samples "
                            f"({n_channels} channels x {size} bytes of {dtype})")
    values = np.frombuffer(data, dtype=code).reshape(-1, n_channels)
    if dtype != "float32":
        values = (values / np.float32(gain)).astype(np.float32)
    return checked(values, n_channels, what)


def checked(array: np.ndarray, n_channels: int, what: str) -> np.ndarray:
    if array.ndim != 2 or array.shape[1] != n_channels:
        raise InvalidSignal(f"'{what}' must be [samples, {n_channels}] (one row of {n_channels} channel values per "
                            f"sample), got shape {list(array.shape)}")
    if not np.isfinite(array).all():
        raise InvalidSignal(f"'{what}' holds NaN or infinite values")
    if array.size and np.abs(array).max() > MAX_ABS_VALUE:
        raise InvalidSignal(f"'{what}' holds values beyond +-{MAX_ABS_VALUE:g} (signals are in mV); "
                            f"largest magnitude {float(np.abs(array).max()):.3g}")
    return array


def parse_sample_rate(value, model_rate: int) -> Fraction:
    if value is None:
        return Fraction(model_rate)
    # Through float first and range-checked before any exact arithmetic: Fraction("1e999999999") alone would build
    # a billion-digit integer and hold the event loop for hours.
    try:
        if isinstance(value, bool):
            raise TypeError
        as_float = float(value)
    except (TypeError, ValueError, OverflowError) as err:
        raise InvalidSignal(f"'sample_rate' must be a number, got {value!r}") from err
    if not (math.isfinite(as_float) and MIN_SAMPLE_RATE <= as_float <= MAX_SAMPLE_RATE):
        raise InvalidSignal(f"'sample_rate' must be within {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz, got {value!r}")
    return Fraction(as_float).limit_denominator(1000)
