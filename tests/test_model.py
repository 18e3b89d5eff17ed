"""The model's two forms are one function: whole-sequence forward == stepwise advance, in any chunking."""

import numpy as np
import pytest
import torch

from msssm_serve.config import ModelConfig
from msssm_serve.mixing import mean_mixing_distance, model_mean_mixing_distance
from msssm_serve.model import POOL_STD_EPS, EnsembleClassifier, MSSSMClassifier, causal_max, initial_a, with_pool, with_std_pooling
from msssm_serve.scan import blocked_scan, sequential_scan
from msssm_serve.selective import fused_available, selective_scan_fused, selective_scan_tensor_ops


def small_model(seed=0, **overrides) -> MSSSMClassifier:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"d_model": 16, "n_layers": 2, "d_state": 4, **overrides})
    model = MSSSMClassifier(cfg).eval()
    # Non-trivial normalisation so that it is exercised too.
    model.input_mean.normal_()
    model.input_std.uniform_(0.5, 2.0)
    return model


def random_chunks(total, rng, sizes=(1, 2, 7, 64, 999, 3, 250)):
    chunks = []
    while sum(chunks) < total:
        chunks.append(int(rng.choice(sizes)))
    chunks[-1] -= sum(chunks) - total
    return [c for c in chunks if c > 0]


@pytest.mark.parametrize("ssm,n_scales,pool", [("s6", 0, "mean"), ("s6", 3, "mean"), ("s4", 0, "mean"),
                                                ("s4", 3, "mean"), ("s6", 3, "mean_std"),
                                                ("s6", 3, "mean_std_extrema")])
def test_advance_in_random_chunks_equals_forward(ssm, n_scales, pool):
    model = small_model(ssm=ssm, n_scales=n_scales, pool=pool)
    x = torch.randn(2, 5000, 12) * 2
    rng = np.random.default_rng(1)
    with torch.no_grad():
        expected = model.probabilities(model(x))
        state = model.zero_state(2)
        pieces, start = [], 0
        for size in random_chunks(5000, rng):
            probs, state = model.advance(x[:, start : start + size], state)
            pieces.append(probs)
            start += size
        got = torch.cat(pieces, dim=1)
        # forward is causal: its step t is the model on the prefix of t samples.
        for prefix in (1, 37, 1000):
            on_prefix = model.probabilities(model(x[:, :prefix]))[:, -1]
            assert (on_prefix - expected[:, prefix - 1]).abs().max() <= 1e-5
    assert got.shape == (2, 5000, 5)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("ssm", ["s6", "s4"])
def test_every_scan_implementation_gives_the_same_model(ssm):
    model = small_model(ssm=ssm)
    x = torch.randn(3, 700, 12)
    with torch.no_grad():
        state = model.zero_state(3)
        _, state = model.advance(torch.randn(3, 50, 12), state)
        ref, ref_state = model.advance(x, state, scan="sequential")
        for scan in ("auto", "blocked", "static"):
            probs, new_state = model.advance(x, state, scan=scan)
            assert (probs - ref).abs().max() <= 1e-5, scan
            for a, b in zip(new_state, ref_state):
                assert (a - b).abs().max() <= 1e-4 * (1 + b.abs().max()), scan


def test_batch_of_streams_at_different_positions_equals_each_alone():
    model = small_model()
    offsets = [0, 13, 250, 1001]
    signals = [torch.randn(1, off + 40, 12) for off in offsets]
    with torch.no_grad():
        states = []
        for sig, off in zip(signals, offsets):
            st = model.zero_state(1)
            if off:
                _, st = model.advance(sig[:, :off], st)
            states.append(st)
        batched = tuple(torch.cat(parts) for parts in zip(*states))
        new = torch.cat([sig[:, off:] for sig, off in zip(signals, offsets)])
        together, _ = model.advance(new, batched)
        for i, (sig, off) in enumerate(zip(signals, offsets)):
            alone, _ = model.advance(sig[:, off:], states[i])
            assert (together[i] - alone[0]).abs().max() <= 1e-6


