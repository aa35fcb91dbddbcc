"""One-token decoding: a VKT layer's step for one new token per row, written as in-place updates of its state.

A prompt (any number of tokens) runs the blocked reference of :func:`.vkt_attention.mix`. A decoding step --
one new token per row, a state in the cache, no gradient, every new token real -- runs :func:`decode_output`
(:func:`decode_step`, then ``o_proj``; on CPU, for the layers conversions install, one C++ call with the
projections):
the same math for ``N = 1`` (``docs/method.md``), in a few small tensor operations and no reallocation:

* global mean ``K``: the new token's ``K`` *is* the carried mean; then ``total <- gamma * total + w`` and
  ``mean <- mean + (w / total) (R - mean)`` (one ``lerp_``: a mean, so nothing overflows);
* local mean ``T``: the sum of the ring buffer of the last ``n`` context vectors over their count; the new
  vector then overwrites the oldest slot;
* attention window: the new key and value overwrite the oldest slot of the ``w``-slot ring (the token
  attends to itself, and the overwritten one is the first that falls out of its window); one softmax over
  the sink, the window and the global slot.

Ring layout
-----------
In a cache, the window buffers of a :class:`~vkt_hf.cache.VKTState` (``window`` / ``window_mask`` of
``n`` slots; ``keys`` / ``values`` / ``key_mask`` of ``w`` slots) hold position ``p`` -- counting every
position the layer has processed, padding included, the cache layer's ``seen_tokens`` -- at slot
``p % n`` (``p % w``), and their masked slots hold zeros. :func:`.vkt_attention.mix` works on
chronological buffers; :func:`unroll` and :func:`roll_in` convert at the cache boundary, on prompt chunks
only (a decoding step never moves a buffer). Reordering the batch (beam search) keeps the layout: the
position count is the same for every row.

A real token with a non-finite vector makes the carried mean inf or NaN here (the blocked path sets it to
NaN): either way every later token of that row sees a non-finite context, and no earlier one.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import VKTState
from ..ops import cpu_kernels
from ..ops import functional as vkt

if TYPE_CHECKING:  # pragma: no cover
    from .vkt_attention import VKTAttention

#: the ring buffers of a state, with the axis of their slots
RING_FIELDS = {"window": -2, "window_mask": -1, "keys": -2, "values": -2, "key_mask": -1}


def _rotate(state: VKTState, positions: int, sign: int) -> VKTState:
    """``state`` with every ring buffer rolled by ``sign * (positions % slots)`` (a new state; tensors shared
    where nothing moves)."""
    moved = {}
    for name, axis in RING_FIELDS.items():
        t = getattr(state, name)
        if t is None:
            continue
        shift = positions % t.shape[axis]
        moved[name] = t.roll(sign * shift, dims=axis) if shift else t
    return VKTState(**{**{f: getattr(state, f) for f in state.__dataclass_fields__}, **moved})


def unroll(state: VKTState | None, positions: int) -> VKTState | None:
    """The chronological state (oldest slot first) of a cached ring-layout ``state`` after ``positions``."""
    return None if state is None else _rotate(state, positions, -1)


def roll_in(state: VKTState | None, positions: int) -> VKTState | None:
    """The ring layout of a chronological ``state`` after ``positions``, masked slots of the local window zeroed.

    The tensors returned are the cache's own (fresh, or produced by this prompt chunk alone), so decoding may
    update them in place.
    """
    if state is None:
        return None
    if state.window is not None:  # padded positions may hold anything; the ring sums its slots unmasked
        real = state.window_mask[:, None, :, None] != 0
        state = VKTState(**{**vars(state), "window": torch.where(real, state.window, 0)})
    # a tensor may be a view of this chunk's work tensors: the cache gets its own, contiguous (decoding
    # writes into them)
    return _rotate(state, positions, 1).map(lambda t: t.clone() if t._base is not None else t.contiguous())


#: the last attention mask of a decoding step and whether its new tokens are all real (every layer of a
#: step gets the same mask object: one check per step, not one per layer)
_LAST_MASK: tuple[weakref.ref, int, bool] | None = None
#: the last RoPE tables and their rotation matrices (shared by every layer of a step)
_LAST_ROPE: tuple[weakref.ref, int, torch.dtype, torch.Tensor] | None = None


def new_tokens_real(attention_mask: Any, mask: Callable[[], torch.Tensor]) -> bool:
    """Whether every row's new token is real; ``mask()`` gives the ``(B, 1)`` padding mask (validating it)."""
    global _LAST_MASK
    if attention_mask is None:
        return True
    if not isinstance(attention_mask, torch.Tensor):
        return False
    if _LAST_MASK is not None and _LAST_MASK[0]() is attention_mask and _LAST_MASK[1] == attention_mask._version:
        return _LAST_MASK[2]
    real = bool((mask() != 0).all())
    _LAST_MASK = (weakref.ref(attention_mask), attention_mask._version, real)
    return real


