"""The model battery of issue 2: causality, chunked = whole, padding, the spec's formulas, generate, save/load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import vkt_hf
from tests.helpers import tiny_config, tiny_model
from vkt_hf.utils import CACHE_FIELD


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def test_causality(variant):
    model = tiny_model(variant)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        ids = torch.randint(0, 97, (2, 24), generator=gen)
        i = int(torch.randint(0, 23, (1,), generator=gen))
        changed = ids.clone()
        changed[:, i + 1 :] = torch.randint(0, 97, (2, 23 - i), generator=gen)
        before, after = logits(model, ids), logits(model, changed)
        assert torch.equal(before[:, : i + 1], after[:, : i + 1])
        assert not torch.allclose(before[:, i + 1 :], after[:, i + 1 :])


def run_in_chunks(model, ids, bounds):
    cache, outputs = None, []
    with torch.no_grad():
        for start, end in zip(bounds[:-1], bounds[1:]):
            out = model(ids[:, start:end], **{CACHE_FIELD: cache}, use_cache=True)
            cache = getattr(out, CACHE_FIELD)
            outputs.append(out.logits)
    return torch.cat(outputs, dim=1), cache


def test_chunked_equals_whole(variant):
    model = tiny_model(variant)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 40), generator=gen)
    whole = logits(model, ids)
    for _ in range(3):
        cuts = sorted(torch.randperm(39, generator=gen)[:4].add(1).tolist())
        chunked, _ = run_in_chunks(model, ids, [0, *cuts, 40])
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    token_by_token, _ = run_in_chunks(model, ids, list(range(41)))
    torch.testing.assert_close(token_by_token, whole, atol=1e-5, rtol=0)


def test_mixer_chunk_size_does_not_change_outputs(variant):
    ids = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(3))
    whole = logits(tiny_model(variant), ids)
    torch.testing.assert_close(logits(tiny_model(variant, mixer_chunk_size=5), ids), whole, atol=1e-5, rtol=0)


def test_left_padding_gives_each_row_alone(variant):
    model = tiny_model(variant)
    gen = torch.Generator().manual_seed(4)
    lengths = [12, 7, 3]
    rows = [torch.randint(1, 97, (n,), generator=gen) for n in lengths]
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, 12 - len(row) :] = row
        mask[r, 12 - len(row) :] = 1
    batched = logits(model, ids, attention_mask=mask)
    for r, row in enumerate(rows):
        alone = logits(model, row[None])
        torch.testing.assert_close(batched[r, 12 - len(row) :], alone[0], atol=1e-5, rtol=0)
    # and generation from the padded batch equals generation from each row
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for r, row in enumerate(rows):
        alone = model.generate(
            row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long), max_new_tokens=6, do_sample=False
        )
        assert torch.equal(out[r, 12:], alone[0, len(row) :])


def reference_mixer(layer: vkt_hf.VKTAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A direct, loop-based transcription of VKT_SPEC for one sequence (float64, O(N^2)).

    Q_i = W_Q x_i; s_i = Q_i . V; w_j = softplus(s_j) (or 1); R_j = Q_j (or W_K x_j);
    K_i = (g^(i+1) c + sum_{j<i} g^(i-j) w_j R_j) / (g^(i+1) + sum_{j<i} g^(i-j) w_j), c the null context;
    T_i = mean(R_j, i-n <= j < i), or c for the first token; a_i = norm(s_i / guard(K_i . T_i));
    y_i = W_O concat_h(a_i U_i [+ gK_i Kv_i + gT_i Tv_i]).
    """
    cfg = layer.config
    x = x.double()
    n_tok, heads, d = x.shape[0], layer.num_heads, layer.head_dim
    group = heads // layer.num_kv_heads
    p = {k: v.detach().double() for k, v in layer.named_parameters()}

    def proj(name, inp):
        w = p[f"{name}.weight"]
        return inp @ w.T + (p[f"{name}.bias"] if f"{name}.bias" in p else 0)

    def head(t, h, kv=False):
        hh = h // group if kv else h
        return t[:, hh * d : (hh + 1) * d]

    q = proj("q_proj", x)
    k = proj("k_proj", x) if cfg.context_source == "key" else None
    v = proj("v_proj", x) if hasattr(layer, "v_proj") else None
    imp = proj("importance_proj", x) if cfg.importance == "projection" else None
    gates = proj("readout_gate", x) if cfg.readout else None
    gamma = torch.sigmoid(p["decay_logit"]) if cfg.distance_decay else torch.ones(heads, dtype=torch.float64)
    out = torch.zeros(n_tok, heads * d, dtype=torch.float64)
    scalars = torch.zeros(heads, n_tok, dtype=torch.float64)
    for h in range(heads):
        Q = head(q, h)
        R = head(k, h, kv=True) if k is not None else Q
        Vv = head(v, h, kv=True) if v is not None else None
        U = Vv if cfg.gated_value == "value" else Q
        V = head(imp, h) if imp is not None else p["importance"][h].expand(n_tok, d)
        c, cv = p["null_context"][h], (p["null_value"][h] if cfg.readout else None)
        s = [float(Q[j] @ V[j]) for j in range(n_tok)]  # importance scores
        w = [F.softplus(torch.tensor(sj)).item() if cfg.context_weights == "importance" else 1.0 for sj in s]
        for i in range(n_tok):
            g = float(gamma[h])
            num, den = g ** (i + 1) * c, g ** (i + 1)
            numv = g ** (i + 1) * cv if cv is not None else None
            for j in range(i):
                f = g ** (i - j) * w[j]
                num, den = num + f * R[j], den + f
                if numv is not None:
                    numv = numv + f * Vv[j]
            K = num / den
            near = list(range(max(0, i - cfg.local_window), i))
            T = R[near].mean(0) if near else c
            kt = float(K @ T)
            kt = max(kt, cfg.eps) if kt >= 0 else min(kt, -cfg.eps)
            a = s[i] / kt
            if cfg.normalization == "decimal":
                while abs(a) >= 1:
                    a /= 10
            else:
                a = {"softsign": a / (1 + abs(a)), "sigmoid": 1 / (1 + math.exp(-a)), "tanh": math.tanh(a), "none": a}[
                    cfg.normalization
                ]
            y = a * U[i]
            if cfg.readout:
                Tv = Vv[near].mean(0) if near else cv
                y = y + gates[i, h] * (numv / den) + gates[i, heads + h] * Tv
            out[i, h * d : (h + 1) * d] = y
            scalars[h, i] = a
    return proj("o_proj", out), scalars


