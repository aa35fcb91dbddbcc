"""Evaluation metrics on tiny models against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import tiny_model
from vkt_hf import data
from vkt_hf import evaluation as ev

VOCAB = 259  # the byte tokenizer's vocabulary, so the same tiny models serve passkey/generation


def model_of(kind: str) -> torch.nn.Module:
    mixers = {"vkt": ["vkt", "vkt"], "softmax": ["softmax", "softmax"], "hybrid": ["vkt", "softmax"]}[kind]
    return tiny_model("default", vocab_size=VOCAB, mixer_types=mixers)


def nll_by_hand(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``-log p(x_{t+1} | x_{<=t})`` from one plain forward, ``(B, N-1)``."""
    with torch.no_grad():
        logp = model(input_ids=ids, use_cache=False).logits.double().log_softmax(-1)
    return -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


def test_perplexity_is_exp_of_mean_nll():
    model = model_of("vkt")
    torch.manual_seed(1)
    docs = [torch.randint(3, VOCAB, (n,)).tolist() for n in (40, 23, 17)]
    packed = data.pack_documents(docs, 16, pad_token_id=0)
    res = ev.perplexity(model, data.PackedDataset(packed), batch_size=3)
    ids, mask = packed["input_ids"], packed["attention_mask"]
    nll = nll_by_hand(model, ids)
    keep = mask[:, 1:].bool()  # right padding: real targets only, the model sees no padding before them
    expected = float(nll[keep].mean())
    # rows of 16+16+8, 16+7, 16 (a 1-token tail is dropped): each row scores its tokens after the first
    assert res["tokens"] == int(keep.sum()) == (15 + 15 + 7) + (15 + 6) + 15
    assert res["loss"] == pytest.approx(expected, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)


@pytest.mark.parametrize("kind", ["vkt", "softmax", "hybrid"])
def test_streaming_equals_full_pass(kind):
    model = model_of(kind)
    torch.manual_seed(2)
    tokens = torch.randint(3, VOCAB, (61,)).tolist()
    full = nll_by_hand(model, torch.tensor([tokens]))[0]
    res = ev.streaming_perplexity(model, tokens, chunk_size=7, curve_points=5)
    assert res["tokens"] == 61
    assert res["loss"] == pytest.approx(float(full.mean()), rel=1e-4)
    assert res["curve"][-1]["tokens"] == 61 and res["curve"][-1]["ppl"] == pytest.approx(res["ppl"], rel=1e-6)
    chunked = ev.sequence_nll(model, torch.tensor([tokens]), chunk_size=5)[0]
    torch.testing.assert_close(chunked.double(), full, rtol=1e-4, atol=1e-4)


def test_streaming_memory_is_bounded_for_vkt_only():
    torch.manual_seed(3)
    tokens = torch.randint(3, VOCAB, (200,)).tolist()
    vkt_short = ev.streaming_perplexity(model_of("vkt"), tokens[:50], chunk_size=25)["max_cache_bytes"]
    vkt_long = ev.streaming_perplexity(model_of("vkt"), tokens, chunk_size=25)["max_cache_bytes"]
    soft_short = ev.streaming_perplexity(model_of("softmax"), tokens[:50], chunk_size=25)["max_cache_bytes"]
    soft_long = ev.streaming_perplexity(model_of("softmax"), tokens, chunk_size=25)["max_cache_bytes"]
    assert 0 < vkt_short == vkt_long
    assert soft_long == 4 * soft_short


def test_position_buckets_match_direct_computation():
    model = model_of("vkt")
    torch.manual_seed(4)
    docs = [torch.randint(3, VOCAB, (n,)).tolist() for n in (70, 45)]
    res = ev.position_bucket_perplexity(model, docs, 20, num_buckets=4, max_segments=5, batch_size=2, chunk_size=6)
    segments = torch.tensor([docs[0][0:20], docs[1][0:20], docs[0][20:40], docs[1][20:40], docs[0][40:60]])
    assert res["segments"] == 5
    per_position = nll_by_hand(model, segments).mean(0)  # positions 1..19
    edges = [b["start"] for b in res["buckets"]] + [res["buckets"][-1]["end"]]
    assert edges[0] == 1 and edges[-1] == 20
    for b in res["buckets"]:
        assert b["loss"] == pytest.approx(float(per_position[b["start"] - 1 : b["end"] - 1].mean()), rel=1e-4)
    assert res["loss"] == pytest.approx(float(per_position.mean()), rel=1e-4)


def test_passkey_prompt_and_exact_match(monkeypatch):
    tok = data.get_tokenizer("byte")
    prompt = ev.passkey_prompt(tok, 1000, 0.5, "12345")
    text = tok.decode(prompt)
    assert len(prompt) == 1000 and text.count("12345") == 2 and text.endswith(ev.PASSKEY_QUESTION)
    assert abs(text.index("12345") / len(text) - 0.5) < 0.1
    model = model_of("vkt")

    def oracle(input_ids, **kwargs):  # answers with the key written in the prompt
        key = tok.decode(input_ids[0]).split("The pass key is ")[1][:5]
        return torch.cat([input_ids, torch.tensor([data.encode(tok, " " + key + ".")])], dim=1)

    monkeypatch.setattr(model, "generate", oracle)
    res = ev.passkey_retrieval(model, tok, context_lengths=(200, 300), depths=(0.0, 1.0), trials=2)
    assert res["accuracy"] == 1.0 and len(res["results"]) == 4
    monkeypatch.setattr(model, "generate", lambda input_ids, **kw: torch.cat([input_ids, input_ids[:, :3]], 1))
    assert ev.passkey_retrieval(model, tok, context_lengths=(200,), depths=(0.5,), trials=1)["accuracy"] == 0.0


def test_generation_and_plots(tmp_path):
    model = model_of("vkt")
    tok = data.get_tokenizer("byte")
    samples = ev.generation_samples(model, tok, ["Once upon"], max_new_tokens=8)
    assert samples[0]["prompt"] == "Once upon" and isinstance(samples[0]["completion"], str)
    tokens = torch.randint(3, VOCAB, (64,)).tolist()
    pos = {"m": ev.position_bucket_perplexity(model, [tokens], 32, num_buckets=4, max_segments=2)}
    stream = {"m": ev.streaming_perplexity(model, tokens, chunk_size=16)}
    passkey = {"m": {"results": [{"context_length": 64, "depth": 0.5, "accuracy": 0.5}]}}
    for fn, res, name in (
        (ev.plot_position_buckets, pos, "p.png"),
        (ev.plot_streaming, stream, "s.png"),
        (ev.plot_passkey, passkey, "k.png"),
    ):
        assert fn(res, tmp_path / name).stat().st_size > 1000
