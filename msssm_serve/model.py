"""MS-SSM (multi-scale state space model) for sequence classification, in PyTorch.

One module tree serves both forms of the model:
  * `forward(x)`: a whole sequence from the zero state (training), logits at every step;
  * `advance(x, state)`: any number of new samples from a carried state (streaming, ONNX export).
Both go through `MSSSMClassifier.run`, so the step form cannot drift from the trained one. State is a tuple of plain
tensors that every function returns anew and never mutates.

Paper: "MS-SSM: A Multi-Scale State Space Model for Efficient Sequence Modeling", section 2 and appendix A.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import POOL_STATISTICS, ModelConfig
from .selective import selective_scan

POOL_STD_EPS = 1e-5  # inside the pooled standard deviation's square root (features are RMS-normalised, ~1)
# Stands for "no sample yet" in the running extremes (float32-safe; features are RMS-normalised, ~1).
EXTREMA_EMPTY = 1e30

State = tuple[torch.Tensor, ...]


def haar_filters(kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Haar low-pass phi and high-pass psi, zero-padded to the kernel length (tap l multiplies x[t - l*dilation])."""
    low = torch.zeros(kernel_size)
    high = torch.zeros(kernel_size)
    low[:2] = 1 / math.sqrt(2)
    high[0], high[1] = 1 / math.sqrt(2), -1 / math.sqrt(2)
    return low, high


