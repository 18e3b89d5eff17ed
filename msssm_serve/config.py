"""Model configuration: one dataclass shared by the trainer, the exporter and the runtime (no torch here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


# Each pooling's statistics of the final features, in the head's column order; each extends the one before, so a
# trained head widens to the next with its present columns kept (`model.with_pool`).
POOL_STATISTICS = {"mean": ("mean",), "mean_std": ("mean", "std"), "mean_std_extrema": ("mean", "std", "max", "min")}


@dataclass
class ModelConfig:
    n_channels: int = 12  # input leads
    n_classes: int = 5
    multi_label: bool = True  # sigmoid per class (True) or softmax over classes (False)
    d_model: int = 32
    n_layers: int = 3
    expand: int = 2  # d_inner = expand * d_model, as in Mamba
    d_state: int = 4  # N: state size of each SSM in the array ((S+2)*N per channel in all)
    n_scales: int = 3  # S: dilated-conv levels; 0 = plain single-scale Mamba-style block (one SSM)
    kernel_size: int = 4  # K of every dilated conv
    ssm: Literal["s6", "s4"] = "s6"
    a_init: Literal["scale", "mamba"] = "scale"
    mixer: Literal["input", "static", "softmax"] = "input"
    dt_rank: int = 0  # 0 = ceil(d_model / 16), as in Mamba
    dt_min: float = 0.001
    dt_max: float = 0.1
    dropout: float = 0.0
    # A model trained on lead subsets: a missing lead is NaN in the input; the model zeroes it and also sees, per
    # lead, whether it is present (the input projection takes 2 * n_channels features). False: every lead required.
    lead_mask: bool = False
    # Series of one fixed length whose classes share one shape (many UCR sets): the training set's mean series,
    # `template_length` samples per channel, is subtracted position by position and the deviation, scaled, is fed
    # beside the signal (the input projection takes one more feature per channel). Without it the shared shape hides
    # what separates the classes (UCR OliveOil: class means differ by 0.04 of the signal's std and a model cannot
    # even fit its training set). Positions past the template use its last sample. 0: no template.
    template_length: int = 0
    # What the head reads: the causal mean of the last block's features ("mean"), or that mean and their causal
    # standard deviation ("mean_std", statistics pooling). A mean of features is linear in what the blocks compute,
    # so a class defined by how much something varies over the window (sinus arrhythmia: beat-to-beat variation of
    # the heart rate) must be computed inside the blocks; the standard deviation hands the head that spread
    # directly. Streams carry one more running sum (of squares). "mean_std_extrema" adds each feature's running
    # maximum and minimum over the samples from `extrema_from` on: an event anywhere in the window (a premature beat,
    # a run of flutter waves) moves an extreme, where the mean and spread dilute it over the window. Until
    # `extrema_from` samples are seen (the first second, where the SSMs still settle from the zero state) the
    # extremes read as the mean. Streams carry both extremes.
    pool: Literal["mean", "mean_std", "mean_std_extrema"] = "mean"
    extrema_from: int = 100
    # `blocked_scan` scans blocks of `scan_block` steps; scan="static" runs exactly `scan_levels` levels. The runtime
    # splits inputs longer than max_chunk = scan_block ** scan_levels (32768: more than 60 s at 500 Hz) into
    # several calls of the exported graph, which bounds the memory of one call.
    scan_block: int = 8
    scan_levels: int = 5

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_ssm(self) -> int:
        """Sequences per channel: input, d^1..d^S, a^S (S+2); a single SSM when n_scales == 0."""
        return self.n_scales + 2 if self.n_scales > 0 else 1

    @property
    def features_per_channel(self) -> int:
        """Inputs of the embedding per channel: the signal, its deviation from the template, its presence flag."""
        return 1 + bool(self.template_length) + bool(self.lead_mask)

    @property
    def rank(self) -> int:
        return self.dt_rank or -(-self.d_model // 16)

    @property
    def max_chunk(self) -> int:
        return self.scan_block**self.scan_levels

    @property
    def pool_statistics(self) -> tuple[str, ...]:
        """What the head reads of the final features, in the head's column order (d_model columns each)."""
        return POOL_STATISTICS[self.pool]

    @property
    def pooled_features(self) -> int:
        """Width of what the head reads."""
        return self.d_model * len(self.pool_statistics)

    def conv_history(self, scale: int) -> int:
        """Past samples the conv of `scale` (1-based) needs: (K-1) * 2^(s-1)."""
        return (self.kernel_size - 1) * 2 ** (scale - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)
