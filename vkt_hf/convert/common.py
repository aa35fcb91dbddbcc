"""Shared logic of checkpoint conversion: which layers, which VKT options, how to swap a module.

A *family* (``gpt2.py``, ``llama.py``) knows three things about its architecture: where the
decoder layers are, what the attention slot of a layer is called, and how the pretrained
projections map onto a :class:`~vkt_hf.layers.VKTAttention`. Everything else lives here:
resolving ``layers`` and the VKT options, building the per-layer config, initialising the
new parameters, and swapping the modules in place.

See ``docs/conversion.md`` for the weight mapping and why new parameters start where they do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import initialization as init

from ..layers.vkt_attention import SUMMARY_BIAS_INIT, VKTAttention
from ..models.vkt.configuration_vkt import VKT_PRESETS, VKTConfig
from ..ops import functional as vkt

try:  # transformers >= 5: `output_attentions` is recorded by forward hooks keyed by module class
    from transformers.utils.output_capturing import install_output_capuring_hook as _install_capture_hook
except ImportError:  # pragma: no cover - older/newer transformers: scalar attentions are not recorded
    _install_capture_hook = None


class ConversionError(ValueError):
    """A model cannot be converted (unsupported architecture, bad layer list, bad option)."""


# On conversion the pretrained key and value projections are reused: the contexts are averaged over
# the keys (R = W_K x) and the attention gates the values (U = W_V x), the natural readings for a
# checkpoint that has them. Each converted layer also keeps exact softmax attention over a local
# window plus the first token (the sink), reusing the pretrained q/k/v inside the window: without it
# nothing in the layer is content-addressed and the model is lost (docs/conversion.md, "Quality").
# Pass `context_source="query"`, `local_attention=False` etc. to override.
CONVERSION_DEFAULTS: dict[str, Any] = {"context_source": "key", "gated_value": "value", "local_attention": True}
# options a converted layer accepts besides the preset fields
EXTRA_OPTIONS: dict[str, Any] = {
    "local_attention_window": 64,
    "sink_tokens": 1,
    "learned_sink": False,
    "local_attention_rope": True,
    "vkt_terms": True,
    "global_readout": "window",
    "local_window": 16,
    "eps": 1e-3,
    "accumulation_dtype": "float32",
    "mixer_chunk_size": 4096,
    "vkt_backend": "auto",
}
# how new parameters start (see docs/conversion.md, "Initialisation"); not stored in the saved config,
# the saved weights carry the result
INIT_DEFAULTS: dict[str, Any] = {"importance_init": "zeros", "readout_init": None}


@dataclass(frozen=True)
class Family:
    """How to convert one architecture family.

    Attributes:
        name: human name (for messages and docs).
        model_types: the ``config.model_type`` values it handles.
        layers: ``model -> nn.ModuleList`` of decoder layers (for the bare model or the LM).
        attention_name: attribute of a decoder layer holding its attention module.
        dims: ``config -> dict`` of ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
            ``head_dim``, ``attention_bias``.
        map_weights: ``(pretrained attention, new VKTAttention) -> None``: install the pretrained
            projections in the VKT module (sharing tensors where the layout matches).
        options: VKT options this family needs by default (GPT-2 has no RoPE).
    """

    name: str
    model_types: tuple[str, ...]
    layers: Callable[[nn.Module], nn.ModuleList]
    attention_name: str
    dims: Callable[[Any], dict[str, Any]]
    map_weights: Callable[[nn.Module, VKTAttention], None]
    options: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make ``family`` available to :func:`convert_to_vkt` for each of its model types."""
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


def supported_model_types() -> list[str]:
    """The ``model_type`` values :func:`convert_to_vkt` accepts."""
    return sorted(FAMILIES)


