"""Conversion of GPT-2 / Llama-family checkpoints to VKT: weight mapping, families, saved format, CLI, SmolLM2 (slow).

What every converted model must also do as a causal LM (causality, chunked = whole, padding,
generation, save / reload) is the shared battery of ``test_causal_lm.py``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    MistralConfig,
    OPTConfig,
    OPTForCausalLM,
)

import vkt_hf
from tests.helpers import CONVERTED_VOCAB as VOCAB
from tests.helpers import run_in_chunks, tiny_base, tiny_hybrid
from vkt_hf import convert_to_vkt
from vkt_hf.cli import main as cli_main
from vkt_hf.convert import ConversionError, resolve_layers
from vkt_hf.layers import VKTAttention

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4)


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------------- in memory


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen3"])
@torch.no_grad()
def test_zero_layers_gives_identical_logits(kind):
    model, x = tiny_base(kind), ids()
    expected = model(x).logits
    converted = convert_to_vkt(model, layers=[])
    assert isinstance(converted, vkt_hf.VKTHybridForCausalLM)
    assert torch.equal(converted(x).logits, expected)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen3"])
def test_unconverted_parameters_are_bit_identical(kind):
    model = tiny_base(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_to_vkt(model, layers=[1, 3])
    after = converted.model.state_dict()
    attn = "attn" if kind == "gpt2" else "self_attn"
    for key, value in before.items():
        if not any(f".{i}.{attn}." in key for i in (1, 3)):
            assert torch.equal(after[key], value), key
    vkt_layers = [m for m in converted.modules() if isinstance(m, VKTAttention)]
    assert [m.layer_idx for m in vkt_layers] == [1, 3]


@torch.no_grad()
def test_gpt2_fused_projection_is_split():
    model = tiny_base("gpt2")
    attention = model.transformer.h[2].attn
    x = torch.randn(2, 5, 32)
    q, k, v = attention.c_attn(x).split(32, dim=-1)
    out = attention.c_proj(v)
    converted = convert_to_vkt(model, layers=[2]).model.transformer.h[2].attn
    torch.testing.assert_close(converted.q_proj(x), q)
    torch.testing.assert_close(converted.k_proj(x), k)
    torch.testing.assert_close(converted.v_proj(x), v)
    torch.testing.assert_close(converted.o_proj(v), out)


def test_llama_projections_are_reused_and_gqa_kept():
    model = tiny_base("llama")
    original = model.model.layers[0].self_attn
    converted = convert_to_vkt(model, layers="all").model.model.layers[0].self_attn
    assert converted.q_proj is original.q_proj and converted.k_proj is original.k_proj
    assert converted.v_proj is original.v_proj and converted.o_proj is original.o_proj
    assert (converted.num_heads, converted.num_kv_heads, converted.head_dim) == (4, 2, 8)
    assert converted.config.context_source == "key" and converted.config.gated_value == "value"


@torch.no_grad()
def test_qwen3_keeps_head_norms():
    model = tiny_base("qwen3")
    attention = model.model.layers[0].self_attn
    x = torch.randn(1, 3, 32)
    expected = attention.k_norm(attention.k_proj(x).view(1, 3, -1, 8)).view(1, 3, -1)
    converted = convert_to_vkt(model, layers=[0]).model.model.layers[0].self_attn
    torch.testing.assert_close(converted.k_proj(x), expected)


@pytest.mark.parametrize("kind", ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gpt2"])
@torch.no_grad()
def test_all_layers_convert_and_run(kind):
    model = tiny_hybrid(kind, layers=range(4))
    logits = model(ids()).logits
    assert logits.shape == (2, 12, VOCAB) and torch.isfinite(logits).all()


def test_unsupported_architecture_lists_supported():
    bert = BertModel(
        BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32)
    )
    with pytest.raises(ConversionError, match="supported model types: gpt2, llama, mistral"):
        convert_to_vkt(bert)
    opt = OPTForCausalLM(
        OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, ffn_dim=32, num_attention_heads=4)
    )
    with pytest.raises(ConversionError, match="'opt'"):
        convert_to_vkt(opt)


def test_bare_model_is_converted_in_place():
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4))
    assert convert_to_vkt(model, layers=[0]) is model
    assert isinstance(model.h[0].attn, VKTAttention)
    assert torch.isfinite(model(ids()).last_hidden_state).all()


def test_layer_specs_and_bad_options():
    assert resolve_layers("0,2,5-7", 10) == [0, 2, 5, 6, 7]
    assert resolve_layers("even", 5) == [0, 2, 4] and resolve_layers("odd", 5) == [1, 3]
    assert resolve_layers([-1], 4) == [3] and resolve_layers("none", 4) == []
    with pytest.raises(ConversionError, match="out of range"):
        resolve_layers([4], 4)
    with pytest.raises(ConversionError, match="unknown VKT option"):
        convert_to_vkt(tiny_base("llama"), layers=[0], bogus=1)
    with pytest.raises(ConversionError, match="normalization"):
        convert_to_vkt(tiny_base("llama"), layers=[0], normalization="bogus")


# ------------------------------------------------------------------------------------- hybrid properties


@torch.no_grad()
def test_hybrid_cache_holds_vkt_state_and_keys_values_side_by_side():
    _, cache = run_in_chunks(tiny_hybrid("llama"), ids(), [0, 5, 12])
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds[1] == kinds[3] == "VKTStateLayer" and {kinds[0], kinds[2]} == {"DynamicLayer"}


# ------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen3"])
@torch.no_grad()
def test_saved_config_records_the_conversion(kind, tmp_path):
    model, x = tiny_hybrid(kind), ids()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "vkt_hybrid" and saved["vkt_layers"] == [1, 3]
    assert saved["base_config"]["model_type"] == kind
    assert saved["vkt_options"] == model.config.vkt_options and "local_window" in saved["vkt_options"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # Qwen3: the head norms come back too
    assert torch.equal(reloaded(x).logits, model(x).logits)


def test_hybrid_config_is_plain_data_completed_by_the_model():
    config = vkt_hf.VKTHybridConfig(
        base_config=tiny_base("llama").config, vkt_layers=[0], vkt_options={"local_window": 4}
    )
    assert config.vkt_options == {"local_window": 4}  # nothing resolved or imported by the config
    model = vkt_hf.VKTHybridForCausalLM(config)
    assert model.config.vkt_options["local_window"] == 4 and model.config.vkt_options["preset"] == "default"
    with pytest.raises(ConversionError, match="unknown VKT option"):
        vkt_hf.VKTHybridForCausalLM(vkt_hf.VKTHybridConfig(base_config=config.base_config, vkt_options={"bogus": 1}))


# ------------------------------------------------------------------------------------------------- CLI


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@torch.no_grad()
def test_cli_convert_local_dir_end_to_end(tmp_path):
    src, out = tmp_path / "llama", tmp_path / "llama-vkt"
    tiny_base("llama").save_pretrained(src)
    _tiny_tokenizer().save_pretrained(src)
    assert cli_main(["convert", str(src), str(out), "--layers", "0,2", "--vkt-option", "local_window=4"]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.vkt_layers == [0, 2] and reloaded.config.vkt_options["local_window"] == 4
    expected = convert_to_vkt(AutoModelForCausalLM.from_pretrained(src), layers=[0, 2], local_window=4)
    x = ids()
    assert torch.equal(reloaded(x).logits, expected.eval()(x).logits)
    assert (out / "tokenizer.json").is_file()


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli_main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["convert", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    opt = tmp_path / "opt"
    OPTForCausalLM(
        OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, ffn_dim=32, num_attention_heads=4)
    ).save_pretrained(opt)
    assert cli_main(["convert", str(opt), str(tmp_path / "out")]) == 2
    assert "supported model types" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- real SmolLM2


# Perplexity of SmolLM2-135M-Instruct on tests/fixtures/passage.txt (521 tokens). The original
# measures 28.16, so a bound of 30 fails if loading or the tokenizer go wrong. Half the layers
# converted (`--layers even`, conversion defaults, no training) must stay below a loose bound.
SMOLLM2_ORIGINAL_MAX_PERPLEXITY = 30.0
SMOLLM2_HALF_VKT_MAX_PERPLEXITY = 100.0


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_half_conversion_end_to_end(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    from _fetch_utils import default_cache_dir
    from fetch_smollm2 import fetch_smollm2
    from transformers import AutoTokenizer

    src = fetch_smollm2(default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(src)
    passage = tokenizer((REPO / "tests/fixtures/passage.txt").read_text(), return_tensors="pt").input_ids

    def perplexity(model) -> float:
        return math.exp(model(passage, labels=passage).loss.item())

    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    before = perplexity(base)
    converted = convert_to_vkt(base, layers="even")
    converted.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    after = perplexity(reloaded)
    assert after == pytest.approx(perplexity(converted), rel=1e-5)  # the saved model is the converted one
    prompt = tokenizer("It is a truth universally acknowledged", return_tensors="pt")
    out = reloaded.generate(**prompt, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    print(
        f"\nSmolLM2 perplexity: original {before:.2f}, half VKT {after:.2f}; "
        f"greedy: {tokenizer.decode(out[0, prompt.input_ids.shape[1] :])!r}"
    )
    assert out.shape[1] == prompt.input_ids.shape[1] + 20
    assert before < SMOLLM2_ORIGINAL_MAX_PERPLEXITY
    assert after < SMOLLM2_HALF_VKT_MAX_PERPLEXITY


@torch.no_grad()
def test_sliding_window_padding_and_random_importance():
    """Left padding longer than Mistral's sliding window, with the scalar path active (random V)."""
    torch.manual_seed(0)
    config = MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=3)
    model = convert_to_vkt(AutoModelForCausalLM.from_config(config).eval(), layers=[1, 3], importance_init="random")
    assert model.model.model.layers[1].self_attn.importance.abs().sum() > 0
    long, short = ids(1, 10, seed=4), ids(1, 4, seed=5)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 6, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    together = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(together[0], model(long).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(together[1, 6:], model(short).logits[0], atol=1e-5, rtol=0)
    # chunked = whole with the scalar path active
    whole = model(long, use_cache=False).logits
    chunked, _ = run_in_chunks(model, long, [0, 4, 10])
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