def test_state_is_not_mutated_and_its_size_is_constant():
    model = small_model()
    with torch.no_grad():
        state = model.zero_state(1)
        _, after_10 = model.advance(torch.randn(1, 10, 12), state)
        assert all((s == 0).all() for s in state), "advance must not write into its input state"
        st = after_10
        for _ in range(10):
            _, st = model.advance(torch.randn(1, 9999, 12), st)
    assert float(st[-1][0, 0]) == 10 + 10 * 9999
    assert [s.shape for s in after_10] == [s.shape for s in st]
    assert sum(s.numel() for s in after_10) == sum(s.numel() for s in st)


def relative_error(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_blocked_scan_equals_sequential_in_values_and_gradients():
    torch.manual_seed(0)
    for length in (1, 5, 8, 9, 64, 1000):
        a = torch.rand(2, length, 3, 4, dtype=torch.float64, requires_grad=True)
        u = torch.randn(2, length, 3, 4, dtype=torch.float64, requires_grad=True)
        h0 = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
        weights = torch.randn(2, length, 3, 4, dtype=torch.float64)
        results = []
        for scan in (
            lambda: sequential_scan(a, u, h0),
            lambda: blocked_scan(a, u, h0, 8),
            lambda: blocked_scan(a, u, h0, 4, levels=5),
        ):
            h = scan()
            grads = torch.autograd.grad((h * weights).sum(), (a, u, h0))
            results.append((h, grads))
        ref_h, ref_g = results[0]
        for h, grads in results[1:]:
            assert relative_error(h, ref_h) <= 1e-4
            for g, rg in zip(grads, ref_g):
                assert relative_error(g, rg) <= 1e-4


@pytest.mark.skipif(not fused_available(torch.device("cpu")), reason="no C++ compiler for the fused scan")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_scan_equals_sequential_reference_in_values_and_gradients(dtype):
    torch.manual_seed(0)
    Bt, L, M, D, N = 2, 300, 3, 5, 4
    x = torch.randn(Bt, L, M, D, dtype=dtype, requires_grad=True)
    dt = (torch.rand(Bt, L, M, D, dtype=dtype) * 0.3).requires_grad_()
    A = (-torch.rand(M, D, N, dtype=dtype) * 5 - 0.5).requires_grad_()
    B = torch.randn(Bt, L, M, N, dtype=dtype, requires_grad=True)
    C = torch.randn(Bt, L, M, N, dtype=dtype, requires_grad=True)
    h0 = torch.randn(Bt, M, D, N, dtype=dtype, requires_grad=True)
    wy, wh = torch.randn(Bt, L, M, D, dtype=dtype), torch.randn(Bt, M, D, N, dtype=dtype)
    inputs = (x, dt, A, B, C, h0)

    y, h = selective_scan_fused(*inputs)
    grads = torch.autograd.grad((y * wy).sum() + (h * wh).sum(), inputs)
    ry, rh = selective_scan_tensor_ops(x, dt, A, B.unsqueeze(3), C.unsqueeze(3), h0, reference=True)
    ref_grads = torch.autograd.grad((ry * wy).sum() + (rh * wh).sum(), inputs)
    assert relative_error(y, ry) <= 1e-4 and relative_error(h, rh) <= 1e-4
    for g, rg in zip(grads, ref_grads):
        assert relative_error(g, rg) <= 1e-4


def test_scale_dependent_init_gives_stable_ordered_eigenvalues():
    cfg = ModelConfig(d_state=8, n_scales=3)
    A = initial_a(cfg)  # [S+2, D, N]
    assert (A < 0).all()
    for dt in (0.001, 0.2, 1.0):
        abar = torch.exp(dt * A)
        for s in range(cfg.n_ssm - 1):
            # scale s+1 is coarser than s: all its eigenvalues lie nearer 1
            assert abar[s + 1].min() > abar[s].max()
    # mamba ablation: -(n+1) for every SSM
    assert torch.equal(initial_a(ModelConfig(d_state=4, a_init="mamba"))[2, 0], -torch.arange(1.0, 5.0))
    # and the model really starts from these values
    model = MSSSMClassifier(cfg)
    assert torch.allclose(-torch.exp(model.blocks[0].msssm.ssms.A_log), A)


@pytest.mark.parametrize("mixer", ["input", "static", "softmax"])
def test_mixer_variants_train(mixer):
    model = small_model(mixer=mixer).train()
    x = torch.randn(2, 50, 12)
    loss = model(x)[:, -1].sum()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_mean_mixing_distance_on_known_maps_and_a_model():
    x = torch.randn(50, 3)
    assert mean_mixing_distance(lambda v: v, x) == pytest.approx(0.0)
    shift3 = lambda v: torch.nn.functional.pad(v, (0, 0, 3, 0))[:, :-3]  # y_t = x_{t-3}
    assert mean_mixing_distance(shift3, x) == pytest.approx(3.0)
    avg = lambda v: torch.cumsum(v, 1) / torch.arange(1, v.shape[1] + 1)[None, :, None]  # uniform over the prefix
    assert mean_mixing_distance(avg, x) == pytest.approx(49 / 2)
    d = model_mean_mixing_distance(small_model(), torch.randn(200, 12))
    assert 0 < d < 200


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine)")
@pytest.mark.parametrize("ssm", ["s6", "s4"])
def test_cuda_model_equals_cpu_reference_in_values_gradients_and_streaming(ssm):
    """The CUDA path (blocked scan on the GPU, float32 without autocast) against the CPU sequential reference."""
    model = small_model(ssm=ssm).train()
    x = torch.randn(3, 600, 12)
    model.zero_grad()
    model(x, scan="sequential")[:, -1].logsumexp(-1).sum().backward()
    cpu_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    cpu_logits = model(x, scan="sequential").detach()

    gpu = small_model(ssm=ssm).train().cuda()
    gpu.load_state_dict(model.state_dict())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    xg = x.cuda()
    gpu.zero_grad()
    gpu(xg)[:, -1].logsumexp(-1).sum().backward()  # scan="auto" -> blocked on CUDA
    assert (gpu(xg).detach().cpu() - cpu_logits).abs().max() <= 1e-4
    for name, p in gpu.named_parameters():
        ref = cpu_grads[name]
        assert (p.grad.cpu() - ref).abs().max() <= 1e-3 * (1 + ref.abs().max()), name

    gpu.eval()
    with torch.no_grad():
        expected = gpu.probabilities(gpu(xg))
        state, pieces, start = gpu.zero_state(3), [], 0
        for size in random_chunks(600, np.random.default_rng(2)):
            probs, state = gpu.advance(xg[:, start : start + size], state)
            pieces.append(probs)
            start += size
    assert (torch.cat(pieces, dim=1) - expected).abs().max().item() <= 1e-5


