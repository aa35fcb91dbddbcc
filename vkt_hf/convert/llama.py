"""Llama-like families: separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` linears.

Covers Llama, Mistral, Mixtral, Qwen2, Qwen3 (and their grouped-query variants). The VKT layer
uses the pretrained projection *modules themselves* (same tensors, no copy): ``Q = q_proj(x)``,
the context vectors ``R = k_proj(x)``, the gated vectors ``U = v_proj(x)``, output ``o_proj``.
Key/value heads are shared across query heads exactly as in GQA (``repeat_interleave``).

The local attention window (on by default for conversions) applies the model's own rotary
tables (``position_embeddings``) to its queries and keys, so inside the window the converted
layer computes exactly what the pretrained attention did. The VKT terms themselves have no
query-key products and use no rotation.

Qwen3 normalises each query and key head (``q_norm`` / ``k_norm``, RMSNorm over ``head_dim``)
before RoPE. Those norms set the scale of the pretrained keys, which feed the VKT contexts
and the denominator ``K . T``, so they are kept: the projection becomes a
:class:`HeadNormLinear` (the same ``weight`` / ``bias`` plus the pretrained norm as ``.norm``).

Decoder layers call ``self.self_attn(hidden_states=..., attention_mask=4-D mask or None,
position_embeddings=..., cache=..., ...)`` and take ``(output, weights)``, which is
:class:`VKTAttention`'s signature, so the VKT module sits in the ``self_attn`` slot directly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layers.vkt_attention import VKTAttention
from .common import Family, register_family

LLAMA_LIKE_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3")


class HeadNormLinear(nn.Linear):
    """``nn.Linear`` followed by a per-head norm over the last ``head_dim`` channels (Qwen3 q/k)."""

    def __init__(self, linear: nn.Linear, norm: nn.Module, head_dim: int):
        with torch.device("meta"):
            super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.weight = linear.weight  # shared with the pretrained projection
        self.bias = linear.bias
        self.norm = norm
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # (B, N, heads * d)
        return self.norm(y.view(*y.shape[:-1], -1, self.head_dim)).view(y.shape)


def map_llama_weights(attention: nn.Module, module: VKTAttention) -> None:
    """Install the pretrained projection modules (see module docstring)."""
    module.q_proj = attention.q_proj
    module.o_proj = attention.o_proj
    if hasattr(module, "k_proj"):
        module.k_proj = attention.k_proj
    if hasattr(module, "v_proj"):
        module.v_proj = attention.v_proj
    if hasattr(attention, "q_norm"):  # Qwen3
        module.q_proj = HeadNormLinear(attention.q_proj, attention.q_norm, module.head_dim)
        if hasattr(module, "k_proj"):
            module.k_proj = HeadNormLinear(attention.k_proj, attention.k_norm, module.head_dim)


def llama_dims(config: Any) -> dict[str, Any]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return dict(
        hidden_size=config.hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        attention_bias=bool(getattr(config, "attention_bias", False)),
    )


def llama_layers(model: nn.Module) -> nn.ModuleList:
    return getattr(model, "model", model).layers


LLAMA = register_family(
    Family(
        name="Llama-like (Llama, Mistral, Mixtral, Qwen2, Qwen3)",
        model_types=LLAMA_LIKE_MODEL_TYPES,
        layers=llama_layers,
        attention_name="self_attn",
        dims=llama_dims,
        map_weights=map_llama_weights,
    )
)
