"""Shared fixtures: tiny VKT configs, so every model test runs in well under a second."""

from __future__ import annotations

import pytest
import torch

import vkt_hf

# configs every model-level behaviour test runs on: the two presets, every option flipped,
# and hybrids with softmax and no-mixing layers
TINY_VARIANTS: dict[str, dict] = {
    "paper": dict(preset="paper"),
    "default": dict(preset="default"),
    "options": dict(
        preset="paper",
        normalization="softsign",
        importance="projection",
        context_source="key",
        gated_value="value",
        context_weights="uniform",
        distance_decay=True,
        readout=True,
        num_key_value_heads=2,
    ),
    "hybrid": dict(preset="default", num_hidden_layers=3, mixer_types=["vkt", "softmax", "none"]),
}


def tiny_config(**overrides) -> vkt_hf.VKTConfig:
    kwargs = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        local_window=3,
    )
    kwargs.update(overrides)
    return vkt_hf.VKTConfig(**kwargs)


def tiny_model(variant: str = "default", seed: int = 0, **overrides) -> vkt_hf.VKTForCausalLM:
    torch.manual_seed(seed)
    model = vkt_hf.VKTForCausalLM(tiny_config(**{**TINY_VARIANTS[variant], **overrides})).eval()
    # random (not initial) values for the parameters that start at zero
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "null_" in name or "readout_gate" in name:
                param.normal_(0.0, 0.5)
    return model


@pytest.fixture(params=list(TINY_VARIANTS))
def variant(request) -> str:
    return request.param