def initial_a(cfg: ModelConfig) -> torch.Tensor:
    """Diagonal of A for every SSM of the array: [n_ssm, d_inner, N], all entries negative.

    `scale`: the paper asks for diag(A^s) uniform in (-N(S+1-s), -N(S-s)] for s in 0..S+1, which is positive for
    s = S+1 (an off-by-one). We shift the intervals by one block of N so that every entry is negative and use an
    evenly spaced grid: A^s_n = -(N(S+1-s) + n + 1). Concatenated over scales this is S4D-real's -(n+1) for
    n < (S+2)N, dealt out so that the coarsest scale (a^S, s = S+1) gets -1..-N (Abar nearest 1, longest memory)
    and the raw input (s = 0) the most negative block (shortest memory).
    `mamba`: A_n = -(n+1) for every SSM (the ablation).
    """
    n = torch.arange(cfg.d_state, dtype=torch.float32) + 1
    if cfg.a_init == "mamba" or cfg.n_ssm == 1:
        per_ssm = [n] * cfg.n_ssm
    elif cfg.a_init == "scale":
        per_ssm = [cfg.d_state * (cfg.n_scales + 1 - s) + n for s in range(cfg.n_ssm)]
    else:
        raise ValueError(f"unknown a_init {cfg.a_init!r}")
    a = -torch.stack(per_ssm)  # [n_ssm, N]
    return a[:, None, :].expand(cfg.n_ssm, cfg.d_inner, cfg.d_state).clone()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MultiScaleDecomposition(nn.Module):
    """Nested causal depthwise dilated convolutions (paper eq. 2-3): u -> [u, d^1, ..., d^S, a^S].

    Scale s (1-based) filters a^{s-1} with learnable per-channel phi_s / psi_s at dilation 2^(s-1). Its state is the
    last (K-1)*2^(s-1) samples of a^{s-1}: the ring buffer a stream carries between calls.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        low, high = haar_filters(cfg.kernel_size)
        self.low = nn.Parameter(low.repeat(cfg.n_scales, cfg.d_inner, 1))  # [S, D, K]
        self.high = nn.Parameter(high.repeat(cfg.n_scales, cfg.d_inner, 1))

    def forward(self, u: torch.Tensor, history: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """u: [B, L, D]; history[s]: [B, (K-1)*2^s, D] -> sequences [B, L, S+2, D], new history."""
        sequences = [u]
        new_history = []
        approx = u
        for s in range(self.cfg.n_scales):
            dilation = 2**s
            past = self.cfg.conv_history(s + 1)
            full = torch.cat([history[s], approx], dim=1)  # [B, past + L, D]
            # Slices counted from the end (constants), not from the dynamic length: the exported graph then needs no
            # shape arithmetic, which is most of its ops at small calls.
            new_history.append(full[:, -past:] if past else full[:, :0])
            low = high = None
            for tap in range(self.cfg.kernel_size):
                lag = tap * dilation
                shifted = full[:, past - lag : -lag if lag else None]  # x[t - lag]
                low_tap, high_tap = shifted * self.low[s, :, tap], shifted * self.high[s, :, tap]
                # Started from the first tap, not from zeros: one op fewer per filter in the exported graph.
                low = low_tap if low is None else low + low_tap
                high = high_tap if high is None else high + high_tap
            sequences.append(high)
            approx = low
        sequences.append(approx)
        return torch.stack(sequences, dim=2), new_history


class SSMArray(nn.Module):
    """n_ssm independent diagonal SSMs, one per scale sequence (discretisation: see `selective`).

    `s6`: B_t, C_t, Delta_t are functions of the raw input u_t (paper: "Input-dependent Parameterization").
    `s4`: B, C, Delta are learned constants (time-invariant, S4D-real style).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        m, d, n, r = cfg.n_ssm, cfg.d_inner, cfg.d_state, cfg.rank
        self.A_log = nn.Parameter(torch.log(-initial_a(cfg)))
        self.D = nn.Parameter(torch.ones(m, d))
        # Delta initialised log-uniform in [dt_min, dt_max] (Mamba), stored through softplus^-1.
        dt = torch.exp(torch.rand(m, d) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt_bias = dt + torch.log(-torch.expm1(-dt))
        if cfg.ssm == "s6":
            self.x_proj = nn.Linear(d, m * (r + 2 * n), bias=False)
            self.dt_proj = nn.Parameter(torch.randn(m, r, d) * r**-0.5)
            self.dt_bias = nn.Parameter(dt_bias)
        elif cfg.ssm == "s4":
            self.B = nn.Parameter(torch.randn(m, d, n) * n**-0.5)
            self.C = nn.Parameter(torch.randn(m, d, n) * n**-0.5)
            self.dt_bias = nn.Parameter(dt_bias)
        else:
            raise ValueError(f"unknown ssm kind {cfg.ssm!r}")

    def forward(
        self, sequences: torch.Tensor, u: torch.Tensor, h0: torch.Tensor, scan: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """sequences: [B, L, M, D]; u (raw input): [B, L, D]; h0: [B, M, D, N] -> y [B, L, M, D], h_L."""
        cfg = self.cfg
        batch, length = u.shape[:2]
        A = -torch.exp(self.A_log)  # [M, D, N]
        if cfg.ssm == "s6":
            params = self.x_proj(u).view(batch, length, cfg.n_ssm, cfg.rank + 2 * cfg.d_state)
            dt_low, B, C = torch.split(params, [cfg.rank, cfg.d_state, cfg.d_state], dim=-1)
            # One matmul with the block-diagonal [M*R, M*D] form of dt_proj: onnxruntime runs it several times faster
            # than the per-scale contraction (an Einsum, or a Mul and a sum over R), and the zeros add nothing.
            m, r, d = self.dt_proj.shape
            eye = torch.eye(m, dtype=self.dt_proj.dtype, device=self.dt_proj.device)
            block_diagonal = (self.dt_proj[:, :, None, :] * eye[:, None, :, None]).reshape(m * r, m * d)
            dt_in = (dt_low.reshape(batch, length, m * r) @ block_diagonal).view(batch, length, m, d)
            dt = F.softplus(dt_in + self.dt_bias)  # [B, L, M, D]
            B, C = B.unsqueeze(3), C.unsqueeze(3)  # [B, L, M, 1, N]: shared by the channels, as in Mamba
        else:
            dt = F.softplus(self.dt_bias).expand(batch, length, -1, -1)
            B, C = self.B[None, None], self.C[None, None]  # [1, 1, M, D, N]
        # The recurrence runs in float32 even under autocast: bf16 decays compound badly over thousands of steps.
        sequences, dt, B, C = (t.float() for t in (sequences, dt, B, C))
        y, h_last = selective_scan(sequences, dt, A, B, C, h0, scan, cfg.scan_block, cfg.scan_levels)
        return y + self.D * sequences, h_last


class ScaleMixer(nn.Module):
    """z_t = E_t y_t (paper eq. 4). `input`: E_t = Linear(u_t); `static`: E learned constant;
    `softmax`: E_t = softmax(Linear(u_t)) (the ablations of table 5)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mixer
        m = cfg.n_ssm
        if self.kind == "static":
            self.E = nn.Parameter(torch.ones(m))
        elif self.kind in ("input", "softmax"):
            self.proj = nn.Linear(cfg.d_inner, m)
            nn.init.normal_(self.proj.weight, std=0.02)
            nn.init.constant_(self.proj.bias, 1.0 if self.kind == "input" else 0.0)
        else:
            raise ValueError(f"unknown mixer {self.kind!r}")

    def forward(self, y: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y: [B, L, M, D]; u: [B, L, D] -> (z [B, L, D], the weights E_t [B, L, M] it mixed with)."""
        if self.kind == "static":
            return (y * self.E[:, None]).sum(2), self.E.expand(*u.shape[:2], -1)
        E = self.proj(u)
        if self.kind == "softmax":
            E = torch.softmax(E, dim=-1)
        # Mul + sum, not einsum: onnxruntime runs the exported Einsum several times slower.
        return (y * E.unsqueeze(-1)).sum(2), E


class MSSSM(nn.Module):
    """Multi-scale decomposition -> array of SSMs -> scale mixer. With n_scales == 0: one plain SSM."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.decompose = MultiScaleDecomposition(cfg) if cfg.n_scales > 0 else None
        self.ssms = SSMArray(cfg)
        self.mixer = ScaleMixer(cfg) if cfg.n_scales > 0 else None

    def forward(self, u, conv_history, h0, scan):
        if self.decompose is None:
            sequences, new_history = u.unsqueeze(2), []
        else:
            sequences, new_history = self.decompose(u, conv_history)
        y, h = self.ssms(sequences, u, h0, scan)
        z, weights = (y[:, :, 0], None) if self.mixer is None else self.mixer(y, u)
        return z, new_history, h, weights


class ResidualBlock(nn.Module):
    """Mamba-style block: x + out_proj(MSSSM(silu(in_x)) * silu(gate)), with (in_x, gate) = in_proj(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model)
        self.in_proj = nn.Linear(cfg.d_model, 2 * cfg.d_inner)
        self.msssm = MSSSM(cfg)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, conv_history, h0, scan):
        """-> (x + block output, new conv history, new SSM state, scale-mixer weights [B, L, M] or None)."""
        u, gate = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        z, new_history, h, weights = self.msssm(F.silu(u), conv_history, h0, scan)
        return x + self.dropout(self.out_proj(z * F.silu(gate))), new_history, h, weights


class MSSSMClassifier(nn.Module):
    """Leads -> input projection -> residual MS-SSM blocks -> causal pooling -> class logits at every step.

    The pooled feature after t samples is the mean of the first t feature vectors (with `pool="mean_std"` also their
    standard deviation; "mean_std_extrema" also their maximum and minimum from sample `extrema_from` on), so the
    output at t depends on those t samples only: a stream's prediction at t equals the window classifier on its
    first t samples.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Input normalisation lives in the model (and so in the exported graph): fitted by the trainer.
        self.register_buffer("input_mean", torch.zeros(cfg.n_channels))
        self.register_buffer("input_std", torch.ones(cfg.n_channels))
        if cfg.template_length:
            self.register_buffer("template", torch.zeros(cfg.template_length, cfg.n_channels))
            self.register_buffer("template_std", torch.ones(cfg.n_channels))
        self.embed = nn.Linear(cfg.n_channels * cfg.features_per_channel, cfg.d_model)
        self.blocks = nn.ModuleList(ResidualBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.pooled_features, cfg.n_classes)
        if "std" in cfg.pool_statistics:
            # The spread is computed about this point, set near the features' mean (training/fit_head.py sets it; any value
            # gives the same spread in exact arithmetic): E[(f-c)^2] - (E[f]-c)^2 then cancels little in float32,
            # where E[f^2] - E[f]^2 lost up to 5e-5 of the probabilities (export's parity) on the rhythm model.
            self.register_buffer("pool_center", torch.zeros(cfg.d_model))

    # --- state -------------------------------------------------------------------------------------------------
    def state_spec(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and per-stream shapes (batch dim left out) of the state tensors, in order."""
        cfg = self.cfg
        spec = []
        for layer in range(cfg.n_layers):
            for s in range(1, cfg.n_scales + 1):
                spec.append((f"conv_{layer}_{s}", (cfg.conv_history(s), cfg.d_inner)))
            spec.append((f"ssm_{layer}", (cfg.n_ssm, cfg.d_inner, cfg.d_state)))
        spec.append(("pool_sum", (cfg.d_model,)))
        if "std" in cfg.pool_statistics:
            spec.append(("pool_sum_sq", (cfg.d_model,)))  # of the features less pool_center
        if "max" in cfg.pool_statistics:
            spec.append(("pool_extrema", (2 * cfg.d_model,)))  # running max, then min (0 until extrema_from)
        spec.append(("pool_count", (1,)))
        return spec

    def zero_state(self, batch: int, device: torch.device | str | None = None) -> State:
        device = device if device is not None else self.input_mean.device
        return tuple(torch.zeros(batch, *shape, device=device) for _, shape in self.state_spec())

    def layer_states(self, state: State) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        """Per layer (conv histories of scales 1..S, SSM state), in `state_spec` order."""
        per_layer = self.cfg.n_scales + 1
        return [
            (list(state[i * per_layer : (i + 1) * per_layer - 1]), state[(i + 1) * per_layer - 1])
            for i in range(self.cfg.n_layers)
        ]

    def input_features(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, C] at sample positions [B, T, 1] (counted from the stream's start) -> the embedding's input:
        normalised leads; with a template, each lead's deviation from the training mean series beside it; with
        `lead_mask`, missing (NaN) leads zeroed and a 0/1 presence flag per lead after them."""
        features = [(x - self.input_mean) / self.input_std]
        if self.cfg.template_length:
            index = positions.clamp(max=self.cfg.template_length - 1).long()[..., 0]  # [B, T]
            features.append((x - self.template[index]) / self.template_std)
        if self.cfg.lead_mask:
            present = ~torch.isnan(x)
            features = [torch.where(present, f, torch.zeros_like(f)) for f in features] + [present.to(x.dtype)]
        return features[0] if len(features) == 1 else torch.cat(features, dim=-1)

    # --- the one computation ------------------------------------------------------------------------------------
    def run(self, x: torch.Tensor, state: State, scan: str = "auto"):
        """x: [B, T, C] raw signal from `state` on -> (logits [B, T, classes], new state, scale-mixer weights
        [B, T, layers, S+2] or None without scales). `scan` picks the recurrence's implementation (see
        `selective.selective_scan`); all compute the same."""
        pooled, new_state, scale_weights = self.pooled(x, state, scan)
        return self.head(pooled), new_state, scale_weights

    def pooled(self, x: torch.Tensor, state: State, scan: str = "auto"):
        """As `run`, with what the head reads at every step [B, T, cfg.pooled_features] in place of the logits."""
        stats = self.cfg.pool_statistics
        # the state's tail: pool_sum, [pool_sum_sq,] [pool_extrema,] pool_count
        n_pool = 2 + ("std" in stats) + ("max" in stats)
        pool_sum, pool_count = state[-n_pool], state[-1]
        # Samples seen so far, this call's included: the causal mean's divisor and, less one, each sample's position.
        counts = pool_count.unsqueeze(1) + torch.cumsum(torch.ones_like(x[..., :1]), dim=1)  # [B, T, 1]
        h = self.embed(self.input_features(x, counts - 1))
        new_state: list[torch.Tensor] = []
        mixer_weights = []
        for block, (conv_history, ssm_h) in zip(self.blocks, self.layer_states(state)):
            h, conv_history, ssm_h, weights = block(h, conv_history, ssm_h, scan)
            new_state.extend(conv_history)
            new_state.append(ssm_h)
            mixer_weights.append(weights)
        feats = self.norm_f(h)
        sums = pool_sum.unsqueeze(1) + torch.cumsum(feats, dim=1)
        mean = sums / counts
        pooled = [mean]
        new_state.append(sums[:, -1])
        if "std" in stats:
            centred = feats - self.pool_center
            sums_sq = state[-n_pool + 1].unsqueeze(1) + torch.cumsum(centred * centred, dim=1)
            offset = mean - self.pool_center
            # E[(f-c)^2] - (E[f]-c)^2, clamped: float rounding can take it a hair below zero; POOL_STD_EPS keeps the
            # square root's gradient finite at the first step, where the spread is 0.
            spread = torch.sqrt(torch.clamp(sums_sq / counts - offset * offset, min=0.0) + POOL_STD_EPS)
            pooled.append(spread)
            new_state.append(sums_sq[:, -1])
        if "max" in stats:
            extrema, last = self.running_extrema(feats, mean, counts, state[-2], pool_count)
            pooled.append(extrema)
            new_state.append(last)
        new_state.append(counts[:, -1])
        pooled = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=-1)
        scale_weights = torch.stack(mixer_weights, dim=2) if self.cfg.n_scales > 0 else None
        return pooled, tuple(new_state), scale_weights

    def running_extrema(self, feats, mean, counts, carried, pool_count):
        """Each feature's maximum and minimum over the samples from position `extrema_from` on, at every step
        [B, T, 2 * d_model] (the mean until then), and what the state carries on: those at the last step, or
        zeros before `extrema_from` (the state stays finite; pool_count says whether it holds anything)."""
        first = self.cfg.extrema_from
        # max(f) and max(-f) = -min(f) in one pass
        both, mean_both = torch.cat([feats, -feats], dim=-1), torch.cat([mean, -mean], dim=-1)
        counted = (counts - 1) >= first  # [B, T, 1]: this sample's position is past the warm-up
        before = torch.cat([carried[:, : self.cfg.d_model], -carried[:, self.cfg.d_model :]], dim=-1)
        before = torch.where(pool_count > first, before, torch.full_like(before, -EXTREMA_EMPTY))
        running = torch.maximum(causal_max(torch.where(counted, both, torch.full_like(both, -EXTREMA_EMPTY)),
                                           self.cfg.max_chunk), before.unsqueeze(1))
        running = torch.where(counted, running, mean_both)
        signed = torch.cat([running[..., : self.cfg.d_model], -running[..., self.cfg.d_model :]], dim=-1)
        last = torch.where(counted[:, -1], signed[:, -1], torch.zeros_like(signed[:, -1]))
        return signed, last

    def forward(self, x: torch.Tensor, scan: str = "auto") -> torch.Tensor:
        """Training form: x [B, L, C] from the zero state -> logits at every step [B, L, classes]."""
        return self.run(x, self.zero_state(x.shape[0], x.device), scan)[0]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.cfg.multi_label else torch.softmax(logits, dim=-1)

    def advance(self, x: torch.Tensor, state: State, scan: str = "auto", scale_weights: bool = False):
        """Streaming form: x [B, T, C] (T >= 1) -> (class probabilities at each step [B, T, classes], new state),
        and with `scale_weights` the scale mixer's weights at each step [B, T, layers, S+2] third (as `run`)."""
        logits, new_state, weights = self.run(x, state, scan)
        return (self.probabilities(logits), new_state, weights) if scale_weights else (self.probabilities(logits), new_state)


class EnsembleClassifier(nn.Module):
    """Members of one architecture (refits from different seeds, or the models of cross-validation folds, each with
    the normalisation and template of the series it trained on), served as one model:
    the probabilities are the members' mean at every step, the state is the members' states one after another
    (names prefixed `m<k>_`), and the scale mixer's weights are the members' mean. It speaks MSSSMClassifier's
    streaming protocol (`state_spec`, `zero_state`, `advance`), so the trainer scores it, export traces it into one
    graph and the server runs it like any single model; each member computes exactly what it does alone.

    Why: on a training set of a few dozen series a single model's TEST accuracy moves with its seed by several points;
    averaging the probabilities of a few seeds removes much of that variance (training/recipe.py decides how many)."""

    def __init__(self, members: list[MSSSMClassifier]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if any(m.cfg != members[0].cfg for m in members):
            raise ValueError("ensemble members must share one architecture (ModelConfig)")
        self.members = nn.ModuleList(members)
        self.cfg = members[0].cfg

    # Each member normalises its input itself, with what it was fitted on (the same data for refits, TRAIN less a
    # fold for fold models: close); the first one's describes the ensemble.
    @property
    def input_mean(self) -> torch.Tensor:
        return self.members[0].input_mean

    @property
    def input_std(self) -> torch.Tensor:
        return self.members[0].input_std

    def state_spec(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"m{k}_{name}", shape) for k, m in enumerate(self.members) for name, shape in m.state_spec()]

    def zero_state(self, batch: int, device: torch.device | str | None = None) -> State:
        return tuple(t for m in self.members for t in m.zero_state(batch, device))

    def advance(self, x: torch.Tensor, state: State, scan: str = "auto", scale_weights: bool = False):
        """As MSSSMClassifier.advance: the members' mean probabilities (and mixer weights), their states in turn."""
        per_member = len(self.members[0].state_spec())
        probs, new_state, weights = [], [], []
        for k, member in enumerate(self.members):
            p, s, w = member.advance(x, state[k * per_member : (k + 1) * per_member], scan, scale_weights=True)
            probs.append(p)
            new_state.extend(s)
            weights.append(w)
        mean = torch.stack(probs).mean(0)
        mean_weights = None if weights[0] is None else torch.stack(weights).mean(0)
        return (mean, tuple(new_state), mean_weights) if scale_weights else (mean, tuple(new_state))


# What the trainer scores, export traces and a checkpoint holds: one model, or an ensemble of them.
Classifier = MSSSMClassifier | EnsembleClassifier


def causal_max(x: torch.Tensor, max_length: int) -> torch.Tensor:
    """Running maximum over axis 1 of x [B, T, F] (T <= max_length), as log2(T) shifted maxima: exact, differentiable,
    and plain tensor ops that export to ONNX with T dynamic (torch.cummax has no ONNX form). The export traces the
    depth for `max_length` samples, the longest call the graph takes; eager calls use their own T's."""
    length = max_length if torch.onnx.is_in_onnx_export() else x.shape[1]
    shift = 1
    while shift < length:
        # x[t] = max(x[t], x[t - shift]) for t >= shift; the first `shift` steps have nothing that far back. Slices
        # only (no padding by `shift`): a call shorter than the traced depth costs a few ops on empty tensors.
        x = torch.cat([x[:, :shift], torch.maximum(x[:, shift:], x[:, :-shift])], dim=1)
        shift *= 2
    return x


def with_pool(model: MSSSMClassifier, pool: str | None, extrema_from: int | None = None) -> MSSSMClassifier:
    """`model` pooling `pool` (None: as it does), computing exactly what it did: each pooling's statistics extend
    the one before (config.POOL_STATISTICS), so the head keeps its columns and those of the new statistics start at
    zero (a warm start that then learns to use them). `extrema_from` sets where extremes added by the widening
    start (None: the config's default). ValueError for a change that would drop what a head reads."""
    if pool in (None, model.cfg.pool):
        return model
    if isinstance(model, EnsembleClassifier):
        raise ValueError("an ensemble's members each have their own head: change the pooling of each member")
    have, want = model.cfg.pool_statistics, POOL_STATISTICS[pool]
    if want[: len(have)] != have:
        raise ValueError(f"the checkpoint pools {model.cfg.pool!r}; pooling {pool!r} instead would drop what its "
                         "head reads")
    changes = {"pool": pool}
    if extrema_from is not None and "max" not in have:
        changes["extrema_from"] = extrema_from
    wider = MSSSMClassifier(dataclasses.replace(model.cfg, **changes)).to(model.input_mean.device)
    weights = model.state_dict()
    head = weights.pop("head.weight")
    missing, unexpected = wider.load_state_dict(weights, strict=False)
    assert set(missing) <= {"head.weight", "pool_center"} and not unexpected, (missing, unexpected)
    with torch.no_grad():
        wider.head.weight.zero_()
        wider.head.weight[:, : head.shape[1]] = head
    return wider.train(model.training)


def with_std_pooling(model: MSSSMClassifier) -> MSSSMClassifier:
    """A mean-pooled model as a `pool="mean_std"` one computing exactly the same (see with_pool)."""
    if model.cfg.pool != "mean":
        raise ValueError(f"the model already pools {model.cfg.pool!r}")
    return with_pool(model, "mean_std")


class StreamingGraph(nn.Module):
    """What export traces: (x, *state) -> (probabilities, *new_state, scale_weights); the recurrence as one
    placeholder node per layer that export lowers to an ONNX Scan (see `selective.selective_scan`, scan="onnx").
    The scale mixer's raw weights are the graph's last output (a model without scales has none): they are computed
    for the mixing anyway, so the output costs one small Concat; summaries are the runtime's."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, *state: torch.Tensor):
        probs, new_state, weights = self.model.advance(x, state, scan="onnx", scale_weights=True)
        return (probs, *new_state) if weights is None else (probs, *new_state, weights)
