"""The hand-written backward passes of :mod:`vkt_hf.ops.autograd` (the default when training).

Each :class:`torch.autograd.Function` is checked with ``gradcheck`` in float64 on small shapes
(padding, grouped-query heads, the sink, the read-out slot, states carried in), and against
autograd over the reference (:mod:`vkt_hf.ops.functional`), forward and backward; then the whole
layer: default (custom backward) = ``VKT_BACKEND=reference``, gradient checkpointing, bf16 autocast.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from tests.helpers import count_kernel_calls, op_inputs
from vkt_hf import ops
from vkt_hf.convert.common import resolve_vkt_options, vkt_layer_config
from vkt_hf.layers.vkt_attention import VKTAttention
from vkt_hf.ops import autograd as custom
from vkt_hf.ops import functional as ref

F64 = torch.float64


def rnd(*shape, seed=0, grad=True):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x.requires_grad_(grad)


# ----------------------------------------------------------------------------------------------
# the three Functions alone


@pytest.mark.parametrize("length", [1, 5, 19, 70])  # 70 tokens in chunks of 4: three levels of chunks
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("initial", [False, True], ids=["fresh", "carry"])
def test_decayed_scan_gradcheck(length, decay, initial):
    x = rnd(1, 1, length, 2)
    ld = (-torch.rand(1, 1, length, dtype=F64, generator=torch.Generator().manual_seed(1))).requires_grad_(decay)
    start = rnd(1, 1, 2, seed=2)
    inputs = (x, ld if decay else None, start if initial else None)
    torch.testing.assert_close(custom.decayed_scan(*inputs, 4), ref.decayed_cumsum(*inputs, 4), rtol=1e-12, atol=1e-12)
    leaves = [t for t in inputs if t is not None]

    def fn(*ts):
        it = iter(ts)
        return custom.decayed_scan(next(it), next(it) if decay else None, next(it) if initial else None, 4)

    assert torch.autograd.gradcheck(fn, leaves)


def _reference_mean(vectors, weights, ld, initial, fallback):
    """The causal decayed mean as the reference computes it (autograd over the chunked scan)."""
    x = torch.cat([vectors * weights.unsqueeze(-1), weights.unsqueeze(-1)], dim=-1)
    inclusive = ref.decayed_cumsum(x, ld, initial, 4)
    exclusive = torch.cat([initial.unsqueeze(-2), inclusive[..., :-1, :]], dim=-2)
    if ld is not None:
        exclusive = exclusive * ld.exp().unsqueeze(-1)
    return ref.weighted_mean(exclusive, fallback.unsqueeze(-2)), inclusive[..., -1, :]


@pytest.mark.parametrize("length", [1, 5, 70])  # 70 tokens in chunks of 4: three levels of chunks
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("underflow", [False, True], ids=["proper", "underflow"])
@pytest.mark.parametrize("kernel", [True, False], ids=["cpp", "torch"])
def test_decayed_mean_gradcheck(monkeypatch, length, decay, underflow, kernel):
    """Both implementations: the C++ sweep (``cpu_kernels.cpp``, built here) and the chunked PyTorch scan."""
    from vkt_hf.ops import cpu_kernels

    if kernel:
        assert cpu_kernels.kernel() is not None, "the CPU kernels must build here (a C++ compiler is installed)"
    else:
        monkeypatch.setenv("VKT_CPU_KERNELS", "0")
    vectors, weights = rnd(2, 1, length, 3), rnd(2, 1, length, seed=1, grad=False).abs().requires_grad_()
    ld = (-torch.rand(2, 1, length, dtype=F64, generator=torch.Generator().manual_seed(2))).requires_grad_(decay)
    initial = rnd(2, 1, 4, seed=3, grad=False).abs()
    if underflow:  # row 0 has no weight at all: every total is 0, the fallback is the mean
        with torch.no_grad():
            weights[0] = 0
            initial[0] = 0
    initial.requires_grad_()
    fallback = rnd(2, 1, 3, seed=4)
    inputs = (vectors, weights, ld if decay else None, initial, fallback)
    for got, want in zip(custom.decayed_mean(*inputs, 4), _reference_mean(*inputs)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    leaves = [t for t in inputs if t is not None]

    def fn(*ts):
        it = iter(ts)
        v, w, ld_ = next(it), next(it), next(it) if decay else None
        return custom.decayed_mean(v, w, ld_, next(it), next(it), 4)

    if not underflow:  # (at a total of exactly 0 the mean jumps to the fallback: no finite difference there)
        assert torch.autograd.gradcheck(fn, leaves)
    # against autograd of the reference: both outputs, and the mean alone (no gradient reaches the last state)
    mean_cotangent = rnd(*vectors.shape, seed=5, grad=False)
    for with_last in (True, False):
        losses = []
        for outputs in (fn(*leaves), _reference_mean(*inputs)):
            mean, last = outputs
            losses.append((mean * mean_cotangent).sum() + (last.square().sum() if with_last else 0))
        got = torch.autograd.grad(losses[0], leaves, allow_unused=True)
        want = torch.autograd.grad(losses[1], leaves, allow_unused=True)
        for leaf, a, b in zip(leaves, got, want):
            zeros = torch.zeros_like(leaf)
            torch.testing.assert_close(zeros if a is None else a, zeros if b is None else b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("length", "window"), [(1, 1), (7, 3), (12, 4), (20, 16), (9, 5)])
def test_window_sum_gradcheck(length, window):
    x, history = rnd(1, 2, length, 3), rnd(1, 2, window, 3, seed=1)
    torch.testing.assert_close(
        custom.window_sum(x, window, history), ref.causal_window_sum(x, window, history), rtol=1e-12, atol=1e-12
    )
    assert torch.autograd.gradcheck(lambda a, b: custom.window_sum(a, window, b), (x, history))


@pytest.mark.parametrize("carry", [False, True], ids=["fresh", "carry"])
def test_local_mean_gradcheck(carry):
    x, null = rnd(2, 2, 9, 2), rnd(2, 2, seed=1)
    real = torch.ones(2, 9, dtype=torch.bool)
    real[0, :4] = False  # left padding: the first tokens see no real token (null)
    history, history_real = (
        (rnd(2, 2, 3, 2, seed=2), torch.tensor([[True, False, True], [False] * 3])) if carry else (None, None)
    )
    mask = real.double()
    state = None if history is None else (history, history_real.double())
    want, _ = ref.local_context(x, mask, null, 3, state=state)
    torch.testing.assert_close(
        custom.local_mean(x, real, null, 3, history, history_real), want, rtol=1e-12, atol=1e-12
    )
    leaves = (x, null) if history is None else (x, null, history)
    assert torch.autograd.gradcheck(
        lambda *t: custom.local_mean(t[0], real, t[1], 3, *t[2:], *((history_real,) if carry else ())), leaves
    )


def test_bidirectional_context_sums_match_reference():
    base = op_inputs(2, 2, 40, 3, True, True, 4, seed=5, dtype=F64)

    def run(backend):
        stream, weights, mask, null, ld = (t.clone().requires_grad_(i != 2) for i, t in enumerate(base[:5]))
        k, _ = ops.global_context(stream, weights, mask, null, ld, causal=False, backend=backend)
        t, _ = ops.local_context(stream, mask, null, 4, causal=False, backend=backend)
        loss = (k * k.detach().flip(-2)).sum() + (t * t.detach().flip(-2)).sum()
        return (k, t), torch.autograd.grad(loss, [stream, weights, null, ld])

    (outs, grads), (want_outs, want_grads) = run("autograd"), run("reference")
    for got, want in zip((*outs, *grads), (*want_outs, *want_grads)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def window_inputs(batch=2, heads=4, kv_heads=2, length=11, dim=3, window=4, sinks=2, history=True, summary=True):
    """Random inputs of :func:`ref.sliding_window_attention` (float64, leaves require grad)."""
    q = rnd(batch, heads, length, dim)
    k, v = rnd(batch, kv_heads, length, dim, seed=1), rnd(batch, kv_heads, length, dim, seed=2)
    key_mask = torch.ones(batch, length, dtype=torch.bool)
    key_mask[0, : length // 3] = False  # left padding
    g = torch.Generator().manual_seed(3)
    past = None
    if history:
        past = (rnd(batch, kv_heads, window, dim, seed=4), rnd(batch, kv_heads, window, dim, seed=5))
        past = (*past, torch.rand(batch, window, generator=g) > 0.3)
    sink = visible = None
    if sinks:
        filled = torch.rand(batch, sinks, generator=g) > 0.3
        filled[:, 0] = True
        sink = (rnd(batch, kv_heads, sinks, dim, seed=6), rnd(batch, kv_heads, sinks, dim, seed=7), filled)
        visible = torch.rand(batch, length, sinks, generator=g) > 0.3
    slot = None
    if summary:
        logit = rnd(batch, heads, length, seed=8, grad=False)
        logit[..., :2] = float("-inf")  # hidden for the first tokens, as the layer does
        slot = (logit.requires_grad_(), rnd(batch, heads, length, dim, seed=9))
    return q, k, v, key_mask, window, past, sink, visible, slot


def window_leaves(q, k, v, key_mask, window, past, sink, visible, slot):
    return [q, k, v, *(past[:2] if past else ()), *(sink[:2] if sink else ()), *(slot or ())]


WINDOW_CASES = {
    "all": {},
    "no-sink": dict(sinks=0),
    "no-slot": dict(summary=False),
    "fresh": dict(history=False),
    "mha": dict(heads=2, kv_heads=2, sinks=1),
    "one-token": dict(length=1),
    "whole-blocks": dict(length=8),
    "window-1": dict(window=1, length=5),
}


def window_kernel_calls(monkeypatch, kernel: bool) -> list[str]:
    """Run the softmax window on its C++ kernels (``kernel``: they must build here) or on PyTorch; returns the
    list the kernels' calls are recorded in (``"forward"`` / ``"backward"``)."""
    if not kernel:
        monkeypatch.setenv("VKT_CPU_KERNELS", "0")
        return []
    return count_kernel_calls(
        monkeypatch, {"window_softmax_forward": "forward", "window_softmax_backward": "backward"}
    )