@pytest.mark.parametrize("variant_name", ["paper", "default", "options"])
def test_layer_matches_loop_transcription_of_the_spec(variant_name):
    model = tiny_model(variant_name)
    layer = model.model.layers[0].self_attn
    x = torch.randn(1, 11, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, scalars = layer(x)
    expected, expected_scalars = reference_mixer(layer, x[0])
    torch.testing.assert_close(scalars[0].double(), expected_scalars, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[0].double(), expected, atol=1e-5, rtol=1e-4)


def test_first_token_and_zero_inputs_are_finite(variant):
    model = tiny_model(variant)
    with torch.no_grad():
        first = model(torch.tensor([[5]]), output_attentions=True)
        zeros = model(inputs_embeds=torch.zeros(2, 9, 32), output_attentions=True)
    for out in (first, zeros):
        assert torch.isfinite(out.logits).all()
        assert all(torch.isfinite(a).all() for a in out.attentions if a is not None)


def test_generate_greedy_equals_argmax_loop(variant):
    model = tiny_model(variant)
    prompt = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(6))
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False)
    seq = prompt
    for _ in range(10):
        seq = torch.cat([seq, logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)


def test_generate_sampling_is_seeded_and_beam_search_reorders_the_state(variant):
    model = tiny_model(variant)
    prompt = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    first = model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20)
    torch.manual_seed(0)
    assert torch.equal(first, model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20))
    # beam search with the recurrent cache (reordered each step) equals beam search recomputing everything
    beams = model.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False)
    no_cache = model.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(beams, no_cache)


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
    assert out.attentions[0].shape == (2, 4, 10) and out.attentions[1] is None and out.attentions[2] is None
    torch.testing.assert_close(model(ids, logits_to_keep=3).logits, out.logits[:, -3:])


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 97, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("default").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


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


def test_auto_classes_and_save_load_round_trip(tmp_path, variant):
    model = tiny_model(variant)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "vkt"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is vkt_hf.VKTForCausalLM
    ids = torch.randint(0, 97, (2, 15))
    assert torch.equal(logits(model, ids), logits(reloaded, ids))
    assert type(AutoModel.from_pretrained(tmp_path)) is vkt_hf.VKTModel
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    with torch.no_grad():
        out = half(ids, use_cache=False).logits
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
        (dict(mixer_types=["vkt"]), "mixer_types"),
        (dict(mixer_types=["vkt", "mamba"]), "mixer_types"),
        (dict(distance_decay="yes"), "distance_decay"),
        (dict(num_hidden_layers=0, mixer_types=[]), "num_hidden_layers"),
        (dict(mixer_chunk_size=0), "mixer_chunk_size"),
        (dict(vkt_backend="cuda"), "vkt_backend"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**kwargs)


def test_bad_inputs_say_what_is_wrong():
    model = tiny_model("default")
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 1, 3, 3))
    with pytest.raises(ValueError, match="exactly one"):
        model()
