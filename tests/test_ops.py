"""The VKT math: unit checks of ``vkt_hf.ops.functional``, and every backend against the loops of ``vkt_hf.ops.naive``.

Backends: ``reference`` (:mod:`vkt_hf.ops.functional`), ``fused`` and ``triton`` (Triton's CPU
interpreter, in a subprocess, where the ``triton`` package is installed; on CUDA, see
``tests/test_ops_fast.py``). Forward and backward, on small float64 inputs, over causal and
bidirectional mixers, decay on/off, padding and carried states. The Triton kernels compute the
forward pass only, in float32; a call that needs a gradient runs on ``fused`` (the dispatch in
``vkt_hf.ops`` sends it there), whose backward is checked here.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import op_inputs
from vkt_hf.ops import functional as vkt
from vkt_hf.ops import fused, naive

ROOT = Path(__file__).resolve().parents[1]


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
    # the float32 prefix-sum difference fails the same bound by far
    naive = prefix_difference(x64.float()).double()
    assert ((naive - exact).abs() / exact.abs()).max() > 1e-3


def test_decayed_cumsum_rejects_chunk_size_one():
    with pytest.raises(ValueError, match="chunk_size"):
        vkt.decayed_cumsum(torch.zeros(1, 1, 4, 1), torch.zeros(1, 1, 4), None, chunk_size=1)


# ------------------------------------------------------------------------- every backend vs the loops

# (causal, decay, padded, carry); a carried state exists for causal mixers only
CASES = [c for c in itertools.product([True, False], repeat=4) if c[0] or not c[3]]
CASE_IDS = ["-".join(n for n, on in zip(("causal", "decay", "padded", "carry"), c) if on) or "plain" for c in CASES]
# (B, H, N, D, window)
SHAPES = [(1, 1, 1, 4, 1), (2, 2, 9, 3, 3)]
BACKENDS = {"reference": vkt, "fused": fused}


def contexts(impl, inputs, window: int, causal: bool, carry: bool) -> list[torch.Tensor]:
    """Every output of ``impl``'s two context sums: ``K``, its state, ``T``, its state."""
    stream, weights, mask, null, log_decay, global_state, local_state = inputs
    k, (k_sum, k_total) = impl.global_context(
        stream, weights, mask, null, log_decay, causal, global_state if carry else None
    )
    t, (t_vectors, t_mask) = impl.local_context(stream, mask, null, window, causal, local_state if carry else None)
    return [k, k_sum, k_total, t, t_vectors, t_mask]


def check_against_naive(impl, shape, case, dtype=torch.float64, tol=None) -> None:
    """Forward outputs of ``impl`` equal :mod:`vkt_hf.ops.naive` on the inputs of ``shape`` / ``case``."""
    causal, decay, padded, carry = case
    *dims, window = shape
    inputs = op_inputs(*dims, decay, padded, window, dtype=dtype)
    got = contexts(impl, inputs, window, causal, carry)
    want = contexts(naive, inputs, window, causal, carry)
    for name, g, w in zip(("K", "K sum", "K total", "T", "T vectors", "T mask"), got, want):
        torch.testing.assert_close(g.to(w.dtype), w, **(tol or {}), msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backend_forward_matches_naive(backend, case, shape):
    check_against_naive(BACKENDS[backend], shape, case)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backend_backward_matches_naive(backend, case):
    causal, decay, padded, carry = case
    batch, heads, length, dim, window = SHAPES[-1]
    base = op_inputs(batch, heads, length, dim, decay, padded, window, dtype=torch.float64, seed=3)
    probes = [torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i, shape in
              enumerate([(batch, heads, length, dim), (batch, heads, dim), (batch, heads), (batch, heads, length, dim)])]  # fmt: skip

    def grads(impl):
        stream, weights, mask, null, log_decay, (g_sum, g_total), (l_vectors, l_mask) = base
        leaves = [t.clone().requires_grad_() for t in (stream, weights, null, g_sum, g_total, l_vectors)]
        log_decay = None if log_decay is None else log_decay.clone().requires_grad_()
        stream, weights, null, g_sum, g_total, l_vectors = leaves
        inputs = (stream, weights, mask, null, log_decay, (g_sum, g_total), (l_vectors, l_mask))
        outputs = contexts(impl, inputs, window, causal, carry)[:4]  # the state vectors pass through as they are
        loss = sum((out.to(torch.float64) * probe).sum() for out, probe in zip(outputs, probes))
        leaves += [] if log_decay is None else [log_decay]
        return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)

    names = ["stream", "weights", "null", "state sum", "state total", "state window", "log_decay"]
    for name, got, want in zip(names, grads(BACKENDS[backend]), grads(naive)):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"d/d {name}: {m}")


@pytest.mark.parametrize("normalization", ["decimal", "softsign", "sigmoid", "tanh", "none"])
def test_scores_and_scalar_attention_match_naive(normalization):
    gen = torch.Generator().manual_seed(4)
    query, importance = torch.randn(2, 2, 7, 3, generator=gen), torch.randn(2, 3, generator=gen)
    k, t = torch.randn(2, 2, 7, 3, generator=gen), torch.randn(2, 2, 7, 3, generator=gen)
    k[0, 0, 0] = 0.0  # K . T = 0: the guard's floor

    def run(impl):
        leaves = [x.double().requires_grad_() for x in (query, importance, k, t)]
        scores = impl.importance_scores(leaves[0], leaves[1]) * 30  # ratios well above 1: decimal shifts
        a = impl.scalar_attention(scores, leaves[2], leaves[3], 1e-3, normalization)
        probe = torch.randn(a.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        return [a, *torch.autograd.grad((a * probe).sum(), leaves)]

    for got, want in zip(run(vkt), run(naive)):
        torch.testing.assert_close(got, want)


# the Triton kernels in Triton's interpreter: TRITON_INTERPRET must be set before triton is imported
_TRITON_CHECK = textwrap.dedent(
    """
    import os
    import torch
    from tests.helpers import TOL
    from tests.test_ops import CASES, check_against_naive
    from vkt_hf.ops import triton as tri
    assert tri.INTERPRET and tri.HAS_TRITON
    # one token; a few tokens and channels; more tokens than a chunk of the kernel (64) and
    # more channels than one channel block (64); three chunks. The global sum both ways: one program
    # per sequence, and sequence-parallel (chunk sums, a scan over them, chunk outputs).
    for parallel in ("0", "1"):
        os.environ["VKT_TRITON_SEQUENCE_PARALLEL"] = parallel
        for shape in [(1, 1, 1, 8, 1), (2, 2, 9, 5, 3), (1, 2, 70, 72, 5), (1, 1, 150, 8, 2)]:
            for case in CASES:
                check_against_naive(tri, shape, case, dtype=torch.float32, tol=TOL)
    print("triton-interpreter-ok")
    """
)


def test_triton_forward_matches_naive_in_interpreter():
    """The Triton kernels, run by Triton's CPU interpreter (installed by the dev extra)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _TRITON_CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert "triton-interpreter-ok" in result.stdout, result.stderr[-3000:]
