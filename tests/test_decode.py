"""The one-token decoding step (``vkt_hf/layers/decode.py``): same outputs as the blocked path, state in place.

Every test checks that the step really ran (a decoding test that silently took the blocked path would
prove nothing), and compares with one forward without a cache, or with the blocked path itself.
"""

from __future__ import annotations

import pytest
import torch

import vkt_hf
from tests.helpers import count_kernel_calls
from tests.test_local_attention import native_config, tiny_llama
from vkt_hf.layers import decode


@pytest.fixture(autouse=True)
def no_grad():
    """Decoding runs without autograd (the step needs it off)."""
    with torch.no_grad():
        yield


@pytest.fixture
def steps(monkeypatch):
    """Counts the decoding steps (calls of ``decode_output``)."""
    calls = []
    step = decode.decode_output

    def counted(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_output", counted)
    return calls


def blocked_only(monkeypatch):
    monkeypatch.setattr(decode, "ready", lambda *args: None)


def native(seed: int = 0, **overrides) -> vkt_hf.VKTForCausalLM:
    torch.manual_seed(seed)
    options = {"local_window": 3, "sink_tokens": 2, **overrides}
    model = vkt_hf.VKTForCausalLM(native_config(**options)).eval()
    for name, param in model.named_parameters():
        if "null_" in name or "readout_gate" in name or "summary_bias" in name or "sink_" in name:
            param.normal_(0.0, 0.5)
    return model


def converted(window: int = 4, **options) -> vkt_hf.VKTHybridForCausalLM:
    model = vkt_hf.convert_to_vkt(tiny_llama(), layers="all", local_attention_window=window, **options)
    for layer in vkt_hf.layers.vkt_layers(model):
        layer.readout_gate.weight.normal_(0, 0.1)
        layer.readout_gate.bias.normal_(0, 0.5)
        layer.summary_bias.fill_(0.5)  # the global slot takes a visible share of the softmax
        layer.importance.normal_(0, 0.3)
    return model.eval()


def feed(model, ids, mask, bounds):
    """Logits of ``ids`` fed in the pieces ``bounds[k]:bounds[k + 1]`` through one cache."""
    cache = vkt_hf.VKTCache(["vkt"] * model.config.num_hidden_layers)
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        pieces.append(model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache).logits)
    return torch.cat(pieces, 1), cache


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(preset="paper"),
        dict(global_readout="add", sink_tokens=0),
        dict(learned_sink=True),
        dict(learned_sink=True, sink_tokens=0, vkt_terms=False),
    ],
)
def test_ring_wraps_around_and_prompt_chunks_continue_it(steps, variant):
    """Token by token for several turns of both rings (window 4, local window 3), a prompt chunk in between
    (ring -> chronological -> ring), left padding: equal to one forward."""
    model = native(**variant)
    ids = torch.randint(0, 97, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :3] = 0
    full = model(ids, attention_mask=mask, use_cache=False).logits
    bounds = [0, 5, *range(6, 17), 20, *range(21, 31)]  # odd prompt lengths: the ring starts mid-buffer
    pieces, _ = feed(model, ids, mask, bounds)
    real = mask.bool()
    torch.testing.assert_close(pieces[real], full[real], rtol=1e-4, atol=1e-5)
    assert len(steps) >= 20 * 2


def test_converted_left_padding_and_gqa(steps):
    model = converted()
    ids = torch.randint(0, 101, (3, 21))
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    full = model(ids, attention_mask=mask, use_cache=False).logits
    pieces, _ = feed(model, ids, mask, [0, 9, *range(10, 22)])
    real = mask.bool()
    torch.testing.assert_close(pieces[real], full[real], rtol=1e-4, atol=1e-5)
    assert len(steps) >= 12 * 2


def test_step_equals_the_blocked_path_in_float64(monkeypatch):
    """The step and the blocked path compute the same numbers (float64: up to rounding alone)."""
    model = converted(accumulation_dtype="float64").double()
    ids = torch.randint(0, 101, (2, 19))
    bounds = [0, 7, *range(8, 20)]
    fast, _ = feed(model, ids, torch.ones_like(ids), bounds)
    blocked_only(monkeypatch)
    slow, _ = feed(model, ids, torch.ones_like(ids), bounds)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


