"""``VKTAttention``: the VKT token mixer as an ``nn.Module`` (projections, masks, cache in/out).

The math is in :mod:`vkt_hf.ops.functional`; :func:`mix` is the whole mixing step after the
projections (one free function, called by the layer and the benchmarks); the module only
projects, reshapes and carries state. Projections are named like Llama's (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``) so a converted checkpoint reuses its pretrained weights.

The module's call signature accepts what both ``VKTModel`` and the attention slot of a
transformers decoder layer pass (``cache`` or ``past_key_values``, 2-D or 4-D masks,
``position_embeddings``, ...), so the same class serves native and converted models.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers import initialization as init

from .. import ops
from ..cache import VKTState, vkt_state_layer
from ..ops import functional as vkt
from ..utils import sequence_starts
from . import decode


def padding_mask(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """The ``(B, N)`` 0/1 mask of real tokens among the ``N`` new positions.

    Accepts the 2-D ``(B, past + N)`` padding mask, or the 4-D ``(B, 1, N, past + N)`` mask a
    transformers decoder layer gets (boolean "may attend", or additive 0 / -inf): new token
    ``i`` is real exactly when query ``i`` may attend to its own key (the diagonal of the new
    block), which also holds for sliding-window masks.

    A 2-D mask must hold only 0 (padding) and 1 (real tokens), with no padding between real
    tokens (a *hole*): see :func:`check_padding_mask`.
    """
    if attention_mask is None:
        return torch.ones(batch, length, device=device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 4):
        raise ValueError(
            "VKT layers need a 2-D padding mask (batch, tokens) or a 4-D tensor mask (batch, 1, queries, keys), got "
            f"{type(attention_mask).__name__} {tuple(getattr(attention_mask, 'shape', ()))}; load converted models "
            "with attn_implementation='sdpa' or 'eager' (flex attention's BlockMask is not supported)"
        )
    if attention_mask.shape[0] != batch or attention_mask.shape[-1] < length:
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not fit {batch} sequences of {length} new tokens"
        )
    if attention_mask.dim() == 2:
        check_padding_mask(attention_mask)
        return attention_mask[:, -length:].to(device=device, dtype=torch.float32)
    if attention_mask.shape[-2] != length:
        raise ValueError(f"the 4-D attention_mask has {attention_mask.shape[-2]} queries, the input {length} tokens")
    diagonal = attention_mask[:, 0, -length:, -length:].diagonal(dim1=-2, dim2=-1)  # (B, N)
    keep = diagonal if diagonal.dtype == torch.bool else diagonal == 0
    return keep.to(device=device, dtype=torch.float32)


#: the last 2-D mask found valid and its version: every layer of one forward gets the same tensor,
#: so the check runs once per forward (once per decoding step), not once per layer
_CHECKED: tuple[weakref.ref, int] | None = None


def check_padding_mask(mask: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the 2-D ``mask`` ``(B, tokens)`` holds only 0 and 1 and has no hole.

    Not 0/1: a mask of 2s, -1s or an additive 0 / -inf mask would otherwise be used as weights.
    A hole (padding after a real token and before another: a right-padded prompt continued with a
    cache, or padding in the middle) is refused because padding is *not context*: a padded
    position takes no slot of any window and does not age the decay, which only left padding (and
    right padding, with nothing real after it) makes consistent. See ``docs/method.md``.
    """
    global _CHECKED
    if _CHECKED is not None and _CHECKED[0]() is mask and _CHECKED[1] == mask._version:
        return
    real = mask != 0
    not_binary = torch.zeros_like(real) if mask.dtype == torch.bool else ~((mask == 0) | (mask == 1))
    after_real = real.long().cumsum(-1) > 0
    before_real = real.flip(-1).long().cumsum(-1).flip(-1) > 0
    hole = ~real & after_real & before_real
    if not bool((not_binary | hole).any()):
        _CHECKED = (weakref.ref(mask), mask._version)
        return
    if bool(not_binary.any()):
        values = sorted({float(v) for v in mask[not_binary].unique()[:4].tolist()})
        raise ValueError(
            f"attention_mask must hold 1 for real tokens and 0 for padding, got values {values}; pass the 0/1 "
            "padding mask (as the tokenizer returns it), not an additive or weighted mask"
        )
    row, position = (int(i) for i in hole.nonzero()[0])
    raise ValueError(
        f"attention_mask row {row} has padding at position {position} between real tokens; VKT layers take left "
        "padding (and right padding with nothing real after it): pad on the left (tokenizer.padding_side='left')"
    )


