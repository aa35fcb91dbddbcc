"""Convert pretrained GPT-2 and Llama-family checkpoints to VKT (whole or hybrid).

>>> import vkt_hf
>>> from transformers import AutoModelForCausalLM
>>> base = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
>>> hybrid = vkt_hf.convert_to_vkt(base, layers="even")       # half the layers VKT
>>> hybrid.save_pretrained("smollm2-vkt-half")                # AutoModelForCausalLM reloads it

See ``docs/conversion.md``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from . import gpt2, llama  # noqa: F401  (register the families)
from .common import (
    CONVERSION_DEFAULTS,
    FAMILIES,
    INIT_DEFAULTS,
    ConversionError,
    convert_layers,
    family_for,
    resolve_layers,
    resolve_vkt_options,
    supported_model_types,
)


def convert_to_vkt(
    model: nn.Module,
    layers: str | int | Iterable[int] = "all",
    preset: str = "default",
    *,
    progress: bool = False,
    importance_init: str = INIT_DEFAULTS["importance_init"],
    readout_init: tuple[float, float] = INIT_DEFAULTS["readout_init"],
    **vkt_options: Any,
) -> nn.Module:
    """Replace the attention of the chosen decoder layers of a loaded model by VKT-Attention.

    The swap is done in place: the listed layers get a :class:`~vkt_hf.layers.VKTAttention` that
    reuses the pretrained projections; every other layer, and everything else in the model, is
    left exactly as it was.

    Args:
        model: a ``GPT2LMHeadModel`` / ``GPT2Model`` or a Llama-family model (Llama, Mistral,
            Mixtral, Qwen2, Qwen3; ``*ForCausalLM`` or the bare ``*Model``).
        layers: ``"all"``, ``"none"``, ``"even"``, ``"odd"``, ``"0,2,5-7"`` or a list of indices.
        preset: ``"default"`` or ``"paper"``; conversion then reuses the pretrained keys and values
            (``context_source="key"``, ``gated_value="value"``) unless you override them.
        progress: show a progress bar.
        importance_init: ``"zeros"`` (default) or ``"random"``: start of the importance vectors ``V``.
        readout_init: ``(g_K, g_T)`` initial read-out gates (when ``readout`` is on).
        **vkt_options: any VKT option (``normalization``, ``local_window``, ``distance_decay``, ...).

    Returns:
        For a causal LM, a :class:`~vkt_hf.VKTHybridForCausalLM` wrapping ``model`` (its
        ``save_pretrained`` writes the hybrid format that ``AutoModelForCausalLM`` reloads). For a
        bare decoder (``GPT2Model``, ``LlamaModel``), ``model`` itself, converted in place.

    Raises:
        ConversionError: unsupported architecture (the message lists the supported ones), bad
            layer indices or options.
    """
    from ..models.vkt_hybrid import VKTHybridForCausalLM

    if isinstance(model, VKTHybridForCausalLM):
        raise ConversionError("this model is already a converted VKT hybrid")
    indices, options = convert_layers(
        model,
        layers,
        preset=preset,
        progress=progress,
        importance_init=importance_init,
        readout_init=readout_init,
        **vkt_options,
    )
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        return model
    return VKTHybridForCausalLM.from_converted(model, indices, options)


__all__ = [
    "CONVERSION_DEFAULTS",
    "FAMILIES",
    "ConversionError",
    "convert_to_vkt",
    "family_for",
    "resolve_layers",
    "resolve_vkt_options",
    "supported_model_types",
]
