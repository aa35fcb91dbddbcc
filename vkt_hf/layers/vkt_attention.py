"""``VKTAttention``: the VKT token mixer as an ``nn.Module`` (projections, masks, cache in/out).

The math is in :mod:`vkt_hf.ops.functional`; this module only projects, reshapes and
carries state. Projections are named like Llama's (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``) so a converted checkpoint reuses its pretrained weights.

The module's call signature accepts what both ``VKTModel`` and the attention slot of a
transformers decoder layer pass (``cache`` or ``past_key_values``, 2-D or 4-D masks,
``position_embeddings``, ...), so the same class serves native and converted models.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import initialization as init

from .. import ops
from ..cache import VKTState, vkt_state_layer
from ..ops import functional as vkt


def padding_mask(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """The ``(B, N)`` 0/1 mask of real tokens among the ``N`` new positions.

    Accepts the 2-D ``(B, past + N)`` padding mask, or the 4-D ``(B, 1, N, past + N)`` mask a
    transformers decoder layer gets (boolean "may attend", or additive 0 / -inf): new token
    ``i`` is real exactly when query ``i`` may attend to its own key (the diagonal of the new
    block), which also holds for sliding-window masks.
    """
    if attention_mask is None:
        return torch.ones(batch, length, device=device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 4):
        raise ValueError(
            "VKT layers need a 2-D padding mask (batch, tokens) or a 4-D tensor mask (batch, 1, queries, keys), got "
            f"{type(attention_mask).__name__} {tuple(getattr(attention_mask, 'shape', ()))}; load converted models "
            "with attn_implementation='sdpa' or 'eager' (flex attention's BlockMask is not supported)"
        )
    if attention_mask.dim() == 2:
        return attention_mask[:, -length:].to(device=device, dtype=torch.float32)
    diagonal = attention_mask[:, 0, -length:, -length:].diagonal(dim1=-2, dim2=-1)  # (B, N)
    keep = diagonal if diagonal.dtype == torch.bool else diagonal == 0
    return keep.to(device=device, dtype=torch.float32)


def vkt_layers(model: nn.Module) -> list[VKTAttention]:
    """The VKT attention modules of any model (native or converted), in layer order."""
    return sorted((m for m in model.modules() if isinstance(m, VKTAttention)), key=lambda m: m.layer_idx)


@torch.no_grad()
def init_vkt_parameters(layer: VKTAttention) -> None:
    """Initialise the parameters VKT adds to attention (used by models and by conversion).

    ``V ~ N(0, 1/d)`` so ``s = Q . V`` has the scale of one coordinate of ``Q``; the null
    context/value start at zero (an uninformative first-token context); decays start at
    half-lives log-spaced from 1 to 1024 tokens, so heads see recent and long-range means.
    Tensors already loaded from a checkpoint are left alone.
    """
    if hasattr(layer, "importance"):
        init.normal_(layer.importance, 0.0, 1.0 / math.sqrt(layer.head_dim))
    init.zeros_(layer.null_context)
    if hasattr(layer, "null_value"):
        init.zeros_(layer.null_value)
    if hasattr(layer, "decay_logit"):
        init.copy_(layer.decay_logit, vkt.decay_logit_init(layer.num_heads))


class VKTAttention(nn.Module):
    """Multi-head VKT-Attention.

    Args:
        config: any config with ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
            ``head_dim``, ``attention_bias`` and the VKT options of [`VKTConfig`].
        layer_idx: index of the decoder layer (where its state lives in the cache).
    """

    def __init__(self, config: Any, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.local_window = config.local_window
        self.causal = config.causal
        hidden, heads, kv_heads, dim = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        bias = config.attention_bias

        self.q_proj = nn.Linear(hidden, heads * dim, bias=bias)
        self.o_proj = nn.Linear(heads * dim, hidden, bias=bias)
        if config.context_source == "key":
            self.k_proj = nn.Linear(hidden, kv_heads * dim, bias=bias)
        if config.gated_value == "value" or config.readout:
            self.v_proj = nn.Linear(hidden, kv_heads * dim, bias=bias)
        if config.importance == "parameter":
            self.importance = nn.Parameter(torch.randn(heads, dim) / math.sqrt(dim))  # V_h
        else:
            self.importance_proj = nn.Linear(hidden, heads * dim, bias=False)  # V_i = W_V x_i
        # the null context token in front of every sequence: (context part, value part)
        self.null_context = nn.Parameter(torch.zeros(heads, dim))
        if config.readout:
            self.null_value = nn.Parameter(torch.zeros(heads, dim))
            self.readout_gate = nn.Linear(hidden, 2 * heads, bias=True)  # per token & head: g_K, g_T
        if config.distance_decay:
            self.decay_logit = nn.Parameter(vkt.decay_logit_init(heads))  # gamma_h = sigmoid(decay_logit)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """``(B, N, heads * d)`` -> ``(B, H, N, d)``, repeating key/value heads for GQA."""
        batch, length, _ = x.shape
        x = x.view(batch, length, heads, self.head_dim).transpose(1, 2)
        if heads != self.num_heads:
            x = x.repeat_interleave(self.num_heads // heads, dim=1)
        return x

    def log_decay(self) -> torch.Tensor | None:
        """``log(gamma_h)`` per head ``(H,)``, or ``None`` without distance decay."""
        if not self.config.distance_decay:
            return None
        return nn.functional.logsigmoid(self.decay_logit.float())

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mix ``hidden_states`` ``(B, N, hidden)``.

        Args:
            attention_mask: 2-D padding mask ``(B, past + N)`` or a transformers 4-D mask.
            cache: a ``VKTCache`` / ``DynamicCache`` (``past_key_values`` is accepted too); the
                layer reads and writes its state at ``layer_idx``.
            output_attentions: also return the scalar attentions (always returned here; the
                flag is accepted for API compatibility).

        Returns:
            ``(output (B, N, hidden), a (B, H, N))``.
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden_states must have shape (batch, tokens, {self.config.hidden_size}), got {tuple(hidden_states.shape)}"
            )
        if cache is None:
            cache = kwargs.get("past_key_values")
        batch, length, _ = hidden_states.shape
        mask = padding_mask(attention_mask, batch, length, hidden_states.device)
        slot = None
        state = None
        if cache is not None:
            if not self.causal:
                raise ValueError("a cache can only be used with causal VKT layers")
            slot = vkt_state_layer(cache, self.layer_idx)
            state = slot.state
        chunk = self.config.mixer_chunk_size if self.causal else length
        outputs, scalars = [], []
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            out, a, state = self._mix(hidden_states[:, start:end], mask[:, start:end], state)
            outputs.append(out)
            scalars.append(a)
        if slot is not None:
            slot.update_state(state, length)
        output = self.o_proj(torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0])
        return output, torch.cat(scalars, dim=-1).to(hidden_states.dtype)

    def _mix(
        self, x: torch.Tensor, mask: torch.Tensor, state: VKTState | None
    ) -> tuple[torch.Tensor, torch.Tensor, VKTState | None]:
        """One chunk: ``x`` ``(B, N, hidden)`` -> mixed heads ``(B, N, H*d)``, ``a`` ``(B, H, N)``, new state."""
        config = self.config
        batch, length, _ = x.shape
        acc = torch.float64 if config.accumulation_dtype == "float64" else torch.float32
        query = self._heads(self.q_proj(x), self.num_heads).to(acc)  # Q: (B, H, N, d)
        if config.importance == "parameter":
            scores = vkt.importance_scores(query, self.importance)  # s: (B, H, N)
        else:
            scores = vkt.importance_scores(query, self._heads(self.importance_proj(x), self.num_heads))
        context = (
            self._heads(self.k_proj(x), self.num_kv_heads).to(acc) if config.context_source == "key" else query
        )  # R: (B, H, N, d)
        values = self._heads(self.v_proj(x), self.num_kv_heads).to(acc) if hasattr(self, "v_proj") else None
        gated = values if config.gated_value == "value" else query  # U

        # the context stream: R, with the value vectors alongside when they are read out
        stream, null = context, self.null_context
        if config.readout:
            stream = torch.cat([context, values], dim=-1)  # (B, H, N, 2d)
            null = torch.cat([self.null_context, self.null_value], dim=-1)  # (H, 2d)
        weights = vkt.context_weights(scores, config.context_weights)  # w: (B, H, N)
        g_state = None if state is None else (state.weighted_sum, state.weight_total)
        l_state = None if state is None else (state.window, state.window_mask)
        backend = getattr(config, "vkt_backend", None)  # reference | fused | triton | auto (see vkt_hf.ops)
        global_ctx, g_state = ops.global_context(
            stream, weights, mask, null, self.log_decay(), causal=self.causal, state=g_state, backend=backend
        )  # (B, H, N, D)
        local_ctx, l_state = ops.local_context(
            stream, mask, null, self.local_window, causal=self.causal, state=l_state, backend=backend
        )  # (B, H, N, D)
        d = self.head_dim
        a = vkt.scalar_attention(scores, global_ctx[..., :d], local_ctx[..., :d], config.eps, config.normalization)
        mixed = a.unsqueeze(-1) * gated  # a_i * U_i: (B, H, N, d)
        if config.readout:
            gates = self.readout_gate(x).to(acc).view(batch, length, 2, self.num_heads).permute(2, 0, 3, 1)
            mixed = mixed + gates[0].unsqueeze(-1) * global_ctx[..., d:] + gates[1].unsqueeze(-1) * local_ctx[..., d:]
        mixed = mixed.to(x.dtype).transpose(1, 2).reshape(batch, length, self.num_heads * d)
        new_state = VKTState(g_state[0], g_state[1], l_state[0], l_state[1]) if self.causal else None
        return mixed, a, new_state