#: start of the per-head bias of the global slot in the window: the far tokens' mass starts at
#: exp(-6) ~ 0.25 % of what their count and mean key suggest, a small but trainable share. Untrained
#: all-layer SmolLM2 on tests/fixtures/passage.txt: 32.62 with the slot hidden, 32.59 at -6, 34.6 at -4,
#: 73 at -2, 396 at 0.
SUMMARY_BIAS_INIT = -6.0


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
    if hasattr(layer, "readout_gate") and layer.config.local_attention:
        # the exact window carries the layer at first; the VKT read-out starts switched off
        init.zeros_(layer.readout_gate.weight)
        init.zeros_(layer.readout_gate.bias)
    if hasattr(layer, "null_value"):
        init.zeros_(layer.null_value)
    if hasattr(layer, "decay_logit"):
        init.copy_(layer.decay_logit, vkt.decay_logit_init(layer.num_heads))
    if hasattr(layer, "summary_bias"):
        init.constant_(layer.summary_bias, SUMMARY_BIAS_INIT)
    if hasattr(layer, "sink_key"):  # logit 0, value 0: the sink starts as one token of zero value
        init.zeros_(layer.sink_key)
        init.zeros_(layer.sink_value)


@dataclass
class Projections:
    """What the projections give :func:`mix`, per token (``Hk`` key/value heads, accumulation dtype).

    ``query`` ``Q`` (B, H, N, d); ``scores`` ``s`` (B, H, N); ``context`` ``R`` (B, H, N, d);
    ``gated`` ``U`` (B, H, N, d); ``values`` (B, H, N, d) for the read-out, ``gates`` (2, B, H, N)
    its gates; with the local attention window, ``window_query`` (B, H, N, d) and
    ``window_keys`` / ``window_values`` (B, Hk, N, d), RoPE applied where the model has it.
    """

    query: torch.Tensor
    scores: torch.Tensor
    context: torch.Tensor
    gated: torch.Tensor
    values: torch.Tensor | None = None
    gates: torch.Tensor | None = None
    window_query: torch.Tensor | None = None
    window_keys: torch.Tensor | None = None
    window_values: torch.Tensor | None = None

    def chunk(self, start: int, end: int) -> Projections:
        """Tokens ``start:end`` of every tensor (the token axis is the last but one, or last for scores)."""

        def cut(t: torch.Tensor | None, name: str) -> torch.Tensor | None:
            if t is None:
                return None
            return t[..., start:end] if name in ("scores", "gates") else t[..., start:end, :]

        return Projections(**{f.name: cut(getattr(self, f.name), f.name) for f in fields(self)})

    def row(self, b: int) -> Projections:
        """Batch row ``b`` alone, as a batch of one (``gates`` has the batch second)."""
        pick = slice(b, b + 1)

        def cut(t: torch.Tensor | None, name: str) -> torch.Tensor | None:
            return None if t is None else (t[:, pick] if name == "gates" else t[pick])

        return Projections(**{f.name: cut(getattr(self, f.name), f.name) for f in fields(self)})