def test_generate_equals_a_full_forward_greedy(steps):
    model = converted()
    ids = torch.randint(1, 101, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    full_mask = torch.cat([mask, torch.ones(2, out.shape[1] - 7, dtype=torch.long)], 1)
    logits = model(out, attention_mask=full_mask, use_cache=False).logits
    assert torch.equal(logits[:, 6:-1].argmax(-1), out[:, 7:])
    assert len(steps) >= 9 * 2


def test_beam_search_reorders_the_ring(steps, monkeypatch):
    """Beam search (``reorder_cache`` on ring buffers) gives the sequences of the blocked path."""
    model = converted()
    ids = torch.randint(1, 101, (1, 6))
    kwargs = dict(max_new_tokens=9, do_sample=False, num_beams=3, num_return_sequences=3, pad_token_id=0)
    fast = model.generate(ids, **kwargs)
    assert steps
    blocked_only(monkeypatch)
    assert torch.equal(model.generate(ids, **kwargs), fast)


def test_state_is_updated_in_place(steps):
    """Decoding moves no buffer: the state's tensors keep their storage and its size stays the same."""
    model = converted()
    ids = torch.randint(0, 101, (1, 30))
    cache = vkt_hf.VKTCache(["vkt"] * 2)
    model(ids[:, :10], cache=cache)
    state = cache.layers[0].state
    pointers, size = [t.data_ptr() for t in state.tensors()], state.nbytes()
    for i in range(10, 30):
        model(ids[:, i : i + 1], cache=cache)
    after = cache.layers[0].state
    assert [t.data_ptr() for t in after.tensors()] == pointers
    assert after.nbytes() == size
    assert len(steps) == 20 * 2


def test_blocked_path_with_gradients(steps):
    """With autograd on, a one-token step takes the blocked path (the state must not change in place)."""
    model = native()
    cache = vkt_hf.VKTCache(["vkt"] * 2)
    ids = torch.randint(0, 97, (1, 8))
    model(ids[:, :7], cache=cache)
    with torch.enable_grad():
        model(ids[:, 7:], cache=cache).logits.sum().backward()
    assert not steps


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(learned_sink=True),
        dict(sink_tokens=0, normalization="tanh"),
        dict(context_weights="uniform", distance_decay=False),
        dict(local_attention_rope=False, normalization="sigmoid"),
    ],
)
@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "hooked"])
def test_cpu_kernel_equals_the_eager_step(monkeypatch, variant, hooked):
    """The C++ step (``vkt_hf/ops/cpu_kernels.cpp``) gives the eager step's logits and states, and runs: with the
    projections inside the call (``decode_layer``), or, when a projection has a hook (an adapter, a probe), the
    projections as modules and the rest in C++ (``decode_step``)."""
    model = converted(local_window=3, **variant)
    seen = []
    if hooked:  # a hook that records (and so must run) on every q projection
        for layer in model.model.model.layers:
            layer.self_attn.q_proj.register_forward_hook(lambda module, args, out: seen.append(1))
    ids = torch.randint(0, 101, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, :2] = 0
    bounds = [0, 9, *range(10, 25)]
    calls = count_kernel_calls(monkeypatch, {"decode_step": "step", "decode_layer": "layer"})
    fast, fast_cache = feed(model, ids, mask, bounds)
    assert len(calls) >= 10 * 2 and set(calls) == {"step" if hooked else "layer"}
    assert len(seen) >= (len(calls) if hooked else 0)
    monkeypatch.setenv("VKT_CPU_KERNELS", "0")
    calls.clear()
    slow, slow_cache = feed(model, ids, mask, bounds)
    assert not calls
    real = mask.bool()
    torch.testing.assert_close(fast[real], slow[real], rtol=1e-5, atol=1e-5)
    for fast_layer, slow_layer in zip(fast_cache.layers, slow_cache.layers):
        for got, want in zip(fast_layer.state.tensors(), slow_layer.state.tensors()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