def test_a_lead_subset_model_streams_with_missing_leads_exactly_and_ignores_what_is_missing():
    model = small_model(lead_mask=True)
    rng = np.random.default_rng(3)
    x = torch.randn(3, 400, 12)
    x[0, :, 2:] = float("nan")  # leads I + II
    x[1, :, [i for i in range(12) if i != 1]] = float("nan")  # lead II
    with torch.no_grad():
        whole = model.probabilities(model(x))
        state, parts, start = model.zero_state(3), [], 0
        for n in random_chunks(400, rng):
            p, state = model.advance(x[:, start : start + n], state)
            parts.append(p)
            start += n
        assert torch.isfinite(whole).all()
        torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-6, rtol=0)
        # a missing lead is absent, not a value: the presence flag, not a zero signal
        zero_filled = torch.nan_to_num(x, nan=0.0)
        assert not torch.allclose(model.probabilities(model(zero_filled))[:2], whole[:2])


@pytest.mark.parametrize("lead_mask", [False, True])
def test_a_template_model_sees_each_samples_deviation_at_its_position_in_any_chunking(lead_mask):
    length = 120
    model = small_model(template_length=length, n_channels=2, lead_mask=lead_mask)
    model.template.normal_()
    model.template_std.uniform_(0.5, 2.0)
    x = torch.randn(3, 300, 2)  # longer than the template: positions past it use its last sample
    if lead_mask:
        x[1, :, 1] = float("nan")
    rng = np.random.default_rng(4)
    with torch.no_grad():
        whole = model.probabilities(model(x))
        state, parts, start = model.zero_state(3), [], 0
        for n in random_chunks(300, rng, sizes=(1, 5, 37, 119, 2)):
            p, state = model.advance(x[:, start : start + n], state)
            parts.append(p)
            start += n
        torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-6, rtol=0)
        # the embedding's input, computed here from the definition: [z, (x - template[min(t, L-1)]) / std, (flags)]
        positions = torch.arange(300, dtype=torch.float32)[None, :, None].expand(3, -1, -1)
        feats = model.input_features(x, positions)
        index = torch.arange(300).clamp(max=length - 1)
        deviation = (x - model.template[index]) / model.template_std
        z = (x - model.input_mean) / model.input_std
        if lead_mask:
            present = ~torch.isnan(x)
            expected = torch.cat([z.nan_to_num(0.0), deviation.nan_to_num(0.0), present.float()], -1)
        else:
            expected = torch.cat([z, deviation], -1)
        torch.testing.assert_close(feats, expected)
        # the template matters: another mean series, other probabilities
        model.template.add_(1.0)
        assert not torch.allclose(model.probabilities(model(x)), whole)


