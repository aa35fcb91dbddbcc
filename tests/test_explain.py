"""Importance maps (`vkt-hf explain`)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers import tiny_model
from vkt_hf.data import get_tokenizer
from vkt_hf.explain import importance_map, render_html, render_png


def test_importance_map_matches_output_attentions(tmp_path):
    model = tiny_model("hybrid", vocab_size=259)
    tokenizer = get_tokenizer("byte")
    imap = importance_map(model, tokenizer, "It is a truth universally acknowledged")
    assert imap.layers == [0] and imap.scalars.shape == (1, 4, len(imap.tokens))
    ids = torch.tensor([[b + 3 for b in b"It is a truth universally acknowledged"]])
    with torch.no_grad():
        expected = model(ids, output_attentions=True).attentions[0][0]
    torch.testing.assert_close(imap.scalars[0], expected)
    page = render_html(imap)
    assert "truth" in "".join(imap.tokens) and page.count("<span title=") == len(imap.tokens) * (1 + 1 + 4)
    png = render_png(imap, tmp_path / "map.png")
    assert png.stat().st_size > 1000


def test_model_without_vkt_layers_is_refused():
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="no VKT layers"):
        importance_map(model, get_tokenizer("byte"), "hello")


def test_explain_cli_errors_are_clear(tmp_path, capsys):
    from vkt_hf import cli

    assert cli.main(["explain", str(tmp_path), "hello"]) == 2
    assert "cannot load a model" in capsys.readouterr().err
    assert cli.main(["explain", str(tmp_path), "--text-file", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_explain_cli_end_to_end(tmp_path):
    from vkt_hf import cli

    model = tiny_model("default", vocab_size=259)
    model.save_pretrained(tmp_path / "m")
    get_tokenizer("byte").save_pretrained(tmp_path / "m")
    out = tmp_path / "page.html"
    assert cli.main(["explain", str(tmp_path / "m"), "It is a truth", "--out", str(out)]) == 0
    page = out.read_text()
    assert (
        page.count('<span title="a = ') == len("It is a truth") * (1 + 2 * (1 + 4))
        and out.with_suffix(".png").exists()
    )