class Ready(NamedTuple):
    """What :func:`ready` found about a cached state, kept until the state's tensors are replaced.

    A buffer found full of real tokens stays full while decoding (each step writes a real token), so
    its mask need not be read or applied; one that is not is masked every step until the next check.
    """

    key: torch.Tensor  # the state's first tensor: a new one means a new state (prompt chunk, reorder)
    window_full: bool  # every slot of the local window holds a real token
    keys_full: bool  # every slot of the attention window holds a key
    far: bool  # every row has tokens beyond the window and the sink (the global slot is visible)


def ready(layer: VKTAttention, state: VKTState | None, slot: Any) -> Ready | None:
    """What :func:`decode_output` needs to know of ``state`` (in ``slot``, a cache layer), or ``None`` if it cannot run.

    It needs no gradient (the state is updated in place), a causal layer, a state holding what the layer's
    options carry, contiguous buffers, and a full sink (the new token is then a key of the window, never a
    sink token). The checks that read tensors run once per new state (after a prompt chunk or a reorder).
    """
    if torch.is_grad_enabled() or state is None or not layer.causal:
        return None
    found = getattr(slot, "_decode_ready", None)
    if found is not None and found.key is state.tensors()[0]:
        return found
    config = Options(layer.config)
    needed = []
    if config.vkt_terms:
        needed += [state.weighted_sum, state.weight_total, state.window, state.window_mask]
    if config.local_attention:
        needed += [state.keys, state.values, state.key_mask, state.tokens_seen]
        if config.sink_tokens:
            needed += [state.sink_keys, state.sink_values, state.sink_filled]
    if not needed or any(t is None or not t.is_contiguous() for t in needed):
        return None
    if config.local_attention and config.sink_tokens and not bool(state.sink_filled.all()):
        return None
    local, window = config.local_attention, config.local_attention_window
    found = Ready(
        key=state.tensors()[0],
        window_full=config.vkt_terms and bool(state.window_mask.all()),
        keys_full=local and bool(state.key_mask.all()),
        far=local and bool((state.tokens_seen > window - 1 + config.sink_tokens).all()),
    )
    slot._decode_ready = found
    return found


_OPTIONS = (
    "vkt_terms",
    "readout",
    "local_attention",
    "global_readout",
    "sink_tokens",
    "learned_sink",
    "local_attention_window",
    "importance",
    "context_source",
    "gated_value",
    "context_weights",
    "normalization",
    "eps",
    "accumulation_dtype",
    "distance_decay",
)


def config_value(config: Any, name: str) -> Any:
    """``getattr(config, name)``, read from the config's ``__dict__`` where it is there: a transformers config's
    attribute access costs microseconds, and a decoding step reads a layer's options every time."""
    values = object.__getattribute__(config, "__dict__")
    return values[name] if name in values else getattr(config, name)


