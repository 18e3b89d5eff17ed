"""benchmarks/roofline.py: its count of the work per sample and its graph without the recurrence."""

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.roofline import feeds_for, one_thread, without_recurrence, work_per_sample
from msssm_serve.config import ModelConfig
from msssm_serve.model import MSSSMClassifier

ATEN = torch.ops.aten
EXP_OPS = {ATEN.exp.default}
# softplus is exported as relu(x) + log(1 + exp(-|x|)): one exponential and one log per element
SOFTPLUS = {ATEN.softplus.default}
OTHER_OPS = {ATEN.silu.default, ATEN.sigmoid.default, ATEN.rsqrt.default, ATEN.sqrt.default}


class TranscendentalCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in EXP_OPS or func in SOFTPLUS:
            self.counts["exp"] += out.numel()
        if func in OTHER_OPS or func in SOFTPLUS:
            self.counts["other_trans"] += out.numel()
        return out


def measured_counts(cfg: ModelConfig, batch: int, length: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = MSSSMClassifier(cfg).eval()
    x = torch.randn(batch, length, cfg.n_channels)
    flops = FlopCounterMode(display=False)
    trans = TranscendentalCounter()
    with torch.no_grad(), flops, trans:
        model.advance(x, model.zero_state(batch), scan="sequential")
    return {"macs": flops.get_total_flops() / 2, **trans.counts}


@pytest.mark.parametrize("overrides", [{}, {"lead_mask": True, "d_model": 48, "n_scales": 2, "d_state": 8}])
def test_work_per_sample_matches_what_the_model_executes(overrides):
    cfg = ModelConfig(**overrides)
    # Per-call work (A = -exp(A_log), the block-diagonal dt projection's weights) cancels in the difference of two
    # lengths, which leaves what each sample costs.
    short, long_ = measured_counts(cfg, 2, 20), measured_counts(cfg, 2, 70)
    per_sample = {k: (long_[k] - short[k]) / (2 * 50) for k in long_}
    counted = work_per_sample(cfg)
    assert per_sample["macs"] == counted["macs"]
    assert per_sample["exp"] == counted["exp"]
    assert per_sample["other_trans"] == counted["other_trans"]


def test_the_graph_without_recurrence_keeps_everything_else(model_dir):
    graph = onnx.load(str(model_dir / "model.onnx"))
    stripped = without_recurrence(graph)
    ops = Counter(n.op_type for n in stripped.graph.node)
    assert ops["Scan"] == 0 and Counter(n.op_type for n in graph.graph.node)["Scan"] > 0
    # what the recurrence did not touch still runs: same probabilities shape, and the MatMuls are all there
    assert ops["MatMul"] == Counter(n.op_type for n in graph.graph.node)["MatMul"]
    full, rest = one_thread(graph), one_thread(stripped)
    channels = full.get_inputs()[0].shape[2]
    feeds = feeds_for(full, channels, rows=3, samples=7)
    probs_full, probs_rest = full.run(None, feeds)[0], rest.run(None, feeds)[0]
    assert probs_full.shape == probs_rest.shape == (3, 7, probs_full.shape[2])
    assert not np.allclose(probs_full, probs_rest)  # the recurrence really is gone