def mix(
    proj: Projections,
    mask: torch.Tensor,
    state: VKTState | None,
    layer: VKTAttention,
) -> tuple[torch.Tensor, torch.Tensor, VKTState | None]:
    """The VKT mixing step after the projections, for one chunk of tokens.

    Per head and token (``docs/method.md``)::

        a_i = norm(s_i / guard(K_i . T_i))                       scalar attention
        y_i = a_i U_i + gK_i Kv_i + gT_i Tv_i + Attn_i            (read-out terms if `readout`,
                                                                  Attn_i if `local_attention`)

    ``Attn_i`` is exact softmax attention over the last ``local_attention_window`` tokens and
    the first ``sink_tokens`` tokens (the sink).

    Args:
        proj: the chunk's :class:`Projections`.
        mask: ``(B, N)`` float, 1 for real tokens.
        state: the state after the previous chunk, or ``None`` at the start.
        layer: the module (its options and the parameters ``null_context``, ``null_value``,
            ``decay_logit``).

    Returns:
        ``(mixed heads (B, H, N, d), a (B, H, N), new state)`` (the state is ``None`` for
        bidirectional layers).
    """
    config = layer.config
    if not config.vkt_terms:  # the window alone (a baseline, or the VKT part switched off)
        attended, new_state = _window_attention(proj, mask.bool(), state, VKTState(None, None, None, None), layer)
        return attended, proj.scores.new_zeros(proj.scores.shape), new_state
    d = proj.query.shape[-1]
    stream, null = proj.context, layer.null_context
    if config.readout:  # the value vectors ride along in the same sums
        stream = torch.cat([proj.context, proj.values], dim=-1)  # (B, H, N, 2d)
        null = torch.cat([layer.null_context, layer.null_value], dim=-1)  # (H, 2d)
    weights = vkt.context_weights(proj.scores, config.context_weights)  # w: (B, H, N)
    g_state = None if state is None else (state.weighted_sum, state.weight_total)
    l_state = None if state is None else (state.window, state.window_mask)
    backend = config.vkt_backend
    global_ctx, g_state = ops.global_context(
        stream, weights, mask, null, layer.log_decay(), causal=layer.causal, state=g_state, backend=backend
    )  # (B, H, N, D)
    local_ctx, l_state = _local_context(stream, mask, null, l_state, layer)  # (B, H, N, D)
    # the context and value parts as one split each (its backward is one concatenation; slicing twice would
    # zero-fill and copy two full-size gradients)
    global_ctx, global_values = global_ctx.split(d, dim=-1) if config.readout else (global_ctx, None)
    local_ctx, local_values = local_ctx.split(d, dim=-1) if config.readout else (local_ctx, None)
    a = vkt.scalar_attention(proj.scores, global_ctx, local_ctx, config.eps, config.normalization)
    mixed = a.unsqueeze(-1) * proj.gated  # a_i * U_i: (B, H, N, d)
    # the read-out's global mean as one slot of the window's softmax (no read-out: no slot)
    in_window = config.readout and config.local_attention and config.global_readout == "window"
    if config.readout:
        gates = proj.gates.unsqueeze(-1)  # (2, B, H, N, 1)
        mixed = torch.addcmul(mixed, gates[1], local_values)
        if not in_window:
            mixed = torch.addcmul(mixed, gates[0], global_values)
    if not layer.causal:
        return mixed, a, None
    new_state = VKTState(g_state[0], g_state[1], l_state[0], l_state[1])
    if config.local_attention:
        summary = (global_ctx, global_values) if in_window else None
        attended, new_state = _window_attention(proj, mask.bool(), state, new_state, layer, summary)
        mixed = mixed + attended
    return mixed, a, new_state