class Options:
    """The options a step reads, copied from the config's ``__dict__`` (a transformers config's attribute
    access costs microseconds, and a step reads dozens); read anew every step, so a changed config counts."""

    __slots__ = _OPTIONS

    def __init__(self, config: Any):
        values = object.__getattribute__(config, "__dict__")  # past transformers' (slow) __getattribute__
        for name in _OPTIONS:
            setattr(self, name, values[name] if name in values else getattr(config, name))


def _gamma(layer: VKTAttention) -> torch.Tensor:
    """``gamma_h = exp(log_decay_h)`` of :meth:`VKTAttention.log_decay`, recomputed only when the parameter changed."""
    logit = layer.decay_logit
    key = (logit._version, logit.data_ptr(), logit.dtype)
    cached = layer.__dict__.get("_decode_gamma")
    if cached is None or cached[0] != key:
        cached = (key, layer.log_decay().exp())
        layer.__dict__["_decode_gamma"] = cached
    return cached[1]


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; a plain ``nn.Linear`` without hooks is applied directly (no module call around it)."""
    if type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks or _GLOBAL_HOOKS()):
        return F.linear(x, module.weight, module.bias)
    return module(x)


def _GLOBAL_HOOKS() -> bool:  # noqa: N802 - reads like the module-level dicts it checks
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


def one_thread(x: torch.Tensor) -> int:
    """Run the CPU ops that follow on one thread; returns the thread count to give back to :func:`restore_threads`.

    A one-token step is ~100 operations on kilobytes: a second thread cannot speed any of them up, and a
    parallel region waits for it -- a whole scheduler tick (4 ms) when another process holds its core (an
    oversubscribed 2-core machine: 24 ms -> 88 ms per layer). Costs ~1 us; the setting is process-wide.
    """
    threads = torch.get_num_threads()
    if threads > 1 and x.device.type == "cpu":
        torch.set_num_threads(1)
        return threads
    return 0


def restore_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def rope_matrix(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """RoPE of one position as a matrix ``(B, d, d)``: ``x @ M`` is :func:`~vkt_hf.ops.functional.apply_rotary`.

    ``cos``, ``sin`` ``(B, 1, d)``. ``M = diag(cos) + P diag(sin)`` with ``P`` the half swap with a sign
    (``x @ P = cat(-x[d/2:], x[:d/2])``): each output is the same two products. Built once per step (every
    layer gets the same tables).
    """
    global _LAST_ROPE
    if _LAST_ROPE is not None and _LAST_ROPE[0]() is cos and _LAST_ROPE[1:3] == (cos._version, dtype):
        return _LAST_ROPE[3]
    dim = cos.shape[-1]
    half = dim // 2
    swap = torch.zeros(dim, dim, dtype=dtype, device=cos.device)
    index = torch.arange(half, device=cos.device)
    swap[index + half, index] = -1  # output j < d/2 takes -x[j + d/2]
    swap[index, index + half] = 1  # output j >= d/2 takes x[j - d/2]
    matrix = torch.diag_embed(cos[:, 0].to(dtype)) + swap * sin[:, 0, None, :].to(dtype)  # (B, d, d)
    _LAST_ROPE = (weakref.ref(cos), cos._version, dtype, matrix)
    return _LAST_ROPE[3]


def decode_output(
    layer: VKTAttention,
    x: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
    state: VKTState,
    position: int,
    found: Ready,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step of :func:`decode_step`, then ``o_proj``: the layer's output ``(B, 1, hidden)`` and ``a`` ``(B, H, 1)``.

    Where the C++ step can run (:func:`_kernel_ready`, the kernels built) it does, and when the five projections
    are plain ``nn.Linear`` modules without hooks (a conversion's layer; not one wrapped by an adapter) they run
    inside the same C++ call (``decode_layer``): one trip from Python per layer and step instead of seven.
    Otherwise the eager step, :func:`decode_step`.
    """
    config = Options(layer.config)
    module = cpu_kernels.kernel() if _kernel_ready(config, found, x) else None
    if module is None:
        mixed, a = decode_step(layer, x, rotary, state, position, found, config)
    elif (weights := _plain_projections(layer)) is None:
        mixed, a = _kernel_step(module, layer, config, x, rotary, state, position)
    else:
        batch = x.shape[0]
        out, a = module.decode_layer(
            x.view(batch, -1),
            weights,
            layer.num_heads,
            layer.num_kv_heads,
            *_kernel_state(layer, config, x, rotary, state, position),
        )
        return out.view(batch, 1, -1), a.view(batch, layer.num_heads, 1)
    return layer._output(mixed, x), a