@pytest.mark.parametrize("kernel", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=list(WINDOW_CASES))
def test_window_softmax_matches_reference(monkeypatch, case, kernel):
    calls = window_kernel_calls(monkeypatch, kernel)
    inputs = window_inputs(**WINDOW_CASES[case])
    results = {}
    for flag in (False, True):
        out, history = ref.sliding_window_attention(*inputs[:8], None, inputs[8], custom_backward=flag)
        probe = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(10))
        grads = torch.autograd.grad((out * probe).sum(), window_leaves(*inputs))
        results[flag] = (out, history, grads)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-12, atol=1e-12)
    for got, want in zip(results[True][1], results[False][1]):
        assert torch.equal(got, want)
    for got, want in zip(results[True][2], results[False][2]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert calls == (["forward", "backward"] if kernel else [])


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_window_kernel_at_model_size(monkeypatch, dtype):
    """Head size and window as in the converted models (64, 64; and 40 in float64): the kernels' register tiles run
    (the small cases above take only their remainder loops). The C++ kernels against the PyTorch Function."""
    window = 64 if dtype == torch.float32 else 40
    q, k, v, key_mask, _, past, sink, visible, slot = window_inputs(
        batch=2, heads=6, kv_heads=2, length=150, dim=64, window=window, sinks=1
    )
    floats = [t.detach().to(dtype) for t in (q, k, v, *past[:2], *sink[:2], *slot)]
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    results = []
    for kernel in (True, False):
        with monkeypatch.context() as patch:
            calls = window_kernel_calls(patch, kernel)
            leaves = [t.clone().requires_grad_() for t in floats]
            q_, k_, v_, pk, pv, sk, sv, logit, value = leaves
            out, _ = ref.sliding_window_attention(
                q_,
                k_,
                v_,
                key_mask,
                window,
                (pk, pv, past[2]),
                (sk, sv, sink[2]),
                visible,
                None,
                (logit, value),
                custom_backward=True,
            )
            probe = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(10))
            results.append((out, torch.autograd.grad((out * probe).sum(), leaves)))
            assert calls == (["forward", "backward"] if kernel else [])
    (out, grads), (want, want_grads) = results
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_window_kernel_non_finite_input_follows_the_reference(monkeypatch):
    """NaN and inf keys, values, a query and a slot logit: the kernel gives the reference's NaN pattern (a NaN logit
    makes its row NaN; a non-finite value reaches only the queries that weigh it) and its numbers elsewhere, and
    -- bit for bit -- the earlier rows of a clean input (what a row computes never depends on another row)."""
    calls = window_kernel_calls(monkeypatch, True)
    q, k, v, key_mask, window, past, sink, visible, slot = window_inputs(length=9)
    args = (key_mask, window, past, sink, visible, None)
    with torch.no_grad():
        clean, _ = ref.sliding_window_attention(q, k, v, *args, slot, custom_backward=True)
        v[0, 0, 7] = float("inf")
        k[1, 1, 8, 0] = float("nan")
        q[0, 3, 6, 1] = float("inf")
        logit = slot[0].clone()
        logit[1, 0, 5] = float("nan")
        got, _ = ref.sliding_window_attention(q, k, v, *args, (logit, slot[1]), custom_backward=True)
        want, _ = ref.sliding_window_attention(q, k, v, *args, (logit, slot[1]))
    assert calls == ["forward", "forward"]
    assert torch.isnan(got).any() and torch.equal(torch.isnan(got), torch.isnan(want))
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-12, atol=1e-12)
    assert torch.equal(got[..., :5, :], clean[..., :5, :])  # every change is at token 5 or later


