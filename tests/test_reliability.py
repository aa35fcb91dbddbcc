"""Reliability: bad inputs get a clear error, nothing non-finite leaks, the numerics hold at the edges.

One section per item of the reliability issue (numbers in the test names): padding is selected
out, never multiplied by 0 (1); a non-finite or overflowing token never reaches the past and
finite inputs give finite means (2); the decimal point near a power of ten (3); chunked = whole in
bfloat16 (4); float64 accumulation (5); edge-case inputs (6); then the recipes and the CLI as a
new user meets them (7-12). The randomised versions of these properties are ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import op_inputs
from vkt_hf.ops import functional as vkt
from vkt_hf.ops import fused, naive

BACKENDS = {"reference": vkt, "fused": fused, "naive": naive}


def both_contexts(impl, stream, weights, mask, null, log_decay, window=3, causal=True, state=(None, None)):
    """``K``, its state, ``T`` and its state of one backend."""
    k, k_state = impl.global_context(stream, weights, mask, null, log_decay, causal, state[0])
    t, t_state = impl.local_context(stream, mask, null, window, causal, state[1])
    return k, k_state, t, t_state


# --------------------------------------------------------------------------- 1. padding is not context


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_1_non_finite_padding_does_not_leak_into_the_contexts(backend, decay, poison):
    stream, weights, mask, null, log_decay, _, _ = op_inputs(2, 2, 12, 3, decay, True, 3, dtype=torch.float64)
    clean = both_contexts(BACKENDS[backend], stream, weights, mask, null, log_decay)
    dirty_stream, dirty_weights = stream.clone(), weights.clone()
    padded = mask == 0  # (B, N)
    dirty_stream[padded[:, None].expand(-1, 2, -1)] = poison
    dirty_weights[padded[:, None].expand(-1, 2, -1)] = poison if poison == poison else 1.0
    dirty = both_contexts(BACKENDS[backend], dirty_stream, dirty_weights, mask, null, log_decay)
    real = ~padded
    for name, c, d in [("K", clean[0], dirty[0]), ("T", clean[2], dirty[2])]:
        assert torch.isfinite(d.transpose(1, 2)[real]).all(), name
        torch.testing.assert_close(d.transpose(1, 2)[real], c.transpose(1, 2)[real], msg=name)
    torch.testing.assert_close(dirty[1], clean[1])  # the global state (the window state keeps the raw rows)


def test_1_non_finite_padding_in_the_carried_window_does_not_leak():
    stream, weights, mask, null, _, _, (history, history_mask) = op_inputs(1, 2, 6, 3, False, False, 4)
    history = history.clone()
    history[:, :, history_mask[0] == 0] = float("nan")  # padded slots of the carried window
    assert (history_mask == 0).any()
    for impl in (vkt, fused):
        t, _ = impl.local_context(stream, mask, null, 4, True, (history, history_mask))
        assert torch.isfinite(t).all()


def test_1_non_finite_padding_does_not_leak_through_the_window_and_sink():
    torch.manual_seed(0)
    b, h, n, d = 1, 2, 10, 4
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[:, :3] = False
    rank = vkt.rank_of_real_tokens(mask)
    empty = (torch.zeros(b, h, 2, d), torch.zeros(b, h, 2, d), torch.zeros(b, 2, dtype=torch.bool))

    def run(k, v):
        sink = vkt.fill_sink(k, v, mask, rank, empty)
        return vkt.sliding_window_attention(
            q, k, v, mask & (rank >= 2), 3, None, sink, rank[:, :, None] >= torch.arange(2)
        )[0]

    clean = run(k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :3], v2[:, :, :3] = float("nan"), float("inf")
    dirty = run(k2, v2)
    torch.testing.assert_close(dirty[:, :, 3:], clean[:, :, 3:])


# ------------------------------------------------------------- 2. nothing reaches the past, no overflow


@pytest.mark.parametrize("poison", [float("inf"), float("nan"), 3e38])
def test_2_a_non_finite_future_value_does_not_reach_the_past_in_decayed_cumsum(poison):
    torch.manual_seed(0)
    x = torch.randn(1, 2, 150, 3)
    log_decay = -torch.rand(1, 2, 150)
    initial = torch.randn(1, 2, 3)
    clean = vkt.decayed_cumsum(x[:, :, :100], log_decay[:, :, :100], initial, chunk_size=8)
    x[:, :, 100] = poison
    x[:, :, 101] = poison  # 3e38 + 3e38 overflows: a sum that is no longer finite
    dirty = vkt.decayed_cumsum(x, log_decay, initial, chunk_size=8)
    torch.testing.assert_close(dirty[:, :, :100], clean)
    assert not torch.isfinite(dirty[:, :, 101]).any()


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_2_a_non_finite_future_token_does_not_reach_the_past(backend, poison):
    stream, weights, mask, null, log_decay, _, _ = op_inputs(1, 2, 20, 3, True, False, 3, dtype=torch.float64)
    clean = both_contexts(BACKENDS[backend], stream[:, :, :12], weights[:, :, :12], mask[:, :12], null, log_decay)
    stream, weights = stream.clone(), weights.clone()
    stream[:, :, 12], weights[:, :, 15] = poison, poison
    dirty = both_contexts(BACKENDS[backend], stream, weights, mask, null, log_decay)
    torch.testing.assert_close(dirty[0][:, :, :12], clean[0])
    torch.testing.assert_close(dirty[2][:, :, :12], clean[2])
    assert not torch.isfinite(dirty[0][:, :, 13:]).any()  # what follows it is garbage, and says so


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_2_huge_finite_inputs_give_finite_contexts(backend, dtype):
    """1e30 vectors with 1e30 weights: w R = 1e60 overflows float32, the means must not."""
    impl = BACKENDS[backend]
    stream, weights, mask, null, log_decay, _, _ = op_inputs(2, 2, 40, 3, True, False, 3)
    stream, weights = (stream * 1e30).to(dtype), weights * 1e30
    k, (mean, total), t, _ = both_contexts(impl, stream, weights, mask, null, log_decay)
    assert torch.isfinite(k).all() and torch.isfinite(t).all()
    assert torch.isfinite(mean).all() and torch.isfinite(total).all()
    # the mean of 1e30-sized vectors is 1e30-sized, and equals the float64 mean
    want = vkt.global_context(stream.double(), weights.double(), mask, null.double(), log_decay.double())[0]
    torch.testing.assert_close(k.double(), want, rtol=1e-4, atol=1e26)
    # carried on in chunks: the state stays finite too
    state = None
    for start in range(0, 40, 7):
        end = min(start + 7, 40)
        part, state = impl.global_context(stream[:, :, start:end], weights[:, :, start:end], mask[:, start:end], null,
                                          log_decay, True, state)  # fmt: skip
        torch.testing.assert_close(part.double(), want[:, :, start:end], rtol=1e-4, atol=1e26)


def test_2_huge_contexts_give_a_finite_scalar_attention():
    gen = torch.Generator().manual_seed(0)
    k, t = torch.randn(1, 2, 9, 4, generator=gen) * 1e30, torch.randn(1, 2, 9, 4, generator=gen) * 1e30
    scores = torch.randn(1, 2, 9, generator=gen) * 1e30
    for normalization in ("decimal", "softsign", "sigmoid", "tanh", "none"):
        a = vkt.scalar_attention(scores, k, t, 1e-3, normalization)
        assert torch.isfinite(a).all(), normalization


def test_2_weights_that_underflow_give_the_starting_mean():
    """Every weight 0 (softplus of a very negative score) and a strong decay: the total underflows."""
    stream = torch.randn(1, 1, 400, 2)
    weights = torch.zeros(1, 1, 400)
    null = torch.randn(1, 2)
    k, (mean, total) = vkt.global_context(stream, weights, torch.ones(1, 400), null, torch.tensor([-0.7]))
    assert torch.isfinite(k).all() and torch.isfinite(mean).all()
    torch.testing.assert_close(k[0, 0, -1], null[0])


# --------------------------------------------------------------------- 3. the decimal point, near 10^k


def test_3_decimal_normalize_just_below_a_power_of_ten():
    below_1000 = torch.tensor([999.99994], dtype=torch.float32)
    assert vkt.decimal_normalize(below_1000).item() == pytest.approx(0.99999994, abs=1e-8)
    below_100 = torch.tensor(
        [torch.nextafter(torch.tensor(100.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)).item()],
        dtype=torch.float64,
    )
    assert 0.99 < vkt.decimal_normalize(below_100).item() < 1.0
    for dtype, top in ((torch.float32, 30), (torch.float64, 22)):  # 10^k is exact in float64 up to 10^22
        powers = torch.tensor([10.0**k for k in range(-3, top)], dtype=dtype)
        around = torch.cat(
            [torch.nextafter(powers, torch.zeros_like(powers)), powers, torch.nextafter(powers, powers * 2)]
        )
        out = vkt.decimal_normalize(around).abs()
        big = around >= 1
        assert (out < 1).all() and (out[big] >= 0.1).all(), dtype
        expected = torch.stack([naive.normalize(v, "decimal") for v in around.double()])
        torch.testing.assert_close(out.double(), expected.abs(), rtol=1e-6, atol=0)