def test_training_lead_masks_draw_device_subsets_and_keep_every_record_usable():
    from msssm_serve.training.augment import keep_leads, mask_leads

    leads = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    xb = np.ones((2000, 5, 12), np.float32)
    masked = mask_leads(xb.copy(), np.random.default_rng(0), leads)
    present = ~np.isnan(masked[:, 0])
    kept = present.sum(1)
    assert kept.min() >= 1 and (kept == 12).mean() > 0.15  # every record keeps a lead; ~20 % keep all 12
    only_ii = (present == np.eye(12, dtype=bool)[1]).all(1).mean()
    assert 0.02 < only_ii < 0.1  # lead II alone is one of the device subsets (40 % / 11), plus random draws
    assert np.isnan(keep_leads(xb, leads, ["II"])[..., 0]).all() and not np.isnan(keep_leads(xb, leads, ["II"])[..., 1]).any()


def test_std_pooling_reads_the_spread_of_the_features_and_a_widened_model_starts_as_it_was():
    model = small_model(seed=3)
    x = torch.randn(2, 400, 12)
    wider = with_std_pooling(model).eval()
    assert wider.cfg.pool == "mean_std" and len(wider.zero_state(1)) == len(model.zero_state(1)) + 1
    with torch.no_grad():
        assert (wider.probabilities(wider(x)) - model.probabilities(model(x))).abs().max() <= 1e-6
        # the point the spread is computed about changes rounding only
        wider.head.weight.normal_()
        before = wider(x)
        wider.pool_center.normal_()
        assert (wider(x) - before).abs().max() <= 1e-4
        # The head's second half reads the causal standard deviation of the features the first half averages.
        wider.head.weight.zero_()
        wider.head.bias.zero_()
        wider.head.weight[0, wider.cfg.d_model] = 1.0  # class 0's logit = the spread of feature 0
        feats = wider.norm_f(_last_block_features(wider, x))
        logits = wider(x)
    spread = torch.stack([feats[:, : t + 1, 0].std(dim=1, unbiased=False) for t in range(400)], dim=1)
    assert (logits[..., 0] - torch.sqrt(spread**2 + POOL_STD_EPS)).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="already"):
        with_std_pooling(wider)


