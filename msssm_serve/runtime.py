"""Torch-free runtime: load a model directory and run its ONNX graph (onnxruntime + numpy only).

`OnnxModel` wraps the one graph `(x, *state) -> (probabilities, *state_out)`:
  * `classify(signal)`: a recording cut into windows, each window one call from the zero state;
  * `advance(x, state)`: many streams (batch rows) by the same number of samples;
  * `advance_streams(segments, states)`: many streams by different numbers of samples, grouped into as few calls
    as there are distinct lengths; `advance_pooled(segments, pool, slots)` the same for streams whose states are rows
    of a `StatePool` (the server's batched primitive: states gathered and written back in place).
`Stream` holds one stream's state (its own arrays, or a pool row), its pending samples and its position in the
current window.

The graph's last output, `scale_weights`, is every layer's scale-mixer weights E_t per step; with `scale_weights=True`
the calls above also return them, and `summarise_scale_weights` turns them into one share per scale (model.json
`scale_weights.summary` says how).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

REQUIRED_KEYS = ("name", "labels", "multi_label", "sample_rate", "leads", "window", "state", "max_chunk")
# The bundled model: the checkout's models/default, which an install ships as package data (msssm_serve/models).
_CHECKOUT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default"
DEFAULT_MODEL_DIR = _CHECKOUT_MODEL if _CHECKOUT_MODEL.is_dir() else Path(__file__).resolve().parent / "models" / "default"

StreamState = list[np.ndarray]  # one array per state tensor, each with a leading batch dim of 1
# Calls are cut to about SAMPLES_PER_CALL samples (at most ROWS_PER_CALL streams, more for hops shorter than
# SAMPLES_PER_CALL / ROWS_PER_CALL samples) so that the graph's time-major intermediates (per layer [T, rows, 1280]
# floats for the default model) stay in a core's L2 cache. Measured here (benchmarks/runtime.py, section 4):
# 16 streams x 25 samples per call run at 19 us/sample, 256 x 25 at 33 us/sample.
ROWS_PER_CALL = 16
SAMPLES_PER_CALL = 512
GPU_ROWS_PER_CALL = 256


SCALE_WEIGHT_SUMMARY = ("per scale, its share |E_t[s]| / sum_s' |E_t[s']| of the scale mixer's weights, averaged "
                        "over the layers and over the samples a prediction covers: a stream prediction at t the "
                        "samples since the previous multiple of hop (the hop it completes), a /classify window its "
                        "whole window, /classify's top level the whole signal")


def summarise_scale_weights(weights: np.ndarray) -> np.ndarray:
    """Raw mixer weights [..., layers, scales] -> each scale's share per step [..., scales] (see SCALE_WEIGHT_SUMMARY):
    how much each resolution contributes, comparable across layers whatever the sign or size of E."""
    magnitude = np.abs(weights)
    return (magnitude / np.maximum(magnitude.sum(-1, keepdims=True), 1e-12)).mean(-2)


class ModelDirError(Exception):
    """A model directory that cannot be served; the message names the file at fault."""


@dataclass(frozen=True)
class Prediction:
    window: int  # window index k within the stream
    t: int  # samples of window k seen so far
    probabilities: np.ndarray  # [classes]
    final: bool
    scale_weights: np.ndarray | None = None  # [scales]: the shares over the hop it completes, when asked for


def _read_model_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelDirError(f"{path}: missing (a model directory holds model.json and model.onnx)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelDirError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ModelDirError(f"{path}: missing keys {missing}")
    return meta


def default_providers() -> list:
    """CUDA when onnxruntime-gpu and a GPU are there, else CPU. TF32 is off on CUDA: with it, an H100 put the
    bundled model's probabilities 1.3e-3 from the float32 model, beyond export's parity tolerance of 1e-4."""
    available = ort.get_available_providers()
    providers: list = []
    if "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", {"use_tf32": "0"}))
    return providers + ["CPUExecutionProvider"]


class OnnxModel:
    def __init__(self, model_dir: str | Path = DEFAULT_MODEL_DIR, providers: list[str] | None = None,
                 threads: int | None = None):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise ModelDirError(f"{self.dir}: model directory not found")
        self.meta = _read_model_json(self.dir / "model.json")
        onnx_path = self.dir / "model.onnx"
        if not onnx_path.is_file():
            raise ModelDirError(f"{onnx_path}: missing")
        options = ort.SessionOptions()
        # A server runs one inference at a time per process (one batching consumer), so all cores go to intra-op
        # parallelism; inter-op threads would only contend with it.
        options.intra_op_num_threads = threads or int(os.environ.get("MSSSM_THREADS", 0)) or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers or default_providers())
        except Exception as err:  # onnxruntime raises its own Fail / InvalidProtobuf types
            raise ModelDirError(f"{onnx_path}: cannot be loaded by onnxruntime ({err})") from err
        # On the CPU, calls are cut to stay in cache (see ROWS_PER_CALL); a GPU wants the largest calls.
        self.on_cpu = self.session.get_providers()[0] == "CPUExecutionProvider"  # calls cut to stay in L2
        self.state_names = [s["name"] for s in self.meta["state"]]
        self.state_shapes = [tuple(s["shape"]) for s in self.meta["state"]]
        expected_inputs = ["x", *self.state_names]
        got_inputs = [i.name for i in self.session.get_inputs()]
        if got_inputs != expected_inputs:
            raise ModelDirError(f"{onnx_path}: inputs {got_inputs} do not match model.json state {expected_inputs}")
        self.output_names = ["probabilities", *(f"{n}_out" for n in self.state_names)]
        # Graphs exported before the scale mixer was an output lack it; they serve as before, without the option.
        self.has_scale_weights = any(o.name == "scale_weights" for o in self.session.get_outputs())
        self.n_channels = int(self.session.get_inputs()[0].shape[-1])
        if self.n_channels != len(self.leads):
            raise ModelDirError(f"{self.dir}: graph takes {self.n_channels} channels, model.json lists {self.leads}")
        self._check_state_shapes(onnx_path)

    def _check_state_shapes(self, onnx_path: Path) -> None:
        """model.json's state shapes against the graph's inputs, then one real step from the zero state: a model
        directory that would fail every request is refused at start-up instead of reported ready."""
        for spec, name, shape in zip(self.session.get_inputs()[1:], self.state_names, self.state_shapes):
            graph_shape = spec.shape[1:]  # after the dynamic batch dimension
            if len(graph_shape) != len(shape) or any(isinstance(g, int) and g != m for g, m in zip(graph_shape, shape)):
                raise ModelDirError(f"{onnx_path}: state {name!r} is {list(graph_shape)} in the graph but "
                                    f"{list(shape)} in model.json")
        try:
            probs, *state = self.session.run(
                self.output_names, {"x": np.zeros((1, 1, self.n_channels), np.float32),
                                    **dict(zip(self.state_names, self.zero_state(1)))})
        except Exception as err:  # onnxruntime's own error types
            raise ModelDirError(f"{onnx_path}: a first step from the zero state fails ({err})") from err
        if probs.shape != (1, 1, len(self.labels)):
            raise ModelDirError(f"{onnx_path}: the graph gives {probs.shape[-1]} probabilities, model.json lists "
                                f"{len(self.labels)} labels")
        for name, shape, got in zip(self.state_names, self.state_shapes, state):
            if got.shape[1:] != shape:
                raise ModelDirError(f"{onnx_path}: state {name!r} comes out as {list(got.shape[1:])}, model.json "
                                    f"says {list(shape)}")

    # --- description --------------------------------------------------------------------------------------------
    name = property(lambda self: self.meta["name"])
    labels = property(lambda self: list(self.meta["labels"]))
    multi_label = property(lambda self: bool(self.meta["multi_label"]))
    sample_rate = property(lambda self: int(self.meta["sample_rate"]))
    leads = property(lambda self: list(self.meta["leads"]))
    window = property(lambda self: int(self.meta["window"]))
    lead_subsets = property(lambda self: bool(self.meta.get("lead_subsets", False)))
    # The shortest signal /classify accepts: 1 s at the model's rate, or the whole window if that is shorter
    # (a prediction from a few samples says nothing, yet looks like an answer).
    min_samples = property(lambda self: int(self.meta.get("min_samples", min(self.window, self.sample_rate))))
    default_hop = property(lambda self: int(self.meta.get("default_hop", 25)))
    max_chunk = property(lambda self: int(self.meta["max_chunk"]))
    scales = property(lambda self: list(self.meta.get("scale_weights", {}).get("scales", [])))
    providers = property(lambda self: self.session.get_providers())

    @property
    def state_bytes(self) -> int:
        return int(sum(np.prod(s) for s in self.state_shapes) * 4)

    # --- computation --------------------------------------------------------------------------------------------
    def zero_state(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, *shape), np.float32) for shape in self.state_shapes]

    def rows_per_call(self, length: int) -> int:
        """Streams of `length` samples a call is best given: on the CPU about SAMPLES_PER_CALL samples' worth (short
        hops: more rows; `advance` cuts larger batches there); a GPU wants the largest calls (256 streams x 25
        samples cost 1.5 us/sample on an H100, 16 x 25 19). Under load the batcher waits for this many."""
        return max(ROWS_PER_CALL, SAMPLES_PER_CALL // max(1, length)) if self.on_cpu else GPU_ROWS_PER_CALL

    def advance(self, x: np.ndarray, state: list[np.ndarray], scale_weights: bool = False):
        """x [B, T, C] float32 -> (probabilities [B, T, K], new state), and with `scale_weights` the mixer's weights
        [B, T, layers, scales] third; on the CPU in calls of about SAMPLES_PER_CALL samples (see ROWS_PER_CALL),
        never beyond the graph's scan depth."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 3 or x.shape[2] != self.n_channels or x.shape[1] == 0:
            raise ValueError(f"x must be [batch, T>=1, {self.n_channels}], got {list(x.shape)}")
        if scale_weights and not self.has_scale_weights:
            raise ValueError(f"{self.dir}: this graph has no scale_weights output (exported before it was one)")
        outputs = self.output_names + (["scale_weights"] if scale_weights else [])
        n_state = len(self.state_names)
        batch, length = x.shape[:2]
        if self.on_cpu:
            # the batch cut into as few calls as the best size allows, of equal rows (26 streams: 13 + 13, not
            # 20 + 6; a call of few rows costs more per sample)
            calls = -(-batch // self.rows_per_call(length))
            rows_per_call = -(-batch // calls)
            steps = min(self.max_chunk, max(1, SAMPLES_PER_CALL // rows_per_call))
        else:  # a GPU takes the whole batch in one call
            rows_per_call, steps = batch, self.max_chunk
        row_blocks, weight_blocks, new_state_blocks = [], [], []
        for r0 in range(0, batch, rows_per_call):
            rows = slice(r0, r0 + rows_per_call)
            block_state = [s[rows] for s in state]
            pieces, weight_pieces = [], []
            for t0 in range(0, length, steps):
                feeds = {"x": x[rows, t0 : t0 + steps], **dict(zip(self.state_names, block_state))}
                probs, *rest = self.session.run(outputs, feeds)
                block_state = rest[:n_state]
                pieces.append(probs)
                weight_pieces.extend(rest[n_state:])
            row_blocks.append(_join(pieces, axis=1))
            weight_blocks.append(_join(weight_pieces, axis=1) if scale_weights else None)
            new_state_blocks.append(block_state)
        new_state = new_state_blocks[0] if len(row_blocks) == 1 else [np.concatenate(parts)
                                                                     for parts in zip(*new_state_blocks)]
        probs = _join(row_blocks, axis=0)
        if scale_weights:
            return probs, new_state, _join(weight_blocks, axis=0)
        return probs, new_state

    def advance_streams(self, segments: list[np.ndarray], states: list[StreamState], scale_weights: bool = False):
        """Advance stream i by segments[i] [T_i, C] from states[i]; streams of equal T_i share one call.
        -> list of (probabilities [T_i, K], new StreamState), in input order; with `scale_weights` the mixer's
        weights [T_i, layers, scales] third, as `advance`."""
        results: list = [None] * len(segments)
        for members in _equal_lengths(segments):
            x = np.stack([segments[i] for i in members])
            batch_state = [np.concatenate([states[i][j] for i in members]) for j in range(len(self.state_names))]
            probs, new_state, *weights = self.advance(x, batch_state, scale_weights)
            for row, i in enumerate(members):
                # copies, so a stream's state does not pin the whole batch's arrays in memory
                results[i] = (probs[row], [s[row : row + 1].copy() for s in new_state],
                              *(w[row] for w in weights))
        return results

    def advance_pooled(self, segments: list[np.ndarray], pool: StatePool, slots: list[int],
                       scale_weights: bool = False):
        """`advance_streams` for streams whose states are rows `slots` of `pool` (the server's streams): each call's
        states are gathered, and its new states written back in place, with one index per state tensor instead of
        a concatenation and a copy per stream and tensor. -> list of (probabilities, None) in input order (the new
        state is in the pool; with `scale_weights` the mixer's weights third)."""
        results: list = [None] * len(segments)
        for members in _equal_lengths(segments):
            members.sort(key=slots.__getitem__)  # the pool's rows in ascending order (StatePool.gather)
            rows = np.array([slots[i] for i in members])
            probs, new_state, *weights = self.advance(np.stack([segments[i] for i in members]), pool.gather(rows),
                                                      scale_weights)
            pool.scatter(rows, new_state)
            for row, i in enumerate(members):
                results[i] = (probs[row], None, *(w[row] for w in weights))
        return results

    def classify(self, signal: np.ndarray, scale_weights: bool = False) -> dict:
        """signal [T, C] at the model's rate -> per-window probabilities (windows of `window` samples, the last
        may be shorter, each from the zero state) and their element-wise max; with `scale_weights`, each window's
        mean scale shares and the whole signal's (see SCALE_WEIGHT_SUMMARY)."""
        return self.classify_many([signal], scale_weights)[0]

    def classify_many(self, signals: list[np.ndarray], scale_weights: bool = False) -> list[dict]:
        """`classify` of each signal, with the windows of all signals advanced together (one batch per window
        length): rows of a batch cost less per sample than a window alone."""
        w = self.window
        starts, segments, owner = [], [], []
        for k, signal in enumerate(signals):
            signal = np.asarray(signal, dtype=np.float32)
            if signal.ndim != 2 or signal.shape[1] != self.n_channels or len(signal) == 0:
                raise ValueError(f"signal must be [T>=1, {self.n_channels}], got {list(signal.shape)}")
            for start in range(0, len(signal), w):
                starts.append(start)
                segments.append(signal[start : start + w])
                owner.append(k)
        computed: list[dict] = [{} for _ in segments]
        for members in _equal_lengths(segments):  # every window from the zero state; no new state kept
            probs, _, *weights = self.advance(np.stack([segments[i] for i in members]),
                                              self.zero_state(len(members)), scale_weights)
            for row, i in enumerate(members):
                computed[i] = {"start": starts[i], "probabilities": probs[row, -1]}
                if scale_weights:
                    computed[i].update(scale_weights=summarise_scale_weights(weights[0][row]).mean(0),
                                       samples=probs.shape[1])
        windows: list[list[dict]] = [[] for _ in signals]
        for k, window in zip(owner, computed):  # each signal's windows in time order
            windows[k].append(window)
        return [merge_windows(ws) for ws in windows]


def merge_windows(windows: list[dict]) -> dict:
    """Windows of one signal -> its result: the element-wise max of their probabilities and, where they carry scale
    shares, the signal's mean share (each window weighted by its samples)."""
    result = {"windows": windows, "probabilities": np.max([w["probabilities"] for w in windows], axis=0)}
    if windows and "scale_weights" in windows[0]:
        lengths = np.array([w["samples"] for w in windows], np.float64)
        shares = np.stack([w["scale_weights"] for w in windows])
        result["scale_weights"] = (shares * lengths[:, None]).sum(0) / lengths.sum()
    return result


def _join(parts: list[np.ndarray], axis: int) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def _equal_lengths(segments: list[np.ndarray]) -> list[list[int]]:
    """Indices of the segments grouped by length, in first-seen order: each group is one batched call."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, seg in enumerate(segments):
        groups[len(seg)].append(i)
    return list(groups.values())


class StatePool:
    """The model states of many streams, each one row of one array per state tensor, in blocks of `block_rows`.
    A batch gathers its streams' rows with one fancy index per tensor and writes their new states back the same way;
    per-stream concatenations and copies (the bundled model has 14 state tensors) were a tenth of a stream worker's
    CPU (`loadtest/profile_streams.py`). Blocks are made with np.zeros, whose untouched pages cost no memory, and
    never move once made, so the inference thread may write the rows of a batch while the event loop hands out
    others. Rows are handed out and released on one thread (the event loop); a row whose stream is in a batch is
    released only once the batch is back."""

    def __init__(self, model: OnnxModel, block_rows: int = 1024):
        self.model, self.block_rows = model, block_rows
        self.blocks: list[StreamState] = []
        self._free: list[int] = []  # last released first: its pages are the ones already in memory

    def acquire(self, state: StreamState | None = None) -> int:
        """A free row holding `state` (the zero state if None)."""
        if not self._free:
            base = len(self.blocks) * self.block_rows
            self.blocks.append(self.model.zero_state(self.block_rows))
            self._free = list(range(base + self.block_rows - 1, base - 1, -1))
        slot = self._free.pop()
        self.write(slot, state or self.model.zero_state(1))
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def row(self, slot: int) -> StreamState:
        """Views of the row's tensors, each [1, ...]: writing them writes the pool."""
        block, r = divmod(slot, self.block_rows)
        return [a[r : r + 1] for a in self.blocks[block]]

    def write(self, slot: int, state: StreamState) -> None:
        """Put `state` ([1, ...] per tensor) into the row."""
        for row, value in zip(self.row(slot), state):
            row[...] = value

    def gather(self, slots: np.ndarray) -> StreamState:
        """The states of ascending `slots`, as one batch (copies)."""
        parts = self._by_block(slots)
        if len(parts) == 1:
            block, rows = parts[0]
            return [a[rows] for a in self.blocks[block]]
        return [np.concatenate([self.blocks[block][j][rows] for block, rows in parts])
                for j in range(len(self.model.state_names))]

    def scatter(self, slots: np.ndarray, state: StreamState) -> None:
        """Write a batch's states (rows in the order of ascending `slots`) into their rows."""
        start = 0
        for block, rows in self._by_block(slots):
            for dst, src in zip(self.blocks[block], state):
                dst[rows] = src[start : start + len(rows)]
            start += len(rows)

    def _by_block(self, slots: np.ndarray) -> list[tuple[int, np.ndarray]]:
        blocks = slots // self.block_rows
        if blocks[0] == blocks[-1]:  # the usual case: one block holds every stream
            return [(int(blocks[0]), slots - blocks[0] * self.block_rows)]
        return [(int(b), slots[blocks == b] - b * self.block_rows) for b in np.unique(blocks)]


class Stream:
    """One stream: samples arrive in any frame sizes; a prediction every `hop` samples of a window and a final one
    at its end, after which the next window starts from the zero state. Memory: the model state plus at most
    `max_pending` buffered samples, whatever the stream's length."""

    def __init__(self, model: OnnxModel, hop: int | None = None, max_pending: int | None = None,
                 scale_weights: bool = False):
        self.model = model
        self.hop = hop or model.default_hop
        if not 1 <= self.hop <= model.window:
            raise ValueError(f"hop must be in 1..{model.window}, got {self.hop}")
        if scale_weights and not model.has_scale_weights:
            raise ValueError(f"model {model.name} has no scale_weights output (exported before it was one)")
        self.scale_weights = scale_weights
        # scale shares summed over the samples of the current hop so far (a hop may span segments); how many samples
        # that is follows from t (`_hop_samples`)
        self._hop_share_sum = np.zeros(len(model.scales))
        self.max_pending = max_pending or 4 * model.window
        self._state: StreamState | None = model.zero_state(1)  # its own, until `use_pool`
        self._pool: StatePool | None = None
        self.slot: int | None = None  # its row of the pool
        self.window_index = 0
        self.t = 0  # samples of the current window already advanced
        self._pending = np.empty((self.max_pending, model.n_channels), np.float32)
        self.pending = 0
        self._last: np.ndarray | None = None  # probabilities at the current t
        # (window, t) of the last prediction made: a flush on a hop boundary must not repeat it
        self._last_made: tuple[int, int] | None = None

    @property
    def free(self) -> int:
        return self.max_pending - self.pending

    @property
    def state(self) -> StreamState:
        """The model state, [1, ...] per tensor: its own arrays, or views of its pool row."""
        return self._state if self._pool is None else self._pool.row(self.slot)

    @state.setter
    def state(self, value: StreamState) -> None:
        if self._pool is None:
            self._state = value
        else:
            self._pool.write(self.slot, value)

    def use_pool(self, pool: StatePool) -> None:
        """Keep the state in a row of `pool` from now on (the server batches pooled streams: `advance_pooled`)."""
        self.slot, self._pool, self._state = pool.acquire(self._state), pool, None

    def leave_pool(self) -> None:
        """Give the pool row back, keeping a copy of the state (never while a batch holds the row)."""
        if self._pool is not None:
            self._state = [s.copy() for s in self.state]
            self._pool.release(self.slot)
            self._pool, self.slot = None, None

    def feed(self, samples: np.ndarray) -> None:
        n = len(samples)
        if n > self.free:
            raise OverflowError(f"{n} samples exceed the {self.free} free pending slots")
        self._pending[self.pending : self.pending + n] = samples
        self.pending += n

    def next_segment_length(self, max_hops: int = 4, partial: bool = False) -> int:
        """Samples to advance now: whole hops up to the next prediction points (at most `max_hops` of them, never
        past the window end), or with `partial` whatever is pending. 0 = nothing to do yet."""
        to_boundary = self.hop - self.t % self.hop
        to_window_end = self.model.window - self.t
        if self.pending >= min(to_boundary, to_window_end):
            n = to_boundary
            while n + self.hop <= self.pending and n < max_hops * self.hop:
                n += self.hop
            return min(n, to_window_end)
        return min(self.pending, to_window_end) if partial else 0

    def take(self, n: int) -> np.ndarray:
        segment = self._pending[:n].copy()
        self._pending[: self.pending - n] = self._pending[n : self.pending]
        self.pending -= n
        return segment

    def apply(self, probs: np.ndarray, new_state: StreamState | None,
              weights: np.ndarray | None = None) -> list[Prediction]:
        """Take the result of advancing by the last `take` (probs [n, K]; with `scale_weights`, the mixer's weights
        [n, layers, scales]) -> the predictions it completes."""
        out = []
        t0 = self.t
        self.t += len(probs)
        shares = summarise_scale_weights(weights) if self.scale_weights else None
        done = t0  # samples of the window whose shares are in the hop's sum
        points = [t for t in range((t0 // self.hop + 1) * self.hop, self.t + 1, self.hop) if t < self.model.window]
        for t in points + ([self.t] if self.t == self.model.window else []):
            hop_weights = None
            if shares is not None:
                self._hop_share_sum += shares[done - t0 : t - t0].sum(0)
                hop_weights = self._hop_share_sum / self._hop_samples(t)
                self._hop_share_sum, done = np.zeros_like(self._hop_share_sum), t
            out.append(Prediction(self.window_index, t, probs[t - t0 - 1], t == self.model.window, hop_weights))
        if shares is not None and done < self.t:
            self._hop_share_sum += shares[done - t0 :].sum(0)
        self._last = probs[-1]
        if self.t == self.model.window:
            self.window_index += 1
            self.t = 0
            self.state = self.model.zero_state(1)
            self._last = None
        elif new_state is not None:  # None: `advance_pooled` already wrote it into the pool
            self.state = new_state
        if out:
            self._last_made = (out[-1].window, out[-1].t)
        return out

    def _hop_samples(self, t: int) -> int:
        """Samples of the hop that a prediction at t (>= 1) covers: those after the previous multiple of hop."""
        return t - (t - 1) // self.hop * self.hop

    def _advance(self, n: int) -> list[Prediction]:
        (result,) = self.model.advance_streams([self.take(n)], [self.state], self.scale_weights)
        return self.apply(*result)

    def push(self, samples: np.ndarray) -> list[Prediction]:
        """Feed samples and advance as far as they go (single-stream use; the server batches instead)."""
        samples = np.asarray(samples, np.float32).reshape(-1, self.model.n_channels)
        out = []
        for start in range(0, len(samples), self.max_pending):
            self.feed(samples[start : start + self.max_pending])
            while n := self.next_segment_length(max_hops=self.model.window):
                out += self._advance(n)
        return out

    # --- its whole state, for a snapshot -------------------------------------------------------------------------
    def position(self) -> dict:
        """Everything but the model state that the stream carries: where it is, what it holds, what it last said."""
        return {"window": self.window_index, "t": self.t, "pending": self._pending[: self.pending].copy(),
                "last": None if self._last is None else np.asarray(self._last, np.float32),
                "last_made": self._last_made, "hop_share_sum": self._hop_share_sum.copy()}

    def restore(self, state: StreamState, window: int, t: int, pending: np.ndarray, last: np.ndarray | None,
                last_made: tuple[int, int] | None, hop_share_sum: np.ndarray | None = None) -> None:
        """Continue from a `position()` and state taken from a stream of the same model (checked by the caller)."""
        self.state, self.window_index, self.t = state, window, t
        self._last, self._last_made = last, last_made
        if hop_share_sum is not None:
            self._hop_share_sum = np.asarray(hop_share_sum, np.float64)
        self.pending = 0
        self.feed(pending)

    def flush_prediction(self) -> Prediction | None:
        """The prediction of the current partial window at its current t (call once nothing is pending), unless
        there is none (t == 0) or it was the last one made (a flush on a hop boundary repeats nothing)."""
        if self.t == 0 or self._last_made == (self.window_index, self.t):
            return None
        self._last_made = (self.window_index, self.t)
        shares = self._hop_share_sum / self._hop_samples(self.t) if self.scale_weights else None
        return Prediction(self.window_index, self.t, self._last, False, shares)

    def flush(self) -> list[Prediction]:
        """Advance whatever is pending, then `flush_prediction` (single-stream use; the server batches both)."""
        out = []
        while n := self.next_segment_length(max_hops=self.model.window, partial=True):
            out += self._advance(n)
        final = self.flush_prediction()
        return out + ([final] if final else [])
