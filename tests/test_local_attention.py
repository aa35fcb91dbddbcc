"""The exact local attention window with its sink (``local_attention=True``).

Checked against the per-token loop of :mod:`vkt_hf.ops.naive` (the window's definition, written
out), and for the rules every VKT path keeps: causality, chunked = whole, cached decoding = one forward, padding is not context,
constant decoding state, and, on a converted Llama whose window covers the whole input, the
pretrained model's own outputs.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import vkt_hf
from vkt_hf.layers.vkt_attention import _learned_sink_slot
from vkt_hf.ops import functional as vkt
from vkt_hf.ops import naive


def run_window(q, k, v, mask, window, sinks, splits=None):
    """:func:`vkt.sliding_window_attention` over chunks (``splits``: chunk ends), carrying the state."""
    batch, kv_heads, length, dim = k.shape
    sink = (k.new_zeros(batch, kv_heads, sinks, dim), v.new_zeros(batch, kv_heads, sinks, dim))
    sink = (*sink, torch.zeros(batch, sinks, dtype=torch.bool))
    history, outs, start = None, [], 0
    for end in splits or [length]:
        m = mask[:, start:end]
        if sinks:
            rank = vkt.rank_of_real_tokens(m, sink[2].sum(-1))
            sink = vkt.fill_sink(k[:, :, start:end], v[:, :, start:end], m, rank, sink)
            key_mask, visible = m & (rank >= sinks), rank[:, :, None] >= torch.arange(sinks)
        else:
            key_mask, visible = m, None
        out, history = vkt.sliding_window_attention(
            q[:, :, start:end],
            k[:, :, start:end],
            v[:, :, start:end],
            key_mask,
            window,
            history,
            sink if sinks else None,
            visible,
        )
        outs.append(out)
        start = end
    return torch.cat(outs, dim=-2)


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("sinks", [0, 1, 3])
@pytest.mark.parametrize("splits", [None, [2, 3, 11, 29]])
def test_window_matches_loop_definition(window, sinks, splits):
    torch.manual_seed(window * 10 + sinks)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 29, 8
    q = torch.randn(batch, heads, length, dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :5] = False  # left padding
    out = run_window(q, k, v, mask, window, sinks, splits)
    ref = naive.sliding_window_attention(q, k, v, mask, window, sinks)
    real = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], rtol=1e-10, atol=1e-10)


def test_summary_slot_shares_the_softmax():
    torch.manual_seed(3)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 19, 8
    q = torch.randn(batch, heads, length, dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    logit = torch.randn(batch, heads, length, dtype=torch.float64)
    logit[:, :, :5] = float("-inf")  # hidden slot
    summary = (logit, torch.randn(batch, heads, length, dim, dtype=torch.float64))
    mask = torch.ones(batch, length, dtype=torch.bool)
    out, _ = vkt.sliding_window_attention(q, k, v, mask, 4, summary=summary)
    torch.testing.assert_close(
        out, naive.sliding_window_attention(q, k, v, mask, 4, 0, summary), rtol=1e-10, atol=1e-10
    )


def test_learned_sink_is_one_more_slot_of_the_softmax():
    """The learned sink merged into the global slot (one slot) weighs exactly as two separate slots would:
    checked against the softmax over [window keys, global slot, sink] written out."""
    torch.manual_seed(4)
    batch, heads, length, dim = 2, 4, 7, 8
    config = native_config(hidden_size=heads * dim, num_key_value_heads=heads, learned_sink=True)
    layer = vkt_hf.layers.VKTAttention(config)
    with torch.no_grad():
        layer.sink_key.normal_()
        layer.sink_value.normal_()
    q, k, v = (torch.randn(batch, heads, length, dim, dtype=torch.float64) for _ in range(3))
    layer = layer.double()
    global_logit = torch.randn(batch, heads, length, dtype=torch.float64)
    global_logit[:, :, :2] = float("-inf")  # hidden for the first tokens
    global_value = torch.randn(batch, heads, length, dim, dtype=torch.float64)
    slot = _learned_sink_slot(q, layer, (global_logit, global_value))
    out, _ = vkt.sliding_window_attention(q, k, v, torch.ones(batch, length, dtype=torch.bool), length, summary=slot)

    causal = torch.ones(length, length, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) * dim**-0.5).masked_fill(~causal, float("-inf"))  # (B, H, N, N)
    sink_logit = (q @ layer.sink_key[None, :, :, None]).squeeze(-1) * dim**-0.5  # (B, H, N)
    weights = torch.cat([scores, global_logit[..., None], sink_logit[..., None]], -1).softmax(-1)
    sink_value = layer.sink_value[None, :, None].expand_as(global_value)
    expected = weights[..., :length] @ v + weights[..., -2:-1] * global_value + weights[..., -1:] * sink_value
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="learned_sink"):
        native_config(local_attention=False, learned_sink=True)


def test_padding_holds_nan_without_leaking():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 4) for _ in range(3))
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, :3] = False
    k[:, :, :3], v[:, :, :3] = float("nan"), float("inf")
    out = run_window(q, k, v, mask, 4, 1)
    assert torch.isfinite(out[:, :, 3:]).all()


def native_config(**overrides):
    values = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        local_attention=True,
        local_attention_window=4,
        sink_tokens=1,
        mixer_chunk_size=5,
    )
    values.update(overrides)
    return vkt_hf.VKTConfig(**values)


def randomised(model):
    """Give the zero-initialised VKT gates random values so every branch is on."""
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in vkt_hf.layers.vkt_layers(model):
            layer.readout_gate.weight.normal_(0, 0.1)
            layer.readout_gate.bias.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("sinks", [0, 2])
def test_native_decode_equals_forward_with_left_padding(sinks):
    torch.manual_seed(0)
    model = randomised(vkt_hf.VKTForCausalLM(native_config(sink_tokens=sinks)))
    ids = torch.randint(0, 97, (2, 17))
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, :6] = 0
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache = vkt_hf.VKTCache(model.config.mixer_types)
    steps = [model(ids[:, :7], attention_mask=mask[:, :7], cache=cache).logits]
    for i in range(7, 17):
        steps.append(model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1)[mask.bool()], full[mask.bool()], rtol=1e-4, atol=1e-5)
    alone = model(ids[1:, 6:], use_cache=False).logits
    torch.testing.assert_close(full[1:, 6:], alone, rtol=1e-4, atol=1e-5)


def test_native_is_causal():
    torch.manual_seed(0)
    model = randomised(vkt_hf.VKTForCausalLM(native_config()))
    ids = torch.randint(0, 97, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("learned_sink", [False, True])
def test_state_bytes_constant_in_context_length(learned_sink):
    torch.manual_seed(0)
    config = native_config(mixer_chunk_size=4096, sink_tokens=2, learned_sink=learned_sink)
    model = vkt_hf.VKTForCausalLM(config).eval()
    sizes = []
    with torch.no_grad():
        for length in (100, 10_000):
            cache = vkt_hf.VKTCache(model.config.mixer_types)
            model(torch.randint(0, 97, (1, length)), cache=cache)
            sizes.append(cache.vkt_state_bytes())
    assert sizes[0] == sizes[1] > 0


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500.0,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def test_converted_window_covering_the_input_is_the_pretrained_model():
    """With the VKT terms at their zero start and a window as long as the input, a converted
    Llama computes exactly its pretrained attention (RoPE and GQA included)."""
    base = tiny_llama()
    ids = torch.randint(0, 101, (2, 24))
    expected = base(ids).logits
    hybrid = vkt_hf.convert_to_vkt(base, layers="all", local_attention_window=24, sink_tokens=0).eval()
    torch.testing.assert_close(hybrid(ids).logits, expected, rtol=1e-4, atol=1e-5)
    narrow = vkt_hf.convert_to_vkt(tiny_llama(), layers="all", local_attention_window=4).eval()
    assert not torch.allclose(narrow(ids).logits, expected, atol=1e-3)


def test_converted_generate_uses_constant_state():
    base = tiny_llama()
    hybrid = randomised(vkt_hf.convert_to_vkt(base, layers="all", local_attention_window=4))
    ids = torch.randint(0, 101, (1, 9))
    out = hybrid.generate(ids, max_new_tokens=12, do_sample=False)
    # greedy decoding with the cache equals re-running the whole prefix each step
    for step in range(9, out.shape[1]):
        logits = hybrid(out[:, :step], use_cache=False).logits[:, -1]
        assert logits.argmax(-1).item() == out[0, step].item()


def test_converted_learned_sink_saves_and_reloads(tmp_path):
    """A conversion with a learned sink instead of the kept token: its new parameters round-trip."""
    hybrid = vkt_hf.convert_to_vkt(
        tiny_llama(), layers="all", local_attention_window=4, sink_tokens=0, learned_sink=True
    )
    with torch.no_grad():
        for layer in vkt_hf.layers.vkt_layers(hybrid):
            layer.sink_key.normal_()
            layer.sink_value.normal_()
    ids = torch.randint(0, 101, (1, 11))
    hybrid.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert all(layer.config.learned_sink for layer in vkt_hf.layers.vkt_layers(loaded))
    torch.testing.assert_close(loaded(ids).logits, hybrid.eval()(ids).logits)


def test_bad_local_attention_options():
    with pytest.raises(ValueError, match="local_attention_window"):
        native_config(local_attention_window=0)
    with pytest.raises(ValueError, match="sink_tokens"):
        native_config(sink_tokens=-1)
    with pytest.raises(ValueError, match="causal"):
        native_config(causal=False)


def test_window_only_baseline_ignores_the_vkt_terms():
    """``vkt_terms=False`` is the window + sink alone: the VKT parameters have no effect."""
    torch.manual_seed(0)
    model = randomised(vkt_hf.VKTForCausalLM(native_config(vkt_terms=False)))
    ids = torch.randint(0, 97, (2, 13))
    before = model(ids).logits
    with torch.no_grad():
        for layer in vkt_hf.layers.vkt_layers(model):
            layer.readout_gate.bias.add_(3.0)
            layer.importance.add_(1.0)
    torch.testing.assert_close(model(ids).logits, before)
    cache = vkt_hf.VKTCache(model.config.mixer_types)
    steps = [model(ids[:, :5], cache=cache).logits] + [
        model(ids[:, i : i + 1], cache=cache).logits for i in range(5, 13)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), before, rtol=1e-4, atol=1e-5)