def test_extrema_pooling_reads_the_running_max_and_min_after_the_warm_up_and_widens_as_it_was():
    model = with_std_pooling(small_model(seed=4)).eval()
    with torch.no_grad():
        model.head.weight.normal_()
        model.pool_center.normal_()
    x = torch.randn(2, 400, 12)
    wider = with_pool(model, "mean_std_extrema").eval()
    assert wider.cfg.pool_statistics == ("mean", "std", "max", "min") and wider.cfg.pooled_features == 4 * 16
    assert [name for name, _ in wider.state_spec()][-2:] == ["pool_extrema", "pool_count"]
    with torch.no_grad():
        # the new statistics' head columns start at zero: the same function
        assert (wider(x) - model(x)).abs().max() <= 1e-6
        pooled = wider.pooled(x, wider.zero_state(2))[0]
        feats = wider.norm_f(_last_block_features(wider, x))
    d, first = 16, wider.cfg.extrema_from
    mean = torch.cumsum(feats, 1) / torch.arange(1, 401).view(1, -1, 1)
    expect_max = torch.cat([mean[:, :first], torch.cummax(feats[:, first:], 1).values], 1)
    expect_min = torch.cat([mean[:, :first], torch.cummin(feats[:, first:], 1).values], 1)
    assert (pooled[..., 2 * d : 3 * d] - expect_max).abs().max() <= 1e-5
    assert (pooled[..., 3 * d :] - expect_min).abs().max() <= 1e-5
    # where the extremes start is set when they are added (fit_head: a tenth of the window), kept afterwards
    assert with_pool(model, "mean_std_extrema", extrema_from=37).cfg.extrema_from == 37
    assert with_pool(wider, "mean_std_extrema", extrema_from=37).cfg.extrema_from == first
    # a narrower pooling would drop head columns
    with pytest.raises(ValueError, match="drop"):
        with_pool(wider, "mean_std")


def test_causal_max_is_the_running_maximum_at_any_length():
    rng = torch.Generator().manual_seed(0)
    for length in (1, 2, 3, 17, 64, 1000):
        x = torch.randn(3, length, 5, generator=rng)
        assert torch.equal(causal_max(x, 32768), torch.cummax(x, 1).values)


def _last_block_features(model, x):
    """The residual stream after the last block, from the zero state (what the pooling reads, before norm_f)."""
    counts = torch.cumsum(torch.ones_like(x[..., :1]), dim=1)
    h = model.embed(model.input_features(x, counts - 1))
    for block, (conv_history, ssm_h) in zip(model.blocks, model.layer_states(model.zero_state(x.shape[0]))):
        h, *_ = block(h, conv_history, ssm_h, "auto")
    return h


def test_an_ensemble_streams_the_mean_of_its_members_in_any_chunking():
    members = [small_model(seed, template_length=300) for seed in range(3)]
    ensemble = EnsembleClassifier(members).eval()
    assert [name for name, _ in ensemble.state_spec()][:2] == ["m0_conv_0_1", "m0_conv_0_2"]
    assert len(ensemble.state_spec()) == 3 * len(members[0].state_spec())
    x = torch.randn(2, 700, 12)
    rng = np.random.default_rng(3)
    with torch.no_grad():
        alone = [m.advance(x, m.zero_state(2), scale_weights=True) for m in members]
        state, pieces, weights, start = ensemble.zero_state(2), [], [], 0
        for size in random_chunks(700, rng):
            probs, state, w = ensemble.advance(x[:, start : start + size], state, scale_weights=True)
            pieces.append(probs)
            weights.append(w)
            start += size
    torch.testing.assert_close(torch.cat(pieces, 1), torch.stack([p for p, _, _ in alone]).mean(0), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(torch.cat(weights, 1), torch.stack([w for _, _, w in alone]).mean(0), atol=1e-5,
                               rtol=1e-5)
    # the carried state is each member's own, one after another
    flat = [t for _, s, _ in alone for t in s]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(state, flat))
    with pytest.raises(ValueError, match="one architecture"):
        EnsembleClassifier([small_model(0), small_model(1, d_model=8)])
    with pytest.raises(ValueError, match="ensemble"):
        with_pool(ensemble, "mean_std")
