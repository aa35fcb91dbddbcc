"""Native ``VKTForCausalLM`` / ``VKTModel``: what the shared battery (``test_causal_lm.py``) does not cover.

The layer against the loops of ``vkt_hf.ops.naive``, mixer chunking, the constant-size cache,
outputs, the bidirectional model, ``AutoModel`` and dtypes, tied embeddings, config and input
validation.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import vkt_hf
from tests.helpers import logits, run_in_chunks, tiny_config, tiny_model
from vkt_hf.ops import naive


def test_mixer_chunk_size_does_not_change_outputs(variant):
    ids = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(3))
    whole = logits(tiny_model(variant), ids)
    torch.testing.assert_close(logits(tiny_model(variant, mixer_chunk_size=5), ids), whole, atol=1e-5, rtol=0)


def naive_layer(layer: vkt_hf.VKTAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output for one sequence ``x`` ``(1, N, hidden)``, in float64, from the loops of ``vkt_hf.ops.naive``.

    Projections as the layer names them; then per head ``s = Q . V``, ``w = softplus(s)`` (or 1),
    ``K`` and ``T`` of ``R`` (``Q`` or the keys, with the values alongside when they are read
    out), ``a = norm(s / guard(K . T))``, ``y = a U [+ g_K K_v + g_T T_v]``, then ``o_proj``.
    """
    cfg, heads, d = layer.config, layer.num_heads, layer.head_dim
    p = copy.deepcopy(layer).double()
    x = x.double()
    length = x.shape[1]

    def split(t: torch.Tensor, n: int) -> torch.Tensor:  # (1, N, n * d) -> (1, H, N, d), GQA heads repeated
        return t.view(1, length, n, d).transpose(1, 2).repeat_interleave(heads // n, dim=1)

    q = split(p.q_proj(x), heads)
    keys = split(p.k_proj(x), layer.num_kv_heads) if cfg.context_source == "key" else q
    values = split(p.v_proj(x), layer.num_kv_heads) if hasattr(p, "v_proj") else None
    importance = p.importance if cfg.importance == "parameter" else split(p.importance_proj(x), heads)
    scores = naive.importance_scores(q, importance)
    weights = F.softplus(scores) if cfg.context_weights == "importance" else torch.ones_like(scores)
    stream, null = keys, p.null_context
    if cfg.readout:
        stream, null = torch.cat([keys, values], dim=-1), torch.cat([p.null_context, p.null_value], dim=-1)
    mask = torch.ones(1, length)
    log_decay = F.logsigmoid(p.decay_logit) if cfg.distance_decay else None
    k, _ = naive.global_context(stream, weights, mask, null, log_decay)
    t, _ = naive.local_context(stream, mask, null, cfg.local_window)
    a = naive.scalar_attention(scores, k[..., :d], t[..., :d], cfg.eps, cfg.normalization)
    y = a[..., None] * (values if cfg.gated_value == "value" else q)
    if cfg.readout:
        gates = p.readout_gate(x).view(1, length, 2, heads).permute(2, 0, 3, 1)  # (2, 1, H, N)
        y = y + gates[0][..., None] * k[..., d:] + gates[1][..., None] * t[..., d:]
    return p.o_proj(y.transpose(1, 2).reshape(1, length, heads * d)), a


@pytest.mark.parametrize("variant_name", ["paper", "default", "options"])
def test_layer_matches_the_naive_loops(variant_name):
    model = tiny_model(variant_name)
    layer = model.model.layers[0].self_attn
    x = torch.randn(1, 11, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, scalars = layer(x)
        expected, expected_scalars = naive_layer(layer, x)
    torch.testing.assert_close(scalars.double(), expected_scalars, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)


def test_cache_size_is_constant():
    model = tiny_model("default", mixer_types=["vkt", "none"])
    _, cache = run_in_chunks(model, torch.randint(0, 97, (1, 10)), [0, 10])
    after_10 = cache.vkt_state_bytes()
    _, cache = run_in_chunks(model, torch.randint(0, 97, (1, 10_000)), [0, 4000, 8000, 10_000])
    assert cache.get_seq_length() == 10_000
    assert cache.vkt_state_bytes() == after_10 > 0
    assert all(layer.state.weighted_sum.shape == (1, 4, 16) for layer in cache.layers if layer.state is not None)


def test_outputs_loss_hidden_states_and_logits_to_keep():
    model = tiny_model("hybrid")
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids, labels=ids, output_hidden_states=True, output_attentions=True, use_cache=False)
    expected_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected_loss)
    assert len(out.hidden_states) == 4 and out.hidden_states[0].shape == (2, 10, 32)
    # the VKT layer's scalar attentions; the softmax layer (SDPA) and the no-mixing layer return no weights
    assert len(out.attentions) == 1 and out.attentions[0].shape == (2, 4, 10)
    torch.testing.assert_close(model(ids, logits_to_keep=3).logits, out.logits[:, -3:])


def test_bidirectional_vkt_model_sees_both_sides():
    torch.manual_seed(0)
    model = vkt_hf.VKTModel(tiny_config(causal=False)).eval()
    ids = torch.randint(0, 97, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 97
    with torch.no_grad():
        before, after = model(ids).last_hidden_state, model(changed).last_hidden_state
    assert not torch.allclose(before[:, :5], after[:, :5])
    with pytest.raises(ValueError, match="causal"):
        vkt_hf.VKTForCausalLM(tiny_config(causal=False))


def test_auto_model_and_half_precision_reload(tmp_path):
    model = tiny_model("default")
    model.save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is vkt_hf.VKTModel
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    ids = torch.randint(0, 97, (2, 15))
    out = logits(half, ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), logits(model, ids), atol=0.15, rtol=0.1)


def test_tied_embeddings_option():
    tied = tiny_model("default")
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    untied = tiny_model("default", tie_word_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(normalization="softmax"), "normalization"),
        (dict(local_window=0), "local_window"),
        (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(eps=0.0), "eps"),
        (dict(importance="vector"), "importance"),
        (dict(context_source="value"), "context_source"),
        (dict(gated_value="key"), "gated_value"),
        (dict(context_weights="softmax"), "context_weights"),
        (dict(preset="fast"), "preset"),
        (dict(layer_types=["vkt"]), "layer_types"),
        (dict(layer_types=["vkt", "mamba"]), "layer_types"),
        (dict(distance_decay="yes"), "distance_decay"),
        (dict(num_hidden_layers=0, layer_types=[]), "num_hidden_layers"),
        (dict(mixer_chunk_size=0), "mixer_chunk_size"),
        (dict(vkt_backend="cuda"), "vkt_backend"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**kwargs)


def test_layer_types_use_transformers_names_and_old_mixer_types_configs_load(tmp_path):
    config = tiny_config(num_hidden_layers=3, layer_types=["vkt", "softmax", "none"])
    assert config.layer_types == ["linear_attention", "full_attention", "mlp"]
    assert config.mixer_types == ["vkt", "softmax", "none"]  # the short names, read-only view
    model = vkt_hf.VKTForCausalLM(config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layer_types"] == config.layer_types and "mixer_types" not in saved
    # a checkpoint saved before the rename: `mixer_types` in config.json
    saved["mixer_types"] = ["softmax", "vkt", "none"]
    del saved["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert reloaded.layer_types == ["full_attention", "linear_attention", "mlp"]
    assert [layer.layer_type for layer in vkt_hf.VKTModel(reloaded).layers] == reloaded.layer_types


def test_bad_inputs_say_what_is_wrong():
    model = tiny_model("default")
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 1, 3, 3))
    with pytest.raises(ValueError, match="exactly one"):
        model()
