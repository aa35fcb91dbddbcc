"""Generation checks in the spirit of transformers' ``GenerationTesterMixin`` (its file is not in the sdist).

Run on every model kind of the causal-LM battery (``tests/test_causal_lm.py``: native VKT models and converted
hybrids). Greedy = argmax loop, seeded sampling, beam search with and without the cache, and left padding are
in that battery; here: the dict outputs of ``generate`` (scores, logits, attentions, hidden states), generation
from ``inputs_embeds``, continuing from a returned cache, ``num_return_sequences``, beam sampling, and
``position_ids`` passed or not. Assisted and prompt-lookup decoding are refused (stateful models, as in
transformers' own recurrent models): ``test_cache_is_a_linear_attention_cache_...`` in the battery.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_causal_lm import CASES, generate, random_ids
from vkt_hf.utils import CACHE_FIELD


@pytest.fixture(params=list(CASES))
def case(request):
    return CASES[request.param]


def test_generate_dict_outputs_match_forward_passes(case):
    model = case.build()
    prompt = random_ids(case, 2, 5, seed=20)
    out = generate(
        model,
        prompt,
        max_new_tokens=4,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        output_attentions=True,
        output_hidden_states=True,
    )
    assert out.sequences.shape == (2, 9)
    assert len(out.scores) == len(out.logits) == len(out.attentions) == len(out.hidden_states) == 4
    for step in range(4):  # the logits of step i are those of a forward over everything before it
        with torch.no_grad():
            expected = model(out.sequences[:, : 5 + step], use_cache=False).logits[:, -1]
        torch.testing.assert_close(out.logits[step], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.scores[step], expected, atol=1e-5, rtol=1e-5)  # greedy: no processors
    num_layers = model.config.num_hidden_layers
    assert all(len(h) == num_layers + 1 for h in out.hidden_states)
    assert out.hidden_states[0][0].shape[1] == 5 and out.hidden_states[1][0].shape[1] == 1  # prefill, then 1 token
    assert all(a.shape[:2] == (2, 4) for step in out.attentions for a in step if a.dim() == 3)
    assert isinstance(getattr(out, CACHE_FIELD), type(getattr(model(prompt[:, :1]), CACHE_FIELD)))


def test_generate_from_inputs_embeds_equals_from_input_ids(case):
    model = case.build()
    prompt = random_ids(case, 1, 6, seed=21)
    from_ids = generate(model, prompt, max_new_tokens=5, do_sample=False)
    embeds = model.get_input_embeddings()(prompt)
    from_embeds = generate(model, None, inputs_embeds=embeds, max_new_tokens=5, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, 6:])  # decoder-only: only the new tokens come back


def test_continuing_from_a_returned_cache_equals_one_generation(case):
    model = case.build()
    prompt = random_ids(case, 1, 5, seed=22)
    whole = generate(model, prompt, max_new_tokens=8, do_sample=False)
    first = generate(model, prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = getattr(first, CACHE_FIELD)
    assert cache.get_seq_length() == 8  # the last generated token has not been fed yet
    again = generate(model, first.sequences, max_new_tokens=4, do_sample=False, **{CACHE_FIELD: cache})
    assert torch.equal(again, whole)


def test_num_return_sequences_and_seeded_beam_sampling(case):
    model = case.build()
    prompt = random_ids(case, 2, 5, seed=23)
    torch.manual_seed(0)
    sampled = generate(model, prompt, max_new_tokens=4, do_sample=True, num_return_sequences=3)
    assert sampled.shape == (6, 9) and torch.equal(sampled[:3, :5], prompt[:1].expand(3, -1))
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(generate(model, prompt, max_new_tokens=4, do_sample=True, num_beams=2))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (2, 9)


def test_generation_with_and_without_position_ids(case):
    model = case.build()
    prompt = random_ids(case, 2, 6, seed=24)
    positions = torch.arange(6).expand(2, -1)
    assert torch.equal(
        generate(model, prompt, max_new_tokens=4, do_sample=False),
        generate(model, prompt, position_ids=positions, max_new_tokens=4, do_sample=False),
    )
