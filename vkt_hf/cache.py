"""The decoding cache: a constant-size VKT state per VKT layer, plain KV for softmax layers.

``VKTCache`` is a ``transformers.DynamicCache`` whose VKT layers are ``VKTStateLayer``s.
A ``VKTStateLayer`` holds, per sequence in the batch (``H`` heads, ``D`` channels of the
context stream, ``n`` the local window)::

    weighted_sum  (B, H, D)     running (decayed) weighted *mean* of the context vectors (a mean
                                cannot overflow; the sum it stands for is weighted_sum * weight_total)
    weight_total  (B, H)        the matching sum of weights
    window        (B, H, n, D)  the last n context vectors, for the local mean
    window_mask   (B, n)        which of those are real tokens

and, with the exact local attention window (``local_attention=True``, ``Hk`` key/value heads,
``w`` the attention window, ``s`` sink tokens)::

    keys, values  (B, Hk, w, d) the last w keys (RoPE applied) and values
    key_mask      (B, w)        which of those are keys of the window
    sink_keys, sink_values (B, Hk, s, d), sink_filled (B, s)   the first s real tokens
    tokens_seen   (B,)          real tokens so far (how many lie beyond the window)

Its size never depends on how many tokens were seen. Softmax layers of a hybrid keep the
library's ``DynamicLayer`` (a growing KV cache), so converted Llama/GPT-2 hybrids and
``VKTForCausalLM`` share one cache class. Beam search (``reorder_cache``), batch
expansion and selection work on both kinds of layer.

Where transformers has its linear-attention cache API (``LinearAttentionLayer``, as used by Mamba and
Qwen3-Next), a ``VKTStateLayer`` is one: ``cache.is_linear`` is ``True`` for VKT layers, the state's tensors
are its ``recurrent_states`` (one index per field above, ``cache.get_recurrent_state(layer, i)``), and
``cache.has_previous_state(layer)`` says whether it holds a state. Older releases (transformers < 5.x
without that API) get the same class on ``CacheLayerMixin``. The state cannot be rolled back, so the
models declare ``_is_stateful`` and ``generate()`` refuses assisted / prompt-lookup decoding up front.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache, DynamicLayer

from .constants import LAYER_TYPE_NAMES

try:  # the linear-attention cache layer API (Mamba, Qwen3-Next) in recent transformers releases
    from transformers.cache_utils import LinearAttentionLayer as _StateLayerBase
except ImportError:  # pragma: no cover - transformers releases without it
    _StateLayerBase = CacheLayerMixin

#: whether VKT cache layers are transformers linear-attention layers (``cache.is_linear``)
LINEAR_ATTENTION_API = _StateLayerBase is not CacheLayerMixin


def layer_kind(name: str) -> str:
    """``layer_types`` entry of a layer kind given either way (``"vkt"`` or ``"linear_attention"``, ...)."""
    return LAYER_TYPE_NAMES.get(name, name)


@dataclass
class VKTState:
    """The recurrent state of one VKT layer (see module docstring for shapes)."""

    weighted_sum: torch.Tensor
    weight_total: torch.Tensor
    window: torch.Tensor
    window_mask: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    sink_keys: torch.Tensor | None = None
    sink_values: torch.Tensor | None = None
    sink_filled: torch.Tensor | None = None
    tokens_seen: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """The tensors held (fields that are not ``None``)."""
        return [t for t in (getattr(self, name) for name in STATE_FIELDS) if t is not None]

    def map(self, fn) -> VKTState:
        """Apply ``fn`` to every tensor (all have the batch as their first dimension)."""
        return VKTState(*(None if t is None else fn(t) for t in (getattr(self, f.name) for f in fields(self))))

    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in self.tensors())


STATE_FIELDS = [f.name for f in fields(VKTState)]


class VKTStateLayer(_StateLayerBase):
    """A cache layer holding a fixed-size :class:`VKTState` instead of growing keys/values.

    The state's fields are stored as ``recurrent_states[i]`` (``i`` the field's index in
    :data:`STATE_FIELDS`), the storage of transformers' linear-attention layers; ``state`` reads and
    writes them as one :class:`VKTState`. ``seen_tokens`` counts the positions processed.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, **kwargs):
        if LINEAR_ATTENTION_API:
            super().__init__(number_of_states=len(STATE_FIELDS))
        else:  # pragma: no cover - the same attributes without transformers' linear-attention base
            super().__init__()
            self.number_of_states = len(STATE_FIELDS)
            self.recurrent_states = dict.fromkeys(range(self.number_of_states))
            self.is_recurrent_states_initialized = dict.fromkeys(range(self.number_of_states), False)
            self.has_previous_state = dict.fromkeys(range(self.number_of_states), False)
            self.record_past = False
        self.seen_tokens = 0
        self.is_initialized = False

    @property
    def state(self) -> VKTState | None:
        """The layer's :class:`VKTState`, or ``None`` before the first forward (and for stateless mixers)."""
        values = [self.recurrent_states[i] for i in range(len(STATE_FIELDS))]
        return None if all(v is None for v in values) else VKTState(*values)

    @state.setter
    def state(self, state: VKTState | None) -> None:
        values = [None] * len(STATE_FIELDS) if state is None else [getattr(state, f) for f in STATE_FIELDS]
        for i, value in enumerate(values):
            self.recurrent_states[i] = value
            self.is_recurrent_states_initialized[i] = value is not None
            self.has_previous_state[i] = self.is_initialized

    def lazy_initialization(self, *args, **kwargs) -> None:  # the state is created by the first forward
        self.is_initialized = True

    def update(self, *args, **kwargs):
        raise TypeError("a VKT layer's cache is updated with `update_state`, not with keys and values")

    def update_state(self, state: VKTState | None, new_tokens: int) -> None:
        """Store the state after ``new_tokens`` more tokens (``state`` is None for stateless mixers)."""
        self.seen_tokens += new_tokens
        self.is_initialized = True
        self.state = state

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        """transformers' linear-attention API: set field ``state_idx`` of the state (see :data:`STATE_FIELDS`)."""
        self.recurrent_states[state_idx] = recurrent_states
        self.is_recurrent_states_initialized[state_idx] = True
        self.has_previous_state[state_idx] = True
        return recurrent_states

    def update_conv_state(self, *args, **kwargs):
        raise TypeError("a VKT layer has no convolution state")

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        # transformers >= 5.x passes the query length; some releases pass `cache_position`
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name of `get_max_length` before transformers 5.24
        return -1

    def nbytes(self) -> int:
        """Bytes held by this layer's state (constant in the context length)."""
        return 0 if self.state is None else self.state.nbytes()

    def reset(self) -> None:
        self.seen_tokens = 0
        self.is_initialized = False
        self.state = None

    def offload(self):  # the state is small: it always stays on its device
        pass

    def prefetch(self):
        pass

    def activate_past_recording(self):
        raise NotImplementedError(
            "a VKT state summarises all past tokens and cannot be rolled back; "
            "assisted, prompt-lookup and speculative decoding are not supported with VKT layers"
        )

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0 and self.seen_tokens > 0:
            raise NotImplementedError(
                "a VKT state summarises all past tokens and cannot be cropped; "
                "do not use assisted/speculative decoding with VKT layers"
            )

    def _apply(self, fn) -> None:
        if self.state is not None:
            self.state = self.state.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])


