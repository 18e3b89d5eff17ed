"""Streaming resampling from a device's rate to the model's, window by window (numpy + scipy, no torch).

The filter is scipy's `resample_poly` design (a Kaiser-windowed low-pass of 2 * 10 * max(up, down) + 1 taps on the
up-sampled signal), run in polyphase form on the last samples carried between frames, so the output is the same
whatever the frame sizes and equals `resample_poly` of the window's samples. The delay is the filter's
half length: 10 * max(up, down) / up device samples (100 ms at 360 or 500 Hz into a 100 Hz model).

Why not python-soxr's `ResampleStream` or libsamplerate: both were measured here (docs/resampling.md) and hold
output back in large blocks (soxr HQ: 5-10 s behind at 360 Hz; libsamplerate sinc_best: 1.4 s), which would delay
every partial prediction of a real-time stream by as much.

Windows: a stream's windows are `window` model-rate samples; a device window is `device_window` samples at the
device's rate. Each device window is resampled from a fresh filter state and flushed at its end (zero-padded, as
`resample_poly` pads), giving exactly `window` model samples, so the stream's window k and `/classify`'s window k
are the same samples on both paths (the guarantee of the contract at every rate).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from scipy.signal import firwin

HALF_LENGTH_PER_FACTOR = 10  # resample_poly's default: 10 * max(up, down) taps on each side


def rate_ratio(device_rate: Fraction | float, model_rate: int) -> Fraction:
    """up / down, with a denominator of at most 1000 (a filter of ~20 * max(up, down) taps stays small)."""
    return (Fraction(model_rate) / Fraction(device_rate)).limit_denominator(1000)


class WindowResampler:
    """Device-rate frames [T, C] in, model-rate samples out, as they become available (`push`); `finish()` flushes
    the partial window at the end of a recording. Memory is constant: the last few input samples and counters.

    Polyphase form of resample_poly's filter h: output k is f[m] at m = k * down + delay of the up-sampled, filtered
    signal, and only every up-th tap meets a real sample: y[k] = sum_i h[m % up + i * up] * x[m // up - i]."""

    def __init__(self, device_rate, model_rate: int, window: int, channels: int):
        ratio = rate_ratio(device_rate, model_rate)
        self.up, self.down = ratio.numerator, ratio.denominator
        self.window, self.channels = window, channels
        self.identity = self.up == self.down
        self.device_window = round(window * self.down / self.up)
        half = HALF_LENGTH_PER_FACTOR * max(self.up, self.down)
        self.delay = half  # in up-sampled samples
        self.delay_seconds = 0.0 if self.identity else half / (self.up * float(device_rate))
        if self.identity:
            return
        # resample_poly's filter: cut-off at the lower Nyquist, gain `up` to make up for the inserted zeros
        taps = firwin(2 * half + 1, 1.0 / max(self.up, self.down), window=("kaiser", 5.0)) * self.up
        self.n_phase_taps = -(-len(taps) // self.up)
        padded = np.zeros(self.n_phase_taps * self.up)
        padded[: len(taps)] = taps
        self.phases = padded.reshape(self.n_phase_taps, self.up).T  # [up, taps per phase]: phases[p, i] = h[p + i*up]
        self._start_window()

    def _start_window(self) -> None:
        self._history = np.zeros((self.n_phase_taps, self.channels))  # inputs before the window: zero, as lfilter's
        self._n_in = 0  # device samples of this window taken
        self._n_out = 0  # model samples of this window given out

    def carry(self) -> tuple[np.ndarray, int, int] | None:
        """What it carries between frames (the last inputs, samples in and out of this window); None: identity."""
        return None if self.identity else (self._history.copy(), self._n_in, self._n_out)

    def restore(self, history: np.ndarray, n_in: int, n_out: int) -> None:
        """Continue from a `carry()` of a resampler of the same rates, window and channels (checked by the caller)."""
        self._history, self._n_in, self._n_out = history, n_in, n_out

    def push(self, x: np.ndarray) -> np.ndarray:
        """x [T, C] float32 at the device rate -> [T', C] float32 at the model rate (T' may be 0)."""
        if self.identity:
            return x
        out, start = [], 0
        while start < len(x):
            take = min(len(x) - start, self.device_window - self._n_in)
            out.append(self._take(x[start : start + take], total=None))
            start += take
            if self._n_in == self.device_window:
                out.append(self._take(x[:0], total=self.window))
                self._start_window()
        return np.concatenate(out) if out else np.zeros((0, self.channels), np.float32)

    def finish(self) -> np.ndarray:
        """The rest of a partial window (its resample_poly length), for a recording that ends mid-window."""
        if self.identity or self._n_in == 0:
            return np.zeros((0, self.channels), np.float32)
        out = self._take(np.zeros((0, self.channels)), total=-(-self._n_in * self.up // self.down))
        self._start_window()
        return out

    def _take(self, x: np.ndarray, total: int | None) -> np.ndarray:
        """Append x; -> the outputs now complete. With `total` (a flush) the window's inputs have ended: zeros
        follow them (as resample_poly pads) until the window's `total` outputs are out."""
        before = self._n_in
        buffer = np.concatenate([self._history, x])  # global input index g is buffer[g - before + n_phase_taps]
        self._n_in += len(x)
        if total is None:  # output k is ready once its newest input m // up has arrived
            last = (self._n_in * self.up - 1 - self.delay) // self.down
        else:
            last = total - 1
            newest = ((total - 1) * self.down + self.delay) // self.up
            buffer = np.concatenate([buffer, np.zeros((max(0, newest + 1 - self._n_in), self.channels))])
        self._history = buffer[len(buffer) - self.n_phase_taps :] if total is None else self._history
        if last < self._n_out:
            return np.zeros((0, self.channels), np.float32)
        m = np.arange(self._n_out, last + 1) * self.down + self.delay
        newest = m // self.up - before + self.n_phase_taps  # buffer row of each output's newest input
        rows = newest[:, None] - np.arange(self.n_phase_taps)[None, :]  # [outputs, taps per phase]
        self._n_out = last + 1
        y = np.einsum("ki,kic->kc", self.phases[m % self.up], buffer[rows])
        return y.astype(np.float32)


def resample_recording(signal: np.ndarray, device_rate, model_rate: int, window: int) -> np.ndarray:
    """A whole recording [T, C] at the device rate -> model rate, window by window exactly as a stream is."""
    resampler = WindowResampler(device_rate, model_rate, window, signal.shape[1])
    return np.concatenate([resampler.push(signal), resampler.finish()])