def _kernel_ready(config: Options, found: Ready, x: torch.Tensor) -> bool:
    """Whether the C++ step may run: both rings full, the global slot visible, options the kernel covers."""
    return found.window_full and found.keys_full and found.far and cpu_kernels.supports(config, x)


def _plain_projections(layer: VKTAttention) -> list[torch.Tensor] | None:
    """Weights and biases of q, k, v, the read-out gates and o (``ABSENT`` for no bias) when all five are plain
    float32 ``nn.Linear`` modules without hooks; else ``None``."""
    if _GLOBAL_HOOKS():
        return None
    weights, modules = [], layer._modules  # read directly: nn.Module.__getattr__ costs a microsecond a time
    for name in ("q_proj", "k_proj", "v_proj", "readout_gate", "o_proj"):
        module = modules[name]
        if type(module) is not nn.Linear or module._forward_hooks or module._forward_pre_hooks:
            return None
        weight, bias = module._parameters["weight"], module._parameters["bias"]
        if weight.dtype != torch.float32:
            return None
        weights += [weight, cpu_kernels.ABSENT if bias is None else bias]
    return weights


def decode_step(
    layer: VKTAttention,
    x: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
    state: VKTState,
    position: int,
    found: Ready,
    config: Options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's mixing of one new token per row (``x`` ``(B, 1, hidden)``, all real), ``state`` updated in place:
    the eager step, in PyTorch (:func:`decode_output` runs the C++ kernel of the same step where it can).

    ``state`` is in the ring layout of the module docstring, after ``position`` positions; ``found`` is what
    :func:`ready` said of it; ``config`` the layer's :class:`Options`. Returns the mixed heads ``(B, H, 1, d)``
    (before ``o_proj``) and ``a`` ``(B, H, 1)``, as the projections and :func:`.vkt_attention.mix` would. Heads
    are grouped ``(B, Hk, G, ...)`` (``G = H / Hk``): key/value heads broadcast over their group, never repeated.
    """
    batch, heads, kv_heads, dim = x.shape[0], layer.num_heads, layer.num_kv_heads, layer.head_dim
    group = heads // kv_heads
    acc = torch.float64 if config.accumulation_dtype == "float64" else torch.float32
    x = x.view(batch, -1)
    query = linear(layer.q_proj, x).view(batch, kv_heads, group, dim).to(acc)  # Q: (B, Hk, G, d)
    importance = layer.importance if config.importance == "parameter" else linear(layer.importance_proj, x)
    scores = torch.linalg.vecdot(query, importance.view(-1, kv_heads, group, dim).to(acc))  # s: (B, Hk, G)
    keys = linear(layer.k_proj, x).view(batch, kv_heads, 1, dim).to(acc) if hasattr(layer, "k_proj") else None
    values = linear(layer.v_proj, x).view(batch, kv_heads, 1, dim).to(acc) if hasattr(layer, "v_proj") else None
    mixed, a, update = None, None, None
    if config.vkt_terms:
        mixed, a, update = _vkt_terms(layer, config, found, x, query, scores, keys, values, state, position)
    if config.local_attention:
        flat = query.view(batch, heads, dim)
        window_query, keys = flat, keys.view(batch, kv_heads, dim)
        if rotary is not None and rotary[0].shape[0] == 1:  # one position for every row: one (d, d) matrix
            matrix = rope_matrix(*rotary, acc)[0]
            window_query = (flat.view(-1, dim) @ matrix).view(batch, heads, dim)
            keys = (keys.view(-1, dim) @ matrix).view(batch, kv_heads, dim)
        elif rotary is not None:
            window_query = vkt.apply_rotary(flat.unsqueeze(2), *rotary).squeeze(2)
            keys = vkt.apply_rotary(keys.unsqueeze(2), *rotary).squeeze(2)
        attended = _window_step(layer, config, found, flat, window_query, keys, values, state, position)
        mixed = attended if mixed is None else mixed + attended.view(batch, kv_heads, group, dim)
    if update is not None:
        update()  # the state's sums, once everything has read the old ones
    else:
        a = scores.new_zeros(batch, kv_heads, group)
    return mixed.view(batch, heads, 1, dim), a.view(batch, heads, 1)


_LAST_KERNEL_ROPE = None  # (weakref to the model's cos table, its version, batch, (cos, sin)): one per step


def _kernel_rotary(rotary: tuple[torch.Tensor, torch.Tensor], batch: int, dim: int) -> tuple[torch.Tensor, ...]:
    """The step's RoPE tables ``(B or 1, 1, d)`` as the kernel takes them, contiguous ``(B, d)``; made once per step
    (every layer of a step gets the same tables from the model's rotary module)."""
    global _LAST_KERNEL_ROPE
    cos = rotary[0]
    last = _LAST_KERNEL_ROPE
    if last is None or last[0]() is not cos or last[1:3] != (cos._version, batch):
        tables = tuple(t.reshape(t.shape[0], dim).expand(batch, dim).contiguous() for t in rotary)
        last = _LAST_KERNEL_ROPE = (weakref.ref(cos), cos._version, batch, tables)
    return last[3]


def _kernel_state(layer, config, x, rotary, state, position) -> list:
    """The arguments of the C++ step after the projections: RoPE tables, parameters, the state, the options."""
    learned = config.learned_sink
    cos = sin = cpu_kernels.ABSENT
    if rotary is not None:
        cos, sin = _kernel_rotary(rotary, x.shape[0], layer.head_dim)
    return [
        cos,
        sin,
        layer.importance,
        _gamma(layer) if config.distance_decay else cpu_kernels.ABSENT,
        layer.summary_bias,
        layer.sink_key if learned else cpu_kernels.ABSENT,
        layer.sink_value if learned else cpu_kernels.ABSENT,
        state.weighted_sum,
        state.weight_total,
        state.window,
        state.keys,
        state.values,
        state.sink_keys if config.sink_tokens else cpu_kernels.ABSENT,
        state.sink_values if config.sink_tokens else cpu_kernels.ABSENT,
        state.tokens_seen,
        position,
        float(config.eps),
        cpu_kernels.NORMALIZATION_CODES[config.normalization],
        config.context_weights == "uniform",
    ]


def _kernel_step(module, layer, config, x, rotary, state, position) -> tuple[torch.Tensor, torch.Tensor]:
    """The step of :func:`decode_step` through the C++ kernel: the projections here (as modules: hooks and adapters run), the
    rest in one call."""
    batch, heads, kv_heads, dim = x.shape[0], layer.num_heads, layer.num_kv_heads, layer.head_dim
    x = x.view(batch, -1)
    mixed, a = module.decode_step(
        linear(layer.q_proj, x).view(batch, heads, dim),
        linear(layer.k_proj, x).view(batch, kv_heads, dim),
        linear(layer.v_proj, x).view(batch, kv_heads, dim),
        linear(layer.readout_gate, x),  # (B, 2 H): g_K, g_T
        *_kernel_state(layer, config, x, rotary, state, position),
    )
    return mixed.view(batch, heads, 1, dim), a.view(batch, heads, 1)


def _vkt_terms(layer, config, found, x, query, scores, keys, values, state, position):
    """``a_i U_i`` and the read-out terms of the new token, and the update of the sums (to run last)."""
    batch, kv_heads, group, dim = query.shape
    context = keys if config.context_source == "key" else query  # R: (B, Hk, 1 or G, d)
    stream = context if not config.readout else torch.cat([context, values.expand_as(context)], -1)
    mean = state.weighted_sum.view(batch, kv_heads, group, -1)  # the new token's K: the mean before it
    local = _local_mean(state, layer, config.readout, found.window_full).view(batch, kv_heads, group, -1)  # T
    # K . T: (B, Hk, G); beyond the dtype's range it is taken at its largest value (the blocked path redoes
    # those tokens in float64: the ratios differ only where s is as huge), so no step reads the device
    finite = torch.finfo(mean.dtype).max
    den = torch.linalg.vecdot(mean[..., :dim], local[..., :dim]).clamp_(-finite, finite)
    a = vkt.normalize((scores / vkt.guard(den, config.eps)).clamp_(-finite, finite), config.normalization)
    gated = values if config.gated_value == "value" else query  # U
    mixed = a.unsqueeze(-1) * gated
    if config.readout:
        gates = linear(layer.readout_gate, x).view(batch, 2, kv_heads, group, 1).to(a.dtype)  # g_K, g_T
        mixed = torch.addcmul(mixed, gates[:, 1], local[..., dim:])
        if not (config.local_attention and config.global_readout == "window"):
            mixed = torch.addcmul(mixed, gates[:, 0], mean[..., dim:])

    def update() -> None:
        weights = vkt.context_weights(scores, config.context_weights)  # (B, Hk, G)
        total = state.weight_total.view(batch, kv_heads, group)
        if config.distance_decay:
            total.mul_(_gamma(layer).view(kv_heads, group))
        total.add_(weights)
        # a total that underflowed to 0 (every weight tiny) keeps the mean, the limit the blocked path takes
        mean.lerp_(stream, (weights / total.clamp(min=torch.finfo(total.dtype).tiny)).unsqueeze_(-1))
        window = state.window.view(batch, kv_heads, group, state.window.shape[-2], -1)
        slot = position % window.shape[-2]
        window.select(3, slot).copy_(stream)
        if not found.window_full:
            state.window_mask.select(1, slot).fill_(1)

    return mixed, a, update


def _local_mean(state: VKTState, layer: VKTAttention, readout: bool, full: bool) -> torch.Tensor:
    """``T``: the mean of the ring's real slots (their sum: masked slots hold zeros), or the null context."""
    if full:
        return state.window.mean(-2)
    count = state.window_mask.sum(-1)[:, None, None]  # (B, 1, 1)
    null = layer.null_context if not readout else torch.cat([layer.null_context, layer.null_value], -1)
    local = state.window.sum(-2) / count.clamp(min=1)  # (B, H, D)
    return torch.where(count > 0, local, null.to(local.dtype))


def _window_step(layer, config, found, query, window_query, keys, values, state, position) -> torch.Tensor:
    """Exact softmax attention of the new token over the sink, the ring of the last ``w`` keys (itself
    included) and the global slot; writes the token into the ring first. Queries ``(B, H, d)`` (``query``
    without RoPE, for the global slot), keys ``(B, Hk, d)``; returns ``(B, H, d)``.

    The heads are flattened to ``(B * Hk, G, ...)``; the products are 2-D matrix products (:func:`grouped_mm`)
    and the softmax is written out: a tiny parallel region (CPU ``bmm`` over heads, ``softmax`` over rows)
    waits a whole scheduler tick for its second thread whenever another process holds that core.
    """
    batch, heads, dim = query.shape
    kv_heads, slots = state.keys.shape[1], state.keys.shape[2]
    group = heads // kv_heads
    slot = position % slots
    state.keys.select(2, slot).copy_(keys)
    state.values.select(2, slot).copy_(values.view(batch, kv_heads, dim))
    scaled = (window_query * dim**-0.5).view(batch * kv_heads, group, dim)
    window = grouped_mm(scaled, state.keys.view(-1, slots, dim).transpose(1, 2))  # (B * Hk, G, w)
    if not found.keys_full:
        state.key_mask.select(1, slot).fill_(True)
        hidden = ~state.key_mask[:, None, None, :].expand(batch, kv_heads, 1, slots).reshape(-1, 1, slots)
        window = window.masked_fill(hidden, float("-inf"))
    logits, buffers = [window], [state.values.view(-1, slots, dim)]
    if config.sink_tokens:  # every sink slot is filled (see `ready`): all visible
        sinks = state.sink_keys.shape[2]
        logits.insert(0, grouped_mm(scaled, state.sink_keys.view(-1, sinks, dim).transpose(1, 2)))
        buffers.insert(0, state.sink_values.view(-1, sinks, dim))
    if config.learned_sink:  # k_s, v_s: (H, d); the logit is q . k_s / sqrt(d), q without RoPE
        sink_key = layer.sink_key.to(query.dtype)
        logits.append(torch.linalg.vecdot(query, sink_key).mul_(dim**-0.5).view(-1, group, 1))
    summary = config.vkt_terms and config.readout and config.global_readout == "window"
    if summary:
        logits.append(_summary_logit(layer, config, found, query, state).view(-1, group, 1))
    logits = torch.cat(logits, dim=-1) if len(logits) > 1 else logits[0]
    logits = logits.clamp_(max=torch.finfo(logits.dtype).max)
    weights = (logits - logits.amax(-1, keepdim=True)).exp_()  # the token sees itself: the max is finite
    weights = weights.div_(weights.sum(-1, keepdim=True))
    out, first = None, 0
    for buffer in buffers:  # weights @ [sink | window] without joining the buffers
        part = grouped_mm(weights[..., first : first + buffer.shape[1]], buffer)
        out = part if out is None else out.add_(part)
        first += buffer.shape[1]
    if config.learned_sink:
        sink_value = layer.sink_value.to(out.dtype).view(kv_heads, group, dim).repeat(batch, 1, 1)
        out = out.addcmul_(weights[..., first : first + 1], sink_value)
    if summary:
        mean_values = state.weighted_sum.view(batch * kv_heads, group, -1)[..., dim:]
        out = out.addcmul_(weights[..., -1:], mean_values)
    state.tokens_seen.add_(1)
    return out.reshape(batch, heads, dim)


def grouped_mm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(left, right)`` for ``(N, G, k) @ (N, k, m)``, without a CPU parallel region for small ``N``.

    One inner dimension (``k == 1``) is a broadcast product; a few heads (``N <= 8``) are one 2-D product of
    every left row with every right column, of which the ``N`` diagonal blocks are kept (``N`` times the
    work of ``bmm``, all of it tiny, on one thread).
    """
    count, rows, inner = left.shape
    if inner == 1:
        return left * right
    if left.is_cuda or count == 1 or count > 8:
        return torch.bmm(left, right)
    cols = right.shape[-1]
    full = left.reshape(count * rows, inner) @ right.transpose(0, 1).reshape(inner, count * cols)
    return full.view(count, rows, count, cols).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _summary_logit(layer, config, found, query, state) -> torch.Tensor:
    """The global slot's logit ``q . K / sqrt(d) + log(1 + far) + b_h`` (``-inf`` with no far token), ``(B, H)``."""
    dim = query.shape[-1]
    far = state.tokens_seen - (config.local_attention_window - 1 + config.sink_tokens)  # (B,)
    logit = torch.linalg.vecdot(query, state.weighted_sum[..., :dim]).mul_(dim**-0.5)  # (B, H)
    if found.far:  # far > 0 in every row (and it only grows)
        bias = torch.log1p(far.to(logit.dtype))
    else:
        far = far.clamp_(min=0)
        bias = torch.log1p(far.to(logit.dtype)).masked_fill_(far == 0, float("-inf"))
    return logit.add_(bias[:, None]).add_(layer.summary_bias.to(logit.dtype))