@pytest.mark.parametrize("kernel", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("case", ["all", "fresh", "no-slot"])
def test_window_softmax_gradcheck(monkeypatch, case, kernel):
    calls = window_kernel_calls(monkeypatch, kernel)
    options = {**WINDOW_CASES[case], "batch": 1, "heads": 2, "kv_heads": 1, "length": 6, "dim": 2, "window": 3}
    q, k, v, key_mask, window, past, sink, visible, slot = window_inputs(**options)
    leaves = window_leaves(q, k, v, key_mask, window, past, sink, visible, slot)

    def fn(*ts):
        it = iter(ts)
        q_, k_, v_ = next(it), next(it), next(it)
        past_ = None if past is None else (next(it), next(it), past[2])
        sink_ = None if sink is None else (next(it), next(it), sink[2])
        slot_ = None if slot is None else (next(it), next(it))
        args = (q_, k_, v_, key_mask, window, past_, sink_, visible, None, slot_)
        return ref.sliding_window_attention(*args, custom_backward=True)[0]

    assert torch.autograd.gradcheck(fn, leaves)
    assert ("backward" in calls) == kernel


# ----------------------------------------------------------------------------------------------
# the context sums through the dispatch


@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("carry", [False, True], ids=["fresh", "carry"])
def test_context_sums_match_reference_forward_and_backward(decay, padded, carry):
    base = op_inputs(2, 3, 150, 5, decay, padded, 6, seed=1, dtype=F64)

    def run(backend):
        stream, weights, mask, null, ld, g_state, l_state = (
            t.clone().requires_grad_(i != 2) if isinstance(t, torch.Tensor) else t for i, t in enumerate(base)
        )
        g_state = tuple(t.clone().requires_grad_() for t in g_state) if carry else None
        l_state = (l_state[0].clone().requires_grad_(), l_state[1]) if carry else None
        leaves = [stream, weights, null, *([ld] if ld is not None else []), *(g_state or ()), *(l_state or ())[:1]]
        k, (mean, total) = ops.global_context(stream, weights, mask, null, ld, state=g_state, backend=backend)
        t, _ = ops.local_context(stream, mask, null, 6, state=l_state, backend=backend)
        probe = torch.randn(k.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
        loss = (k * probe).sum() + (t * probe.flip(-2)).sum() + mean.sum() + total.sum()
        return (k, t, mean, total), torch.autograd.grad(loss, leaves)

    (outs, grads), (want_outs, want_grads) = run("autograd"), run("reference")
    for got, want in zip((*outs, *grads), (*want_outs, *want_grads)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_context_sums_gradcheck():
    stream, weights, mask, null, ld, g_state, l_state = op_inputs(1, 2, 9, 2, True, True, 3, seed=4, dtype=F64)
    mean, total = g_state

    def fn(stream, weights, null, ld, mean, total, history):
        k, state = ops.global_context(stream, weights, mask, null, ld, state=(mean, total), backend="autograd")
        t, _ = ops.local_context(stream, mask, null, 3, state=(history, l_state[1]), backend="autograd")
        return k, t, *state

    leaves = (stream, weights, null, ld, mean, total, l_state[0])
    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in leaves))


def test_dispatch_picks_the_custom_backward_for_training(monkeypatch):
    monkeypatch.delenv("VKT_BACKEND", raising=False)
    long = torch.zeros(1, 1, 100, 4)
    assert ops.resolve_backend(long.clone().requires_grad_()) == "autograd"
    assert ops.resolve_backend(long) == "fused"  # inference unchanged
    assert ops.resolve_backend(long.clone().requires_grad_(), "reference") == "reference"
    trained = long.clone().requires_grad_()
    assert ops.window_custom_backward(None, trained) and ops.window_custom_backward("fused", None, trained)
    assert not ops.window_custom_backward("reference", trained) and not ops.window_custom_backward(None, long)
    monkeypatch.setenv("VKT_BACKEND", "reference")
    assert ops.resolve_backend(long.clone().requires_grad_()) == "reference"
    assert not ops.window_custom_backward(None, trained) and ops.window_custom_backward("autograd", trained)


def test_inference_window_runs_the_cpu_kernel(monkeypatch):
    monkeypatch.delenv("VKT_BACKEND", raising=False)
    query = torch.zeros(1, 1, 4, 2)
    assert ops.window_cpu_kernel(None, query) and ops.window_cpu_kernel("fused", query.double())
    assert not ops.window_cpu_kernel("reference", query) and not ops.window_cpu_kernel(None, query.half())
    monkeypatch.setenv("VKT_CPU_KERNELS", "0")
    assert not ops.window_cpu_kernel(None, query)


# ----------------------------------------------------------------------------------------------
# the whole layer


def converted_layer(dtype=torch.float32, **overrides) -> VKTAttention:
    """A converted-style layer (local window, sink, read-out in the window) at a tiny size."""
    options = resolve_vkt_options("default", local_attention_window=8, local_window=3, mixer_chunk_size=40)
    options.pop("preset")
    options.update(overrides, accumulation_dtype="float64" if dtype == F64 else "float32")
    dims = dict(hidden_size=24, num_attention_heads=4, num_key_value_heads=2, head_dim=6, attention_bias=False)
    torch.manual_seed(0)
    layer = VKTAttention(vkt_layer_config(dims, options)).to(dtype)
    with torch.no_grad():  # switch on every term (a fresh converted layer starts with the read-out off)
        for param in layer.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return layer


def layer_grads(layer, hidden, mask=None):
    out, a = layer(hidden, attention_mask=mask)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    loss = (out * probe).sum() + a.sum()
    params = [p for p in layer.parameters() if p.requires_grad]
    return out, torch.autograd.grad(loss, [hidden, *params])


@pytest.mark.parametrize(
    "options",
    [{}, dict(local_attention=False, sink_tokens=0), dict(global_readout="add")],
    ids=["converted", "native", "readout-add"],
)
def test_layer_gradients_match_reference(monkeypatch, options):
    """Default (custom backward) = ``VKT_BACKEND=reference`` (autograd over the reference), float64,
    with left padding and more tokens than one mixer chunk (the state is carried)."""
    layer = converted_layer(F64, **options)
    hidden = rnd(2, 90, 24)
    mask = torch.ones(2, 90)
    mask[0, :13] = 0
    monkeypatch.delenv("VKT_BACKEND", raising=False)
    out, grads = layer_grads(layer, hidden, mask)
    monkeypatch.setenv("VKT_BACKEND", "reference")
    want_out, want_grads = layer_grads(layer, hidden, mask)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_layer_with_gradient_checkpointing():
    layer = converted_layer()
    hidden = torch.randn(1, 70, 24, requires_grad=True)
    out, grads = layer_grads(layer, hidden)

    class Checkpointed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, attention_mask=None):
            return checkpoint(self.inner, x, attention_mask, use_reentrant=False)

    got_out, got_grads = layer_grads(Checkpointed(layer), hidden)
    torch.testing.assert_close(got_out, out)
    for got, want in zip(got_grads, grads):
        torch.testing.assert_close(got, want)


def test_layer_under_bf16_autocast():
    """bf16 autocast: finite, and close to float32 in norm (the projections run in bf16 and the ratio
    ``s / (K . T)`` amplifies a bf16 ulp on a few ill-conditioned tokens, so not elementwise); the sums
    inside the Functions stay in float32."""
    layer = converted_layer()
    hidden = torch.randn(1, 70, 24, requires_grad=True)
    out, grads = layer_grads(layer, hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_out, low_grads = layer_grads(layer, hidden)
    for got, want in zip((low_out, *low_grads), (out, *grads)):
        assert torch.isfinite(got).all()
        assert (got.float() - want).norm() <= 0.1 * want.norm()
