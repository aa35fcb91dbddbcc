"""Every fast path of the context sums equals the vectorised reference (``vkt_hf.ops.functional``) at scale.

``tests/test_ops.py`` checks every backend against the loops of ``vkt_hf.ops.naive`` on small
inputs; here the shapes are long enough to cross the fused path's blocks and chunks (and, on
CUDA, the Triton kernels' chunks), forward and backward, over windows, decay on/off, padding
masks and carried states. float32: ``atol = rtol = 1e-5``. bfloat16 inputs: the sums are still
accumulated in float32, so a fast path and the reference see the same bf16 inputs and agree to
float32 rounding (checked at ``1e-4``); against a float32 run of the same values the bf16
*inputs* themselves differ by up to 2^-8 relative, which is the bf16 tolerance users should
expect (``docs/performance.md``). Also: the backend dispatch of ``vkt_hf.ops``.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TOL, op_inputs, tiny_model
from vkt_hf import ops
from vkt_hf.ops import functional as ref
from vkt_hf.ops import fused
from vkt_hf.ops import triton as triton_ops

GRID = [
    # (B, H, N, D, window)
    (1, 1, 1, 8, 1),
    (2, 3, 7, 5, 3),
    (1, 2, 64, 16, 16),
    (2, 3, 333, 9, 17),
    (1, 2, 1100, 8, 4),  # more than two fused blocks, ragged last block and chunk
]


@pytest.mark.parametrize("shape", GRID, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("carry", [False, True], ids=["fresh", "carry"])
def test_fused_forward_matches_reference(shape, decay, padded, carry):
    batch, heads, length, dim, window = shape
    stream, weights, mask, null, ld, g_state, l_state = op_inputs(batch, heads, length, dim, decay, padded, window)
    g_state, l_state = (g_state, l_state) if carry else (None, None)
    want, want_state = ref.global_context(stream, weights, mask, null, ld, state=g_state)
    got, got_state = fused.global_context(stream, weights, mask, null, ld, state=g_state)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_state[0], want_state[0], **TOL)
    torch.testing.assert_close(got_state[1], want_state[1], **TOL)
    want, want_state = ref.local_context(stream, mask, null, window, state=l_state)
    got, got_state = fused.local_context(stream, mask, null, window, state=l_state)
    torch.testing.assert_close(got, want, **TOL)
    assert torch.equal(got_state[0], want_state[0]) and torch.equal(got_state[1], want_state[1])


@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_fused_backward_matches_reference(decay, padded):
    batch, heads, length, dim, window = 2, 3, 1100, 6, 5
    base = op_inputs(batch, heads, length, dim, decay, padded, window, seed=1)

    def grads(impl):
        stream, weights, mask, null, ld, g_state, l_state = (
            t.clone().requires_grad_(t.is_floating_point() and i not in (2,)) if isinstance(t, torch.Tensor) else t
            for i, t in enumerate(base)
        )
        leaves = [stream, weights, null] + ([ld] if ld is not None else [])
        k, (k_sum, k_tot) = impl.global_context(stream, weights, mask, null, ld, state=None)
        t, _ = impl.local_context(stream, mask, null, window, state=None)
        probe = torch.randn(k.shape, generator=torch.Generator().manual_seed(2))
        loss = (k * probe).sum() + (t * probe.flip(-2)).sum() + k_sum.sum() + k_tot.sum()
        return torch.autograd.grad(loss, leaves)

    for got, want in zip(grads(fused), grads(ref)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_fused_chunked_equals_whole():
    """Chunked = whole on the fast path: any split, carrying the state, gives the one-pass result."""
    stream, weights, mask, null, ld, _, _ = op_inputs(1, 2, 900, 8, True, False, 7)
    whole_k, _ = fused.global_context(stream, weights, mask, null, ld)
    whole_t, _ = fused.local_context(stream, mask, null, 7)
    g_state = l_state = None
    ks, ts = [], []
    for a, b in [(0, 1), (1, 300), (300, 301), (301, 900)]:
        k, g_state = fused.global_context(stream[:, :, a:b], weights[:, :, a:b], mask[:, a:b], null, ld, state=g_state)
        t, l_state = fused.local_context(stream[:, :, a:b], mask[:, a:b], null, 7, state=l_state)
        ks.append(k)
        ts.append(t)
    torch.testing.assert_close(torch.cat(ks, -2), whole_k, **TOL)
    torch.testing.assert_close(torch.cat(ts, -2), whole_t, **TOL)


def test_bf16_inputs_accumulate_in_float32():
    stream, weights, mask, null, ld, _, _ = op_inputs(1, 2, 700, 16, True, False, 16, dtype=torch.bfloat16)
    want, _ = ref.global_context(stream, weights, mask, null, ld)
    got, _ = fused.global_context(stream, weights, mask, null, ld)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    want, _ = ref.local_context(stream, mask, null, 16)
    got, _ = fused.local_context(stream, mask, null, 16)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_dispatch(monkeypatch):
    long = torch.zeros(1, 1, ops.FUSED_MIN_TOKENS, 4)
    assert ops.resolve_backend(long) == "fused"
    assert ops.resolve_backend(long[:, :, :1]) == "reference"
    assert ops.resolve_backend(long.clone().requires_grad_()) == "autograd"  # training: hand-written backward
    assert ops.resolve_backend(long, "reference") == "reference"
    monkeypatch.setenv("VKT_BACKEND", "reference")
    assert ops.resolve_backend(long) == "reference"
    assert ops.resolve_backend(long, "fused") == "fused"
    with pytest.raises(ValueError):
        ops.resolve_backend(long, "nope")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            ops.resolve_backend(long, "triton")


def test_layer_backends_agree():
    """The whole layer gives the same output with every CPU backend."""
    model = tiny_model("default", mixer_chunk_size=50)
    ids = torch.randint(0, 97, (2, 130))
    outs = {}
    for backend in ("reference", "fused"):
        model.config.vkt_backend = backend
        for layer in model.modules():
            if hasattr(layer, "config") and hasattr(layer, "local_window"):
                layer.config.vkt_backend = backend
        with torch.no_grad():
            outs[backend] = model(ids).logits
    torch.testing.assert_close(outs["fused"], outs["reference"], atol=1e-4, rtol=1e-4)


def test_triton_kernels_refuse_gradients():
    """Called directly, the forward-only kernels never return a result autograd cannot differentiate."""
    stream, weights, mask, null, ld, _, _ = op_inputs(1, 2, 5, 4, True, False, 2)
    null.requires_grad_()
    with pytest.raises(RuntimeError, match="forward pass only"):
        triton_ops.global_context(stream, weights, mask, null, ld)
    with pytest.raises(RuntimeError, match="forward pass only"):
        triton_ops.local_context(stream, mask, null, 2)
    with torch.no_grad():  # no gradient needed: runs (on the kernels, or on fused where they cannot run)
        got, _ = triton_ops.global_context(stream, weights, mask, null, ld)
    torch.testing.assert_close(got, ref.global_context(stream, weights, mask, null.detach(), ld)[0], **TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", GRID + [(1, 9, 5000, 128, 16)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("carry", [False, True], ids=["fresh", "carry"])
def test_triton_matches_reference_on_gpu(shape, decay, padded, carry):
    if not triton_ops.AVAILABLE:
        pytest.skip("triton not installed")
    batch, heads, length, dim, window = shape
    stream, weights, mask, null, ld, g_state, l_state = op_inputs(
        batch, heads, length, dim, decay, padded, window, device="cuda"
    )
    g_state, l_state = (g_state, l_state) if carry else (None, None)
    assert ops.resolve_backend(stream, "triton", grad=False) == "triton"
    assert ops.resolve_backend(stream, "triton", grad=True) == "fused"  # the kernels are forward only
    with torch.no_grad():
        want, want_state = ref.global_context(stream, weights, mask, null, ld, state=g_state)
        got, got_state = triton_ops.global_context(stream, weights, mask, null, ld, state=g_state)
        torch.testing.assert_close(got, want, **TOL)
        # the carried state is a raw sum of N signed terms: both sides round it differently, so
        # the bound is relative to the sum of |terms| (on an H200, N=5000: 2.7e-4 absolute)
        scale = (stream.float().abs() * weights[..., None]).sum(-2).max().item() + 1.0
        torch.testing.assert_close(got_state[0], want_state[0], atol=1e-5 * scale, rtol=1e-5)
        torch.testing.assert_close(got_state[1], want_state[1], atol=1e-5 * scale, rtol=1e-5)
        want, _ = ref.local_context(stream, mask, null, window, state=l_state)
        got, _ = triton_ops.local_context(stream, mask, null, window, state=l_state)
        torch.testing.assert_close(got, want, **TOL)
        got_fused, _ = fused.global_context(stream, weights, mask, null, ld, state=g_state)
        torch.testing.assert_close(
            got_fused, ref.global_context(stream, weights, mask, null, ld, state=g_state)[0], **TOL
        )


def test_auto_backend_trains_when_only_new_parameters_need_gradients():
    """Distillation: the stream comes from frozen projections, only null/readout/decay train."""
    torch.manual_seed(0)
    stream = torch.randn(1, 2, 100, 6)  # no grad
    weights = torch.rand(1, 2, 100) + 0.1
    mask = torch.ones(1, 100)
    grads = []
    for backend in ("auto", "reference"):
        null = torch.zeros(2, 6, requires_grad=True)
        k, _ = ops.global_context(stream, weights, mask, null, None, backend=backend)
        t, _ = ops.local_context(stream, mask, null, 4, backend=backend)
        (k.sum() + t.sum()).backward()
        grads.append(null.grad)
    torch.testing.assert_close(grads[0], grads[1])
