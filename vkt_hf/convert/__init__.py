"""The conversion families: how the attention of a GPT-2 or Llama-family model becomes VKT.

One file per family (``gpt2.py``, ``llama.py``) and the shared logic (``common.py``: which
layers, which options, how a module is swapped in place). Importing this package registers
the families. The user-facing entry point, :func:`vkt_hf.convert_to_vkt`, sits one level up,
beside the model it returns (:mod:`vkt_hf.models.vkt_hybrid`), so the dependencies run one way:
families -> hybrid model -> ``convert_to_vkt``.

See ``docs/conversion.md``.
"""

from __future__ import annotations

from . import gpt2, llama  # noqa: F401  (register the families)
from .common import (
    CONVERSION_DEFAULTS,
    FAMILIES,
    INIT_DEFAULTS,
    ConversionError,
    Family,
    convert_layers,
    family_for,
    resolve_layers,
    resolve_vkt_options,
    supported_model_types,
)

__all__ = [
    "CONVERSION_DEFAULTS",
    "FAMILIES",
    "INIT_DEFAULTS",
    "ConversionError",
    "Family",
    "convert_layers",
    "family_for",
    "resolve_layers",
    "resolve_vkt_options",
    "supported_model_types",
]