def family_for(config: Any) -> Family:
    """The :class:`Family` of a transformers config; raise :class:`ConversionError` listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        architectures = getattr(config, "architectures", None) or [type(config).__name__]
        raise ConversionError(
            f"cannot convert model_type {model_type!r} ({', '.join(architectures)}) to VKT; supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    return FAMILIES[model_type]


def resolve_layers(layers: str | int | Iterable[int], num_layers: int) -> list[int]:
    """Normalise ``layers`` to a sorted list of distinct indices in ``[0, num_layers)``.

    Accepts ``"all"``, ``"none"``, ``"even"``, ``"odd"``, a comma list with ranges (``"0,2,5-7"``),
    an int, or an iterable of ints. Negative indices count from the end.
    """
    if isinstance(layers, str):
        spec = layers.strip().lower()
        if spec == "all":
            return list(range(num_layers))
        if spec in ("none", ""):
            return []
        if spec in ("even", "odd"):
            return list(range(0 if spec == "even" else 1, num_layers, 2))
        indices: list[int] = []
        for part in spec.split(","):
            part = part.strip()
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                    indices.extend(range(int(lo), int(hi) + 1))
                else:
                    indices.append(int(part))
            except ValueError:
                raise ConversionError(
                    f"bad layer spec {layers!r}: use 'all', 'none', 'even', 'odd' or indices like '0,2,4' / '0-5'"
                ) from None
        layers = indices
    elif isinstance(layers, int):
        layers = [layers]
    out = set()
    for index in layers:
        if not -num_layers <= int(index) < num_layers:
            raise ConversionError(f"layer index {index} out of range for a model with {num_layers} layers")
        out.add(int(index) % num_layers)
    return sorted(out)


def resolve_vkt_options(preset: str = "default", family: Family | None = None, **options: Any) -> dict[str, Any]:
    """The complete VKT options of converted layers: ``preset``, conversion defaults, the family's, then ``options``.

    Returns a dict with ``preset``, every preset field, ``local_window``, ``eps`` and
    ``mixer_chunk_size`` (what the saved hybrid config records).
    """
    if preset not in VKT_PRESETS:
        raise ConversionError(f"`preset` must be one of {tuple(VKT_PRESETS)}, got {preset!r}")
    allowed = {*VKT_PRESETS[preset], *EXTRA_OPTIONS}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConversionError(f"unknown VKT option(s) {unknown}; known: {sorted(allowed)}")
    family_options = {} if family is None else family.options
    return {
        "preset": preset,
        **VKT_PRESETS[preset],
        **CONVERSION_DEFAULTS,
        **EXTRA_OPTIONS,
        **family_options,
        **options,
    }


def vkt_layer_config(dims: dict[str, Any], options: dict[str, Any]) -> VKTConfig:
    """A one-layer :class:`VKTConfig` carrying the base model's attention shapes and the VKT options.

    Only the fields :class:`VKTAttention` reads matter; building a ``VKTConfig`` validates them.
    """
    try:
        return VKTConfig(vocab_size=1, intermediate_size=1, num_hidden_layers=1, **dims, **options)
    except ValueError as err:
        raise ConversionError(f"invalid VKT options for this model: {err}") from err


@torch.no_grad()
def init_new_parameters(
    module: VKTAttention, importance_init: str = "zeros", readout_init: tuple[float, float] | None = None
) -> None:
    """Initialise the parameters a pretrained checkpoint does not have.

    - importance ``V`` (per head, ``(H, d)``): ``"zeros"`` makes every ``s_i = 0`` so the gated term
      ``a_i U_i`` starts at 0 and the global mean starts uniform (``softplus(0)`` weights), or
      ``"random"``: ``N(0, 1/d)`` like a fresh model.
    - null context / null value ``(H, d)``: zeros (the "empty context" before the first token).
    - decay logits ``(H,)``: half-lives log-spaced from 1 to 1024 tokens, as in a fresh model.
    - the bias of the global slot in the local attention window ``(H,)``: ``SUMMARY_BIAS_INIT``.
    - the learned sink's key and value ``(H, d)`` (``learned_sink=True``): zeros.
    - read-out gates (``Linear(hidden, 2H)``): weight 0, bias ``readout_init = (g_K, g_T)``. Default:
      ``(0, 0)`` with the local attention window, so the converted layer starts as exactly the
      pretrained attention inside the window (plus the sink) and the VKT terms grow from zero as
      they train; ``(0.5, 0.5)`` without it, a fixed mixture of the decayed global mean and the
      local mean of the pretrained values, a convex combination like the attention it replaces.
    """
    if readout_init is None:
        readout_init = (0.0, 0.0) if module.config.local_attention else (0.5, 0.5)
    if importance_init not in ("zeros", "random"):
        raise ConversionError(f"importance_init must be 'zeros' or 'random', got {importance_init!r}")
    # `transformers.initialization` leaves tensors loaded from a checkpoint (flagged `_is_hf_initialized`) alone
    if hasattr(module, "importance"):
        if importance_init == "zeros":
            init.zeros_(module.importance)
        else:
            init.normal_(module.importance, 0.0, 1.0 / math.sqrt(module.head_dim))
    if hasattr(module, "importance_proj"):
        if importance_init == "zeros":
            init.zeros_(module.importance_proj.weight)
        else:
            init.normal_(module.importance_proj.weight, 0.0, 1.0 / math.sqrt(module.config.hidden_size))
    init.zeros_(module.null_context)
    if hasattr(module, "null_value"):
        init.zeros_(module.null_value)
    if hasattr(module, "readout_gate"):
        heads = module.num_heads
        init.zeros_(module.readout_gate.weight)
        init.copy_(module.readout_gate.bias, torch.tensor(readout_init).repeat_interleave(heads))
    if hasattr(module, "decay_logit"):
        init.copy_(module.decay_logit, vkt.decay_logit_init(module.num_heads))
    if hasattr(module, "summary_bias"):
        init.constant_(module.summary_bias, SUMMARY_BIAS_INIT)
    if hasattr(module, "sink_key"):
        init.zeros_(module.sink_key)
        init.zeros_(module.sink_value)


def _reference_tensor(attention: nn.Module) -> torch.Tensor:
    return next(attention.parameters())


def build_vkt_attention(
    family: Family, attention: nn.Module, layer_config: VKTConfig, layer_idx: int, init: dict[str, Any]
) -> VKTAttention:
    """A :class:`VKTAttention` replacing ``attention``: pretrained projections installed, new parameters initialised.

    The module is allocated without initialisation (on the meta device, then materialised on the
    device of ``attention``), so nothing is wasted on random projections that are replaced.
    """
    ref = _reference_tensor(attention)
    with torch.device("meta"):
        module = VKTAttention(layer_config, layer_idx)
    module = module.to_empty(device=ref.device).to(ref.dtype)
    if ref.device.type != "meta":
        init_new_parameters(module, **init)
    family.map_weights(attention, module)
    # transformers re-initialises modules without this flag in post_init(); ours are initialised
    for sub in module.modules():
        sub._is_hf_initialized = True
    for param in module.parameters():
        param._is_hf_initialized = True
    if _install_capture_hook is not None:  # output_attentions=True records our scalar attentions (B, H, N)
        _install_capture_hook(module, "attentions", 1)
    return module


def convert_layers(
    model: nn.Module,
    layers: str | int | Iterable[int] = "all",
    preset: str = "default",
    progress: bool = False,
    importance_init: str = INIT_DEFAULTS["importance_init"],
    readout_init: tuple[float, float] = INIT_DEFAULTS["readout_init"],
    **vkt_options: Any,
) -> tuple[list[int], dict[str, Any]]:
    """Swap, in place, the attention of the chosen decoder layers of ``model`` for VKT layers.

    Args:
        model: a transformers model of a supported family (the LM or the bare model).
        layers: which layers (see :func:`resolve_layers`); the others stay exactly as they were.
        preset: VKT preset the options start from (``"default"`` or ``"paper"``).
        progress: show a progress bar over the layers.
        importance_init, readout_init: initialisation of new parameters (:func:`init_new_parameters`).
        **vkt_options: VKT options overriding the preset (``normalization``, ``local_window``, ...).

    Returns:
        ``(converted layer indices, resolved VKT options)``.
    """
    family = family_for(model.config)
    blocks = family.layers(model)
    indices = resolve_layers(layers, len(blocks))
    options = resolve_vkt_options(preset, family, **vkt_options)
    layer_config = vkt_layer_config(family.dims(model.config), options)
    init = {"importance_init": importance_init, "readout_init": None if readout_init is None else tuple(readout_init)}
    iterator: Iterable[int] = indices
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(indices, desc="converting layers to VKT", unit="layer")
    for index in iterator:
        attention = getattr(blocks[index], family.attention_name)
        if isinstance(attention, VKTAttention):
            raise ConversionError(f"layer {index} is already a VKT layer")
        setattr(
            blocks[index], family.attention_name, build_vkt_attention(family, attention, layer_config, index, init)
        )
    return indices, options
