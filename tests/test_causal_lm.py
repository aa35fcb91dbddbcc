"""The causal-LM battery every model kind runs, native and converted (like transformers' ``causal_lm_tester.py``).

One fixture, :func:`case`, yields each kind of model: native ``VKTForCausalLM`` in the two
presets, with every option flipped and mixed with softmax / no-mixing layers, and converted
Llama (grouped-query) and GPT-2 hybrids. Each test states one property any causal LM of this
package must have: causality, chunked prefill then decode = one forward, left padding = each
row alone, cached generation = recomputing everything, save / Auto reload, scalar attentions
from ``output_attentions``, finite outputs on degenerate inputs, gradient checkpointing.

Model-specific checks live beside this: ``test_modeling.py`` (native: the layer against the
loops of ``vkt_hf.ops.naive``, config validation, constant cache size, ...) and
``test_convert.py`` (conversion: weight mapping, families, CLI, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.helpers import (
    CONVERTED_VOCAB,
    NATIVE_VOCAB,
    logits,
    randomize_zero_initialised,
    run_in_chunks,
    tiny_hybrid,
    tiny_model,
)
from vkt_hf.cache import LINEAR_ATTENTION_API, VKTStateLayer
from vkt_hf.layers import vkt_layers
from vkt_hf.utils import CACHE_FIELD


@dataclass(frozen=True)
class ModelCase:
    """One kind of model: how to build a fresh one, and what its outputs look like."""

    build: Callable[[], torch.nn.Module]
    vocab: int
    model_type: str


def converted(kind: str) -> torch.nn.Module:
    """A tiny hybrid whose VKT layers are all active: random importance, random zero-started parameters,
    a local attention window (where the layer has one) shorter than the test inputs."""
    model = tiny_hybrid(kind, layers=(1, 3), importance_init="random", local_attention_window=4)
    randomize_zero_initialised(model)
    return model


CASES: dict[str, ModelCase] = {
    "vkt-paper": ModelCase(lambda: tiny_model("paper"), NATIVE_VOCAB, "vkt"),
    "vkt-default": ModelCase(lambda: tiny_model("default"), NATIVE_VOCAB, "vkt"),
    "vkt-options": ModelCase(lambda: tiny_model("options"), NATIVE_VOCAB, "vkt"),
    "vkt-mixers": ModelCase(lambda: tiny_model("hybrid"), NATIVE_VOCAB, "vkt"),
    "llama-converted": ModelCase(lambda: converted("llama"), CONVERTED_VOCAB, "vkt_hybrid"),
    "gpt2-converted": ModelCase(lambda: converted("gpt2"), CONVERTED_VOCAB, "vkt_hybrid"),
}


@pytest.fixture(params=list(CASES))
def case(request) -> ModelCase:
    return CASES[request.param]


def none_layers(model) -> set[int]:
    """Indices of native no-mixing layers (they keep a token count in the cache, no state)."""
    return {i for i, kind in enumerate(getattr(model.config, "layer_types", [])) if kind == "mlp"}


def random_ids(case: ModelCase, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, case.vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, **kwargs) -> torch.Tensor:
    return model.generate(ids, pad_token_id=0, **kwargs)


def test_causality(case):
    model = case.build()
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        ids = random_ids(case, 2, 24, seed=int(torch.randint(0, 1000, (1,), generator=gen)))
        i = int(torch.randint(0, 23, (1,), generator=gen))
        changed = ids.clone()
        changed[:, i + 1 :] = torch.randint(3, case.vocab, (2, 23 - i), generator=gen)
        before, after = logits(model, ids), logits(model, changed)
        torch.testing.assert_close(before[:, : i + 1], after[:, : i + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(before[:, i + 1 :], after[:, i + 1 :])


def test_chunked_prefill_then_decode_equals_one_forward(case):
    model = case.build()
    gen = torch.Generator().manual_seed(2)
    ids = random_ids(case, 2, 40, seed=2)
    whole = logits(model, ids)
    for _ in range(3):
        cuts = sorted(torch.randperm(39, generator=gen)[:4].add(1).tolist())
        chunked, _ = run_in_chunks(model, ids, [0, *cuts, 40])
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    prefill_then_decode, _ = run_in_chunks(model, ids, [0, 11, *range(12, 41)])
    torch.testing.assert_close(prefill_then_decode, whole, atol=1e-5, rtol=0)


def test_left_padding_gives_each_row_alone(case):
    model = case.build()
    lengths = [12, 7, 3]
    rows = [random_ids(case, 1, n, seed=10 + n)[0] for n in lengths]
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, 12 - len(row) :] = row
        mask[r, 12 - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() passes them (GPT-2 has absolute positions)
    batched = logits(model, ids, attention_mask=mask, position_ids=positions)
    for r, row in enumerate(rows):
        torch.testing.assert_close(batched[r, 12 - len(row) :], logits(model, row[None])[0], atol=1e-5, rtol=0)
    # and generation from the padded batch equals generation from each row
    out = generate(model, ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for r, row in enumerate(rows):
        alone = generate(model, row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long), max_new_tokens=6)
        new = alone[0, len(row) :]  # shorter than the batch's when it ends with EOS
        assert torch.equal(out[r, 12 : 12 + len(new)], new)


def test_cached_greedy_generation_equals_argmax_loop(case):
    model = case.build()
    prompt = random_ids(case, 2, 6, seed=6)
    generated = generate(model, prompt, max_new_tokens=10, do_sample=False)
    seq = prompt
    for _ in range(10):
        seq = torch.cat([seq, logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)


def test_sampling_is_seeded_and_beam_search_reorders_the_cache(case):
    model = case.build()
    prompt = random_ids(case, 2, 6, seed=7)
    torch.manual_seed(0)
    first = generate(model, prompt, max_new_tokens=8, do_sample=True, top_k=20)
    torch.manual_seed(0)
    assert torch.equal(first, generate(model, prompt, max_new_tokens=8, do_sample=True, top_k=20))
    # beam search with the cache (reordered every step) equals beam search recomputing everything
    beams = generate(model, prompt, max_new_tokens=8, num_beams=3, do_sample=False)
    no_cache = generate(model, prompt, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(beams, no_cache)


def test_save_and_auto_reload_round_trip(case, tmp_path):
    model = case.build()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == case.model_type
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    ids = random_ids(case, 2, 15, seed=8)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    assert torch.equal(
        generate(reloaded, ids[:1, :4], max_new_tokens=4, do_sample=False),
        generate(model, ids[:1, :4], max_new_tokens=4, do_sample=False),
    )


def test_output_attentions_are_scalar_per_vkt_layer(case):
    model = case.build()
    ids = random_ids(case, 2, 10, seed=9)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True, use_cache=False).attentions
    # one number per token and head, (batch, heads, tokens), from each VKT layer; softmax layers add
    # (batch, heads, tokens, tokens) weights where their attention implementation returns them
    scalar = [a for a in attentions if a is not None and a.dim() == 3]
    assert len(scalar) == len(vkt_layers(model)) > 0
    assert all(a.shape == (2, 4, 10) for a in scalar)


def test_first_token_and_zero_inputs_are_finite(case):
    model = case.build()
    hidden = model.get_input_embeddings().embedding_dim
    with torch.no_grad():
        first = model(torch.tensor([[5]]), output_attentions=True)
        zeros = model(inputs_embeds=torch.zeros(2, 9, hidden), output_attentions=True)
    for out in (first, zeros):
        assert torch.isfinite(out.logits).all()
        assert all(torch.isfinite(a).all() for a in out.attentions if a is not None)


def test_gradient_checkpointing_gives_the_same_gradients(case):
    ids = random_ids(case, 2, 12, seed=11)
    grads = []
    for checkpointing in (False, True):
        model = case.build().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(0)  # the same dropout masks (GPT-2) in both runs
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_return_dict_false_gives_tuples_from_the_argument_and_the_config(case):
    model = case.build()
    ids = random_ids(case, 2, 8, seed=12)
    expected = model(ids, labels=ids, use_cache=False)
    loss, logits = model(ids, labels=ids, return_dict=False, use_cache=False)
    assert torch.equal(loss, expected.loss) and torch.equal(logits, expected.logits)
    model.config.return_dict = False
    loss, logits = model(ids, labels=ids, use_cache=False)
    assert torch.equal(logits, expected.logits)
    assert isinstance(model(ids, use_cache=False, return_dict=True).logits, torch.Tensor)  # the argument wins


def test_cache_is_a_linear_attention_cache_and_generation_refuses_rollback_up_front(case):
    model = case.build()
    assert type(model)._is_stateful  # as transformers' Mamba and Qwen3-Next
    ids = random_ids(case, 2, 8, seed=13)
    cache = getattr(model(ids, use_cache=True), CACHE_FIELD)
    vkt = {layer.layer_idx for layer in vkt_layers(model)}
    if LINEAR_ATTENTION_API:  # transformers' linear-attention cache API (transformers >= 5.x that has it)
        assert [i for i, linear in enumerate(cache.is_linear) if linear] == sorted(vkt | none_layers(model))
        assert all(cache.has_previous_state(i) for i in vkt)
        layer = sorted(vkt)[0]
        assert torch.equal(cache.get_recurrent_state(layer, 0), cache.layers[layer].state.weighted_sum)
    assert all(isinstance(cache.layers[i], VKTStateLayer) and cache.layers[i].state is not None for i in vkt)
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    for kwargs in (dict(prompt_lookup_num_tokens=2), dict(assistant_model=case.build())):
        with pytest.raises(ValueError, match="VKT"):
            generate(model, ids[:1], max_new_tokens=4, do_sample=False, **kwargs)
    assert calls == []  # refused before the prefill


def test_output_attentions_are_the_tensors_the_output_depends_on(case):
    model = case.build()
    ids = random_ids(case, 2, 10, seed=14)
    out = model(ids, output_attentions=True, use_cache=False)
    scalar = [a for a in out.attentions if a.dim() == 3]
    for a in scalar:
        a.retain_grad()
    out.logits[:, -1].sum().backward()
    assert scalar and all(a.grad is not None and a.grad.abs().sum() > 0 for a in scalar)
