"""A converted hybrid behaves like its base model: loading reports what a checkpoint lacks, the hybrid's config
settings reach the wrapped model, and ``device_map="auto"`` splits it where it splits the base."""

from __future__ import annotations

import json
import re

import torch
from accelerate import infer_auto_device_map
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import vkt_hf
from tests.helpers import tiny_base, tiny_hybrid
from vkt_hf.layers import vkt_layers

NEW = ("importance", "null_context", "null_value", "decay_logit", "summary_bias", "readout_gate")


def ids() -> torch.Tensor:
    return torch.randint(3, 61, (2, 9), generator=torch.Generator().manual_seed(0))


def drop_vkt_tensors(directory) -> set[str]:
    """Remove the VKT layers' new tensors from a saved checkpoint; return their names."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    dropped = {name for name in tensors if any(f".{part}" in name for part in NEW)}
    save_file({k: v for k, v in tensors.items() if k not in dropped}, path, metadata={"format": "pt"})
    return dropped


def test_missing_vkt_tensors_are_reported_and_initialised(tmp_path):
    hybrid = tiny_hybrid("llama", layers=(1, 3))
    hybrid.save_pretrained(tmp_path)
    dropped = drop_vkt_tensors(tmp_path)
    assert dropped
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == dropped
    assert all(p.device.type == "cpu" for p in reloaded.parameters())
    # initialised as a fresh conversion starts them, so the model runs and matches the original
    for ours, theirs in zip(vkt_layers(reloaded), vkt_layers(hybrid)):
        for name, param in theirs.named_parameters():
            torch.testing.assert_close(dict(ours.named_parameters())[name], param)
    torch.testing.assert_close(reloaded(ids()).logits, hybrid(ids()).logits)


def test_changed_vkt_layers_in_config_json_report_missing_and_unexpected(tmp_path):
    tiny_hybrid("llama", layers=(1, 3)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vkt_layers"] = [0, 1]  # layer 0 becomes VKT, layer 3 no longer is
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] and all(k.startswith("model.model.layers.0.") for k in info["missing_keys"])
    assert info["unexpected_keys"] and all(k.startswith("model.model.layers.3.") for k in info["unexpected_keys"])
    assert torch.isfinite(reloaded(ids()).logits).all()


def test_hybrid_config_settings_reach_the_wrapped_model(tmp_path):
    tiny_hybrid("llama", layers=(1,)).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, output_hidden_states=True)
    assert len(model(ids()).hidden_states) == 5  # embeddings + 4 layers
    model.config.output_hidden_states = False
    assert model(ids()).hidden_states is None
    model.config.return_dict = False
    assert isinstance(model(ids(), use_cache=False), tuple)
    model.config.return_dict = True
    model.config.use_cache = False
    assert getattr(model(ids()), vkt_hf.utils.CACHE_FIELD) is None
    # tie_word_embeddings: the hybrid's setting decides whether the head and the embeddings are one tensor
    tied_dir = tmp_path / "tied"
    vkt_hf.convert_to_vkt(tiny_base("llama", tie_word_embeddings=True), layers=[1]).save_pretrained(tied_dir)
    tied = AutoModelForCausalLM.from_pretrained(tied_dir)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    untied = AutoModelForCausalLM.from_pretrained(tied_dir, tie_word_embeddings=False)
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight
    config = AutoConfig.from_pretrained(tmp_path)  # saved untied
    config.tie_word_embeddings = True
    built = AutoModelForCausalLM.from_config(config)
    assert built.get_output_embeddings().weight is built.get_input_embeddings().weight


def test_no_split_modules_come_from_the_base_model(tmp_path):
    base = tiny_base("llama")
    hybrid = vkt_hf.convert_to_vkt(tiny_base("llama"), layers=[1])
    assert hybrid._no_split_modules == set(base._no_split_modules) == {"LlamaDecoderLayer"}
    hybrid.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path)._no_split_modules == {"LlamaDecoderLayer"}
    # device_map="auto" on two devices with room for half the model: decoder layers stay whole
    size = sum(p.numel() * p.element_size() for p in hybrid.parameters())
    device_map = infer_auto_device_map(
        hybrid, max_memory={0: size // 2, "cpu": 4 * size}, no_split_module_classes=list(hybrid._no_split_modules)
    )
    assert set(device_map.values()) == {0, "cpu"}
    assert not [name for name in device_map if re.search(r"layers\.\d+\.", name)], device_map