def _local_context(
    stream: torch.Tensor,
    mask: torch.Tensor,
    null: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None,
    layer: VKTAttention,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``T`` ``(B, H, N, D)`` of ``stream`` and the new local state, summed once per key/value head where it can be.

    With keys as the context (``context_source="key"``) every query head of a group sums copies of the
    same vectors (its key/value head's keys, and values), so the window sums run over the ``Hk`` key/value
    heads and are broadcast to the ``G`` heads of each group: the same numbers, ``G`` times less work. Only
    the null vector (per query head) differs, where a token has no real token in its window.
    """
    config = layer.config
    heads, kv_heads = layer.num_heads, layer.num_kv_heads
    window = layer.local_window
    if heads == kv_heads or config.context_source != "key" or not layer.causal:
        return ops.local_context(
            stream, mask, null, window, causal=layer.causal, state=state, backend=config.vkt_backend
        )
    batch, _, length, dim = stream.shape
    group = heads // kv_heads
    one = (slice(None), slice(None), 0)  # the first head of each group: (B, Hk, ...)
    kv_state = None if state is None else (state[0].unflatten(1, (kv_heads, group))[one], state[1])
    local, (last, last_mask) = ops.local_context(
        stream.unflatten(1, (kv_heads, group))[one],
        mask,
        null.unflatten(0, (kv_heads, group))[:, 0],
        window,
        causal=True,
        state=kv_state,
        backend=config.vkt_backend,
    )  # (B, Hk, N, D)
    # real tokens among the n positions before each token (history first): a difference of integer prefix sums
    before = mask.new_zeros(batch, window) if state is None else state[1]
    real = torch.cat([before != 0, mask != 0], dim=-1).to(torch.int64)  # (B, n + N)
    prefix = torch.nn.functional.pad(real.cumsum(-1), (1, 0))  # prefix[k]: real tokens among the first k
    seen = (prefix[:, window : window + length] - prefix[:, :length]) > 0  # (B, N)
    null = null.to(local.dtype).view(1, kv_heads, group, 1, dim)
    local = torch.where(seen[:, None, None, :, None], local.unsqueeze(2), null).flatten(1, 2)  # (B, H, N, D)
    last = last.unsqueeze(2).expand(batch, kv_heads, group, *last.shape[-2:]).flatten(1, 2)
    return local, (last, last_mask)


def mix_packed(
    proj: Projections, mask: torch.Tensor, starts: torch.Tensor, layer: VKTAttention
) -> tuple[torch.Tensor, torch.Tensor, VKTState | None]:
    """:func:`mix` over packed rows: each sequence of a row mixes from a fresh state, exactly as if alone.

    ``starts`` ``(B, N)`` marks the tokens that start a sequence after another one in their row
    (:func:`vkt_hf.utils.sequence_starts`, from ``position_ids`` or ``cu_seq_lens``). A row is cut there,
    and every ``mixer_chunk_size`` tokens inside a sequence (carrying its state). Returns the mixed heads
    ``(B, H, N, d)``, ``a`` ``(B, H, N)`` and the rows' states after their last sequence.
    """
    length = mask.shape[-1]
    chunk = layer.config.mixer_chunk_size if layer.causal else length
    outs, scalars, states = [], [], []
    for b in range(mask.shape[0]):
        row, pieces, state = proj.row(b), [], None
        bounds = [0, *starts[b].nonzero().flatten().tolist(), length]
        for first, last in zip(bounds[:-1], bounds[1:]):
            state = None  # a new sequence: nothing before it is its context
            for start in range(first, last, chunk):
                end = min(start + chunk, last)
                out, a, state = mix(row.chunk(start, end), mask[b : b + 1, start:end], state, layer)
                pieces.append((out, a))
        outs.append(torch.cat([out for out, _ in pieces], dim=-2))
        scalars.append(torch.cat([a for _, a in pieces], dim=-1))
        states.append(state)
    merged = None
    if all(state is not None for state in states):
        columns = zip(*([getattr(state, f.name) for f in fields(VKTState)] for state in states))
        merged = VKTState(*(None if column[0] is None else torch.cat(column) for column in columns))
    return torch.cat(outs), torch.cat(scalars), merged


def _window_attention(
    proj: Projections,
    mask: torch.Tensor,
    state: VKTState | None,
    new_state: VKTState,
    layer: VKTAttention,
    summary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, VKTState]:
    """The exact local softmax window with its sink; ``mask`` ``(B, N)`` bool. Fills ``new_state``'s window fields.

    ``summary``: the global means of keys and values ``(B, H, N, d)`` each, which then join the
    window's softmax as one more slot (``global_readout="window"``).
    """
    keys, values = proj.window_keys, proj.window_values
    batch, kv_heads, _, dim = keys.shape
    sinks = layer.config.sink_tokens
    sink = None
    if sinks:
        sink = (
            (state.sink_keys, state.sink_values, state.sink_filled)
            if state is not None and state.sink_keys is not None
            else (
                keys.new_zeros(batch, kv_heads, sinks, dim),
                values.new_zeros(batch, kv_heads, sinks, dim),
                mask.new_zeros(batch, sinks),
            )
        )
        rank = vkt.rank_of_real_tokens(mask, sink[2].sum(-1))  # real tokens before each position
        sink = vkt.fill_sink(keys, values, mask, rank, sink)
        key_mask = mask & (rank >= sinks)  # sink tokens are keys of the sink, not of the window
        visible = rank[:, :, None] >= torch.arange(sinks, device=mask.device)  # (B, N, s): causal in the sink
    else:
        key_mask, visible = mask, None
    history = None if state is None or state.keys is None else (state.keys, state.values, state.key_mask)
    seen = None if state is None or state.tokens_seen is None else state.tokens_seen
    slot = None
    if summary is not None:
        slot = _summary_slot(proj.query, summary, mask, seen, layer)
    if layer.config.learned_sink:
        slot = _learned_sink_slot(proj.query, layer, slot)
    out, history = vkt.sliding_window_attention(
        proj.window_query,
        keys,
        values,
        key_mask,
        layer.config.local_attention_window,
        history,
        sink,
        visible,
        None,
        slot,
        custom_backward=ops.window_custom_backward(layer.config.vkt_backend, proj.window_query, keys, values, slot)
        or ops.window_cpu_kernel(layer.config.vkt_backend, proj.window_query),
    )
    new_state.keys, new_state.values, new_state.key_mask = history
    new_state.tokens_seen = mask.sum(-1) + (0 if seen is None else seen)
    if sink is not None:
        new_state.sink_keys, new_state.sink_values, new_state.sink_filled = sink
    return out, new_state


def _summary_slot(
    query: torch.Tensor,
    summary: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    seen: torch.Tensor | None,
    layer: VKTAttention,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global read-out as one softmax slot: logit ``q_i . K_i / sqrt(d) + log(1 + far_i) + b_h``.

    ``K_i`` is the (decayed, weighted) mean key of the tokens before ``i``; ``far_i`` counts the real
    tokens older than the window and the sink, so ``exp(logit)`` stands for the far tokens' total
    softmax mass (their mean key, times their number, times a learned per-head correction
    ``exp(b_h)``). With no far token the slot is hidden. Returns ``(logit (B, H, N), value (B, H, N, d))``.
    """
    keys, values = summary
    config = layer.config
    rank = vkt.rank_of_real_tokens(mask, seen)  # (B, N)
    far = (rank - (config.local_attention_window - 1) - config.sink_tokens).clamp(min=0)
    logit = (query * keys).sum(-1) * query.shape[-1] ** -0.5  # (B, H, N)
    logit = logit + torch.log1p(far.to(logit.dtype))[:, None] + layer.summary_bias.to(logit.dtype)[None, :, None]
    return logit.masked_fill((far == 0)[:, None], float("-inf")), values


def _learned_sink_slot(
    query: torch.Tensor, layer: VKTAttention, slot: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The learned sink as a softmax slot, logit ``q_i . k_s / sqrt(d)`` and value ``v_s`` (per head),
    merged with the global ``slot`` when there is one.

    Two slots are one: logits ``l1, l2`` with values ``v1, v2`` weigh in the softmax exactly as one slot
    with logit ``logaddexp(l1, l2)`` and value ``softmax(l1, l2) . (v1, v2)``. Query ``(B, H, N, d)``;
    returns ``(logit (B, H, N), value (B, H, N, d))``.
    """
    key = layer.sink_key.to(query.dtype)[None, :, None]  # (1, H, 1, d)
    value = layer.sink_value.to(query.dtype)[None, :, None]
    logit = (query * key).sum(-1) * query.shape[-1] ** -0.5  # (B, H, N)
    if slot is None:
        return logit, value.expand(query.shape)
    other, other_value = slot
    merged = torch.logaddexp(logit, other)  # the global slot may be hidden (-inf): the sink never is
    share = torch.exp(other - merged).unsqueeze(-1)  # the global slot's part of the merged mass
    return merged, torch.lerp(value.expand(query.shape), other_value.to(query.dtype), share)


def rope_positions(attention_mask: torch.Tensor | None, batch: int, length: int, past: int, device) -> torch.Tensor:
    """RoPE positions ``(B, N)`` of the new tokens: real tokens before them (left padding does not count)."""
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] == past + length:
        full = attention_mask.to(device=device, dtype=torch.int64)
        return (full.cumsum(-1) - 1).clamp(min=0)[:, -length:]
    return torch.arange(past, past + length, device=device).expand(batch, length)


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
        if config.context_source == "key" or config.local_attention:
            self.k_proj = nn.Linear(hidden, kv_heads * dim, bias=bias)
        if config.gated_value == "value" or config.readout or config.local_attention:
            self.v_proj = nn.Linear(hidden, kv_heads * dim, bias=bias)
        if config.importance == "parameter":
            self.importance = nn.Parameter(torch.empty(heads, dim))  # V_h
        else:
            self.importance_proj = nn.Linear(hidden, heads * dim, bias=False)  # V_i = W_V x_i
        # the null context token in front of every sequence: (context part, value part)
        self.null_context = nn.Parameter(torch.empty(heads, dim))
        if config.readout:
            self.null_value = nn.Parameter(torch.empty(heads, dim))
            self.readout_gate = nn.Linear(hidden, 2 * heads, bias=True)  # per token & head: g_K, g_T
        if config.distance_decay:
            self.decay_logit = nn.Parameter(torch.empty(heads))  # gamma_h = sigmoid(decay_logit)
        if config.readout and config.local_attention and config.global_readout == "window":
            self.summary_bias = nn.Parameter(torch.empty(heads))  # b_h of the global slot in the window
        if config.learned_sink:
            self.sink_key = nn.Parameter(torch.empty(heads, dim))  # k_s, v_s of the learned sink
            self.sink_value = nn.Parameter(torch.empty(heads, dim))
        init_vkt_parameters(self)

    def _heads(self, x: torch.Tensor, heads: int, repeat: bool = True) -> torch.Tensor:
        """``(B, N, heads * d)`` -> ``(B, heads, N, d)``; ``repeat`` key/value heads up to ``H`` (GQA)."""
        batch, length, _ = x.shape
        x = x.view(batch, length, heads, self.head_dim).transpose(1, 2)
        if repeat and heads != self.num_heads:
            x = x.repeat_interleave(self.num_heads // heads, dim=1)
        return x

    def log_decay(self) -> torch.Tensor | None:
        """``log(gamma_h)`` per head ``(H,)`` in the accumulation dtype, or ``None`` without distance decay."""
        if not self.config.distance_decay:
            return None
        acc = torch.float64 if self.config.accumulation_dtype == "float64" else torch.float32
        return nn.functional.logsigmoid(self.decay_logit.to(acc))

    def project(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Projections:
        """All per-token projections of ``x`` ``(B, N, hidden)``, computed once for the whole input.

        ``rotary``: the RoPE ``(cos, sin)`` tables ``(B, N, d)`` of the window's queries and keys.
        """
        config = self.config
        batch, length, _ = x.shape
        acc = torch.float64 if config.accumulation_dtype == "float64" else torch.float32
        q = self.q_proj(x)
        query = self._heads(q, self.num_heads).to(acc)  # Q: (B, H, N, d)
        if config.importance == "parameter":
            scores = vkt.importance_scores(query, self.importance)  # s: (B, H, N)
        else:
            scores = vkt.importance_scores(query, self._heads(self.importance_proj(x), self.num_heads))
        k = self.k_proj(x) if hasattr(self, "k_proj") else None
        v = self.v_proj(x) if hasattr(self, "v_proj") else None
        context = self._heads(k, self.num_kv_heads).to(acc) if config.context_source == "key" else query  # R
        values = self._heads(v, self.num_kv_heads).to(acc) if v is not None else None
        proj = Projections(
            query=query,
            scores=scores,
            context=context,
            gated=values if config.gated_value == "value" else query,  # U
            values=values,
        )
        if config.readout:
            proj.gates = self.readout_gate(x).to(acc).view(batch, length, 2, self.num_heads).permute(2, 0, 3, 1)
        if config.local_attention:
            window_query = query
            window_keys = self._heads(k, self.num_kv_heads, repeat=False).to(acc)
            if rotary is not None:
                window_query = vkt.apply_rotary(window_query, *rotary)
                window_keys = vkt.apply_rotary(window_keys, *rotary)
            proj.window_query, proj.window_keys = window_query, window_keys
            proj.window_values = self._heads(v, self.num_kv_heads, repeat=False).to(acc)
        return proj

    def _rotary(
        self, attention_mask: Any, position_embeddings: Any, batch: int, length: int, past: int, device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The RoPE tables of the window: the model's own (``position_embeddings``) or computed here."""
        if not (
            decode.config_value(self.config, "local_attention")
            and decode.config_value(self.config, "local_attention_rope")
        ):
            return None
        if position_embeddings is not None:
            return position_embeddings
        positions = rope_positions(attention_mask, batch, length, past, device)
        return vkt.rotary_cos_sin(positions, self.head_dim, self.config.rope_theta)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        output_attentions: bool = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mix ``hidden_states`` ``(B, N, hidden)``.

        Args:
            attention_mask: 2-D padding mask ``(B, past + N)`` or a transformers 4-D mask.
            cache: a ``VKTCache`` / ``DynamicCache`` (``past_key_values`` is accepted too); the
                layer reads and writes its state at ``layer_idx``.
            output_attentions: also return the scalar attentions (always returned here; the
                flag is accepted for API compatibility).
            position_embeddings: RoPE ``(cos, sin)`` ``(B, N, d)`` from a converted model's
                rotary module, used by the local attention window; computed here when absent.
            position_ids, cu_seq_lens_q (in ``kwargs``): where packed sequences start (positions that
                restart, cumulative lengths); each then mixes from a fresh state, as alone.

        Returns:
            ``(output (B, N, hidden), a (B, H, N))``; ``a`` is the tensor the output was computed
            from (float32, or ``accumulation_dtype``).
        """
        hidden = decode.config_value(self.config, "hidden_size")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden:
            raise ValueError(
                f"hidden_states must have shape (batch, tokens, {hidden}), got {tuple(hidden_states.shape)}"
            )
        if cache is None:
            cache = kwargs.get("past_key_values")
        batch, length, _ = hidden_states.shape
        slot = state = None
        if cache is not None:
            if not self.causal:
                raise ValueError("a cache can only be used with causal VKT layers")
            slot = vkt_state_layer(cache, self.layer_idx)
            state = slot.state
        past = 0 if slot is None else slot.seen_tokens
        if (
            isinstance(attention_mask, torch.Tensor)
            and attention_mask.dim() == 2
            and attention_mask.shape[-1] != past + length
        ):
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens, but this step has {past} cached + "
                f"{length} new = {past + length}: the 2-D mask must cover the cached tokens and the new ones"
            )
        found = decode.ready(self, state, slot) if length == 1 else None
        if found is not None and decode.new_tokens_real(
            attention_mask, lambda: padding_mask(attention_mask, batch, 1, hidden_states.device)
        ):  # one token per row after a prompt: the state is updated in place (vkt_hf/layers/decode.py)
            rotary = self._rotary(attention_mask, position_embeddings, batch, 1, past, hidden_states.device)
            threads = decode.one_thread(hidden_states)
            try:
                out, a = decode.decode_output(self, hidden_states, rotary, state, past, found)
                slot.seen_tokens += 1
                return out, a
            finally:
                decode.restore_threads(threads)
        mask = padding_mask(attention_mask, batch, length, hidden_states.device)
        if length == 0:  # nothing to mix: empty outputs, the state as it was
            empty = hidden_states.new_zeros(batch, 0, self.num_heads * self.head_dim)
            return self.o_proj(empty), hidden_states.new_zeros(batch, self.num_heads, 0)
        rotary = self._rotary(attention_mask, position_embeddings, batch, length, past, hidden_states.device)
        proj = self.project(hidden_states, rotary)
        state = decode.unroll(state, past)  # the cache holds ring buffers; `mix` reads them oldest first
        chunk = self.config.mixer_chunk_size if self.causal else length
        outputs, scalars = [], []
        starts = sequence_starts(kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"), mask)
        if starts is not None:  # packed sequences (DataCollatorWithFlattening): each from a fresh state
            mixed, a, state = mix_packed(proj, mask, starts, self)
            outputs, scalars = [mixed], [a]
        else:
            for start in range(0, length, chunk):
                end = min(start + chunk, length)
                out, a, state = mix(proj.chunk(start, end), mask[:, start:end], state, self)
                outputs.append(out)
                scalars.append(a)
        if slot is not None:
            slot.update_state(decode.roll_in(state, past + length), length)
        mixed = torch.cat(outputs, dim=-2) if len(outputs) > 1 else outputs[0]  # (B, H, N, d)
        # `a` as computed, in the accumulation dtype: the very tensor the output depends on, so gradient-based
        # attribution finds its .grad (a copy or a cast would be a dead end); longer inputs than one chunk
        # return the chunks' concatenation
        return self._output(mixed, hidden_states), scalars[0] if len(scalars) == 1 else torch.cat(scalars, dim=-1)

    def _output(self, mixed: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The mixed heads ``(B, H, N, d)`` through ``o_proj``: ``(B, N, hidden)``, in the input's dtype."""
        batch, length, _ = hidden_states.shape
        mixed = mixed.to(hidden_states.dtype).transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return decode.linear(self.o_proj, mixed)
