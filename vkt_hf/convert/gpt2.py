"""GPT-2: the fused, transposed ``c_attn`` Conv1D splits into ``q_proj`` / ``k_proj`` / ``v_proj``.

GPT-2's ``Conv1D`` computes ``y = x @ W + b`` with ``W`` of shape ``(hidden, 3 * hidden)``
(the transpose of an ``nn.Linear`` weight), columns ordered ``[query | key | value]``. So::

    q_proj.weight = c_attn.weight[:, 0h:1h].T    q_proj.bias = c_attn.bias[0h:1h]
    k_proj.weight = c_attn.weight[:, 1h:2h].T    k_proj.bias = c_attn.bias[1h:2h]
    v_proj.weight = c_attn.weight[:, 2h:3h].T    v_proj.bias = c_attn.bias[2h:3h]
    o_proj.weight = c_proj.weight.T              o_proj.bias = c_proj.bias

``GPT2Block`` calls ``self.attn(hidden_states, cache=..., attention_mask=4-D mask or None, ...)``
and unpacks ``(output, weights)``, which is exactly :class:`VKTAttention`'s signature, so the
VKT module sits in the ``attn`` slot directly. GPT-2 has no RoPE (its positions are added to the input embeddings), so the local attention
window runs without rotation. GPT-2's attention/residual dropout is not kept
(conversion targets inference and fine-tuning from the converted weights).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layers.vkt_attention import VKTAttention
from .common import Family, register_family


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding a copy of ``weight`` ``(in, out)`` (Conv1D layout) and ``bias`` ``(out,)``."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None)
    linear.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return linear


def map_gpt2_weights(attention: nn.Module, module: VKTAttention) -> None:
    """Split ``c_attn`` into q/k/v and transpose ``c_proj`` into ``o_proj`` (see module docstring)."""
    hidden = attention.embed_dim
    weight, bias = attention.c_attn.weight, attention.c_attn.bias  # (hidden, 3 * hidden), (3 * hidden,)
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        if i == 0 or hasattr(module, name):  # k/v only when the VKT options use them
            setattr(
                module, name, _linear(weight[:, i * hidden : (i + 1) * hidden], bias[i * hidden : (i + 1) * hidden])
            )
    module.o_proj = _linear(attention.c_proj.weight, attention.c_proj.bias)


def gpt2_dims(config: Any) -> dict[str, Any]:
    heads = config.n_head
    return dict(
        hidden_size=config.n_embd,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=config.n_embd // heads,
        attention_bias=True,
    )


def gpt2_layers(model: nn.Module) -> nn.ModuleList:
    return getattr(model, "transformer", model).h


GPT2 = register_family(
    Family(
        name="GPT-2",
        model_types=("gpt2",),
        layers=gpt2_layers,
        attention_name="attn",
        dims=gpt2_dims,
        map_weights=map_gpt2_weights,
        options={"local_attention_rope": False},  # GPT-2 adds learned positions to the input instead
    )
)