class VKTCache(DynamicCache):
    """Cache for models with VKT layers: ``VKTStateLayer`` for VKT and no-mixing layers, ``DynamicLayer`` otherwise.

    Args:
        layer_types: one entry per decoder layer, ``"linear_attention"`` (VKT), ``"full_attention"`` (softmax)
            or ``"mlp"`` (no mixing: no state, but the layer still counts tokens); the short names ``"vkt"``,
            ``"softmax"`` and ``"none"`` are accepted too.

    A plain ``DynamicCache`` handed to a VKT layer also works: the layer swaps its own
    slot for a ``VKTStateLayer`` on first use (see :func:`vkt_state_layer`).

    The sequence length of a cache whose layers are all VKT layers is their token count (transformers'
    ``Cache`` reads it from attention layers only).
    """

    def __init__(self, layer_types: list[str]):
        super().__init__()
        self.layer_class_to_replicate = None
        self.layers = [DynamicLayer() if layer_kind(t) == "full_attention" else VKTStateLayer() for t in layer_types]

    def _state_only(self) -> bool:
        return bool(self.layers) and all(isinstance(layer, VKTStateLayer) for layer in self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self._state_only():
            return self.layers[0].get_seq_length()
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        if self._state_only():
            return self.layers[0].get_mask_sizes(query_length)
        return super().get_mask_sizes(query_length, layer_idx)

    def vkt_state_bytes(self) -> int:
        """Total bytes of all VKT states (excludes KV of softmax layers)."""
        return sum(layer.nbytes() for layer in self.layers if isinstance(layer, VKTStateLayer))


def layer_nbytes(layer) -> int:
    """Bytes one cache layer holds: a VKT state, or the keys and values of a softmax layer."""
    if isinstance(layer, VKTStateLayer):
        return layer.nbytes()
    tensors = (getattr(layer, "keys", None), getattr(layer, "values", None))
    return sum(t.nelement() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def vkt_state_layer(cache: DynamicCache, layer_idx: int) -> VKTStateLayer:
    """The ``VKTStateLayer`` at ``layer_idx`` of any layered cache, created there if missing."""
    if not hasattr(cache, "layers"):
        raise TypeError(f"VKT layers need a transformers Cache with per-layer storage, got {type(cache).__name__}")
    while len(cache.layers) <= layer_idx:
        cache.layers.append(
            DynamicLayer() if cache.layer_class_to_replicate is None else cache.layer_class_to_replicate()
        )
    layer = cache.layers[layer_idx]
    if not isinstance(layer, VKTStateLayer):
        if getattr(layer, "keys", None) is not None and layer.get_seq_length() > 0:
            raise ValueError(f"cache layer {layer_idx} already holds keys/values; it cannot become a VKT state")
        layer = cache.layers[layer_idx] = VKTStateLayer()
    return layer
