"""The pure math of vkt_hf.ops.functional against direct loops."""

from __future__ import annotations

import pytest
import torch

from vkt_hf.ops import functional as vkt


def test_decimal_normalization_examples():
    a = torch.tensor([347.0, 9.99, 0.5, -42.0])
    torch.testing.assert_close(vkt.decimal_normalize(a), torch.tensor([0.347, 0.999, 0.5, -0.42]))


def test_decimal_normalization_bounds_and_gradient():
    a = torch.tensor([0.0, 1.0, 10.0, 1000.0, -1e6, 123456.0, 1e-9], requires_grad=True)
    out = vkt.decimal_normalize(a)
    assert out.abs().max() < 1
    assert torch.equal(out[:3].detach(), torch.tensor([0.0, 0.1, 0.1]))
    out.sum().backward()
    # the exponent is a constant: d/da (a / 10^k) = 10^-k
    torch.testing.assert_close(a.grad, torch.tensor([1.0, 0.1, 0.01, 1e-4, 1e-7, 1e-6, 1.0]))


@pytest.mark.parametrize("name", ["softsign", "sigmoid", "tanh", "none"])
def test_smooth_normalizations(name):
    a = torch.linspace(-5, 5, 11)
    expected = {"softsign": a / (1 + a.abs()), "sigmoid": torch.sigmoid(a), "tanh": torch.tanh(a), "none": a}[name]
    torch.testing.assert_close(vkt.normalize(a, name), expected)


def test_unknown_normalization():
    with pytest.raises(ValueError, match="normalization"):
        vkt.normalize(torch.zeros(1), "softmax")


def test_guard_keeps_sign_and_bound():
    den = torch.tensor([0.0, 1e-12, -1e-12, 3.0, -3.0])
    torch.testing.assert_close(vkt.guard(den, 1e-6), torch.tensor([1e-6, 1e-6, -1e-6, 3.0, -3.0]))


@pytest.mark.parametrize("chunk", [2, 4, 7, 64])
def test_decayed_cumsum_matches_recurrence(chunk):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 50, 4, dtype=torch.float64)
    log_decay = -torch.rand(2, 3, 50, dtype=torch.float64) * 3
    initial = torch.randn(2, 3, 4, dtype=torch.float64)
    state, expected = initial, []
    for t in range(50):
        state = log_decay[..., t, None].exp() * state + x[..., t, :]
        expected.append(state)
    got = vkt.decayed_cumsum(x, log_decay, initial, chunk_size=chunk)
    torch.testing.assert_close(got, torch.stack(expected, dim=-2))


def test_decayed_cumsum_strong_decay_long_input_is_finite():
    # gamma = 1e-4 over 5000 tokens: gamma^(-j) would overflow any float; the chunked form must not
    x = torch.ones(1, 1, 5000, 1)
    y = vkt.decayed_cumsum(x, torch.full((1, 1, 5000), -9.2), None, chunk_size=64)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[..., -1, 0], torch.tensor([[1.0001]]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("window", [1, 2, 5, 8])
def test_causal_window_sum_matches_loop(window):
    torch.manual_seed(0)
    x = torch.randn(2, 2, 23, 3, dtype=torch.float64)
    history = torch.randn(2, 2, window, 3, dtype=torch.float64)
    full = torch.cat([history, x], dim=-2)
    expected = torch.stack([full[..., i : i + window, :].sum(-2) for i in range(23)], dim=-2)
    torch.testing.assert_close(vkt.causal_window_sum(x, window, history), expected)


def test_local_mean_stays_accurate_at_one_million_tokens():
    """A float32 prefix-sum difference S[i] - S[i-n] loses the local mean at 1M tokens; ours must not."""
    torch.manual_seed(0)
    n_tokens, window = 1_000_000, 4
    x64 = 1000.0 + torch.randn(1, 1, n_tokens, 1, dtype=torch.float64)
    last = torch.arange(n_tokens - 1000, n_tokens)  # positions i checked: W_i = P[i] - P[i - n]

    def prefix_difference(x: torch.Tensor) -> torch.Tensor:
        prefix = torch.cat([torch.zeros_like(x[..., :1, :]), x.cumsum(-2)], dim=-2)  # P[k] = sum_{j<k} x_j
        return prefix[..., last, :] - prefix[..., last - window, :]

    exact = prefix_difference(x64)  # float64: exact enough
    got = vkt.causal_window_sum(x64.float(), window)[..., last, :].double()
    assert ((got - exact).abs() / exact.abs()).max() < 1e-6
    # the float32 prefix-sum difference the spec forbids fails the same bound by far
    naive = prefix_difference(x64.float()).double()
    assert ((naive - exact).abs() / exact.abs()).max() > 1e-3


def test_global_and_local_context_match_definitions_bidirectional():
    torch.manual_seed(0)
    b, h, n, d, window = 1, 2, 9, 3, 2
    stream = torch.randn(b, h, n, d, dtype=torch.float64)
    weights = torch.rand(b, h, n, dtype=torch.float64) + 0.1
    null = torch.randn(h, d, dtype=torch.float64)
    mask = torch.ones(b, n)
    gamma = torch.tensor([0.5, 0.9], dtype=torch.float64)
    k, _ = vkt.global_context(stream, weights, mask, null, gamma.log(), causal=False)
    t, _ = vkt.local_context(stream, mask, null, window, causal=False)
    for hh in range(h):
        for i in range(n):
            num = gamma[hh] ** (i + 1) * null[hh]
            den = gamma[hh] ** (i + 1)
            for j in range(n):
                if j != i:
                    f = gamma[hh] ** abs(i - j) * weights[0, hh, j]
                    num, den = num + f * stream[0, hh, j], den + f
            torch.testing.assert_close(k[0, hh, i], num / den)
            near = [j for j in range(max(0, i - window), min(n, i + window + 1)) if j != i]
            torch.testing.assert_close(t[0, hh, i], stream[0, hh, near].mean(0))


def test_decayed_cumsum_rejects_chunk_size_one():
    with pytest.raises(ValueError, match="chunk_size"):
        vkt.decayed_cumsum(torch.zeros(1, 1, 4, 1), torch.zeros(1, 1, 4), None, chunk_size=1)
