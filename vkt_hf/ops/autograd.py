"""Hand-written backward passes for the three sums VKT spends its training time in.

Autograd over the reference (:mod:`.functional`) records every chunk, flip, pad and
concatenation of the blocked scans and replays them backwards: a few hundred small kernels
per layer, most of them copies. Here each sum is one :class:`torch.autograd.Function`
whose backward is written out:

* :func:`decayed_scan` -- ``y_t = exp(ld_t) * y_{t-1} + x_t``. Its backward is the same scan
  run from the end, ``G_t = g_t + exp(ld_{t+1}) * G_{t+1}``; then ``dx = G``,
  ``d initial = exp(ld_0) * G_0`` and ``d ld_t = G_t . (y_t - x_t)``.
* :func:`window_sum` -- ``W_i = sum_{j=i-n}^{i-1} x_j`` (with ``n`` carried values before ``x``).
  It is linear; its backward is a window sum of the gradient (``dx_j = sum_{i=j+1}^{j+n} g_i``).
  Both are computed by doubling (shifted adds), not by the reference's block cumulative sums.
* :func:`local_mean` -- the causal local mean ``T_i = W_i / count_i`` (or the null vector): the
  window sums, their counts (once per sequence) and the division as one node.
* :func:`window_softmax` -- the blocked causal softmax window of
  :func:`.functional.sliding_window_attention` (plus the sink and the global read-out slot).
  The backward recomputes the probabilities from the saved row maximum and normaliser
  (flash-attention style: nothing ``(tokens x keys)`` is kept between forward and backward)
  and uses ``dS = P * (dP - rowsum(dO * O))``.

The forward passes compute what the reference computes, op for op where it matters (the
same chunked scan, the same block sums, the same softmax), so forward results agree with it
to float rounding; ``tests/test_autograd_ops.py`` checks forward and backward against
autograd of the reference (``gradcheck`` in float64). This module imports only torch and the
compiled CPU kernels (:mod:`.cpu_kernels`): the reference imports it (the layer calls
:func:`.functional.sliding_window_attention` directly), never the other way round.

Dtypes: every sum runs in the dtype of its inputs (float32 or float64: the callers pass the
accumulation dtype); under autocast the Functions switch it off inside, so a bf16 autocast
region does not lower the precision of the sums (the projections around them stay in bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels

# --------------------------------------------------------------------------------------------
# decayed scan


def _scan(x: torch.Tensor, log_decay: torch.Tensor | None, initial: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """Inclusive scan ``y_t = exp(ld_t) y_{t-1} + x_t`` of a finite ``x`` ``(..., N, D)`` (no autograd).

    Chunks of ``chunk`` tokens: inside a chunk the decays between all pairs form a ``C x C``
    matrix ``exp(cl_t - cl_s)`` (exponents <= 0, nothing overflows); the states entering the
    chunks solve the same recurrence over the chunk totals (same function, ``N / C`` tokens).
    """
    if log_decay is None:
        y = x.cumsum(dim=-2)
        return y if initial is None else y.add_(initial.unsqueeze(-2))
    n = x.shape[-2]
    if n <= chunk:
        cl = log_decay.cumsum(-1)  # (..., N)
        decay = (cl.unsqueeze(-1) - cl.unsqueeze(-2)).tril_().exp_().tril_()  # (..., N_t, N_s), 0 above the diagonal
        y = decay @ x
        if initial is not None:
            y.add_(cl.exp().unsqueeze(-1) * initial.unsqueeze(-2))
        return y
    pad = (-n) % chunk
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
        log_decay = F.pad(log_decay, (0, pad))
    *lead, total, dim = x.shape
    xc = x.reshape(*lead, total // chunk, chunk, dim)  # (..., c, C, D)
    ldc = log_decay.reshape(*lead, total // chunk, chunk)  # (..., c, C)
    y = _scan(xc, ldc, None, chunk)  # each chunk from a zero state
    after = _scan(y[..., -1, :], ldc.sum(-1), initial, chunk)  # (..., c, D): the state after each chunk
    before = after.roll(1, dims=-2)
    if initial is None:
        before[..., 0, :] = 0
    else:
        before[..., 0, :] = initial
    y.add_(ldc.cumsum(-1).exp_().unsqueeze(-1) * before.unsqueeze(-2))
    return y.reshape(*lead, total, dim)[..., :n, :]


def _reverse_scan(grad: torch.Tensor, log_decay: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """``H_t = g_t + exp(ld_{t+1}) H_{t+1}`` (``H_{N-1} = g_{N-1}``): the scan's adjoint, run from the end (the
    forward scan of the flipped gradient with the decays shifted by one)."""
    if log_decay is None:
        return _scan(grad.flip(-2), None, None, chunk).flip(-2)
    shifted = F.pad(log_decay[..., 1:], (0, 1))
    return _scan(grad.flip(-2), shifted.flip(-1), None, chunk).flip(-2)


class DecayedScan(torch.autograd.Function):
    """:func:`decayed_scan` with its backward written out (the reverse scan)."""

    @staticmethod
    def forward(ctx, x, log_decay, initial, chunk):
        with torch.autocast(x.device.type, enabled=False):
            y = _scan(x, log_decay, initial, chunk)
        ctx.chunk = chunk
        ctx.has_initial = initial is not None
        ctx.save_for_backward(x, log_decay, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, log_decay, y = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(y.dtype)
            total = _reverse_scan(grad, log_decay, ctx.chunk)  # G_t = g_t + exp(ld_{t+1}) G_{t+1}: (..., N, D)
            if log_decay is None:
                d_initial = total[..., 0, :] if ctx.has_initial else None
                return total, None, d_initial, None
            d_log_decay = None
            if ctx.needs_input_grad[1]:
                d_log_decay = (total * (y - x)).sum(-1)  # exp(ld_t) y_{t-1} = y_t - x_t
            d_initial = None
            if ctx.has_initial and x.shape[-2]:
                d_initial = log_decay[..., 0].exp().unsqueeze(-1) * total[..., 0, :]
            elif ctx.has_initial:
                d_initial = torch.zeros_like(y[..., 0, :])
        return total, d_log_decay, d_initial, None


def decayed_scan(
    x: torch.Tensor, log_decay: torch.Tensor | None, initial: torch.Tensor | None = None, chunk_size: int = 64
) -> torch.Tensor:
    """Inclusive scan ``y_t = exp(log_decay_t) * y_{t-1} + x_t`` with ``y_{-1} = initial``.

    Same contract as :func:`.functional.decayed_cumsum` for a *finite* ``x``: ``x`` ``(B, H, N, D)``,
    ``log_decay`` ``(B, H, N)`` or ``None`` (plain cumulative sum), ``initial`` ``(B, H, D)`` or
    ``None``. Returns ``(B, H, N, D)``; the backward is the reverse scan (no graph over chunks).
    """
    if chunk_size < 2:
        raise ValueError(f"chunk_size must be >= 2, got {chunk_size}")
    if x.shape[-2] == 0:
        return x.clone()
    return DecayedScan.apply(x, log_decay, initial, chunk_size)


def _cpu_kernels(x: torch.Tensor):
    """The compiled CPU kernels (:mod:`.cpu_kernels`) for a float32/float64 CPU tensor, or ``None``."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    return cpu_kernels.kernel()


class DecayedMean(torch.autograd.Function):
    """The causal global mean of :func:`.functional.global_context` as one node: the scan of the weighted
    vectors and weights, its exclusive shift and the division (see :func:`decayed_mean`). On CPU both passes
    are one sequential sweep per row in C++ (``cpu_kernels.cpp``) when the kernels are built."""

    @staticmethod
    def forward(ctx, vectors, weights, log_decay, initial, fallback, chunk):
        module = _cpu_kernels(vectors)
        ctx.cpu = module is not None
        if ctx.cpu:
            inputs = [t.contiguous() for t in (vectors, weights, initial, fallback)]
            ld = cpu_kernels.ABSENT if log_decay is None else log_decay.contiguous()
            mean, last = module.decayed_mean_forward(inputs[0], inputs[1], ld, inputs[2], inputs[3])
            ctx.save_for_backward(*inputs[:2], log_decay, *inputs[2:])
            return mean, last
        with torch.autocast(vectors.device.type, enabled=False):
            dim = vectors.shape[-1]
            x = torch.cat([vectors * weights.unsqueeze(-1), weights.unsqueeze(-1)], dim=-1)  # (B, H, N, D + 1)
            inclusive = _scan(x, log_decay, initial, chunk)
            last = inclusive[..., -1, :].clone()
            # the sums of the tokens before each one: the inclusive sums shifted by one, then decayed once
            exclusive = torch.cat([initial.unsqueeze(-2), inclusive[..., :-1, :]], dim=-2)
            if log_decay is not None:
                exclusive.mul_(log_decay.exp().unsqueeze(-1))
            sums, total = exclusive[..., :dim], exclusive[..., dim:]
            positive = total > 0
            if bool(positive.all()):
                mean = sums / total
            else:  # every weight underflowed: the starting mean is the limit
                mean = torch.where(positive, sums / torch.where(positive, total, 1), fallback.unsqueeze(-2))
        ctx.chunk = chunk
        ctx.save_for_backward(vectors, weights, log_decay, exclusive, mean)
        return mean, last

    @staticmethod
    def backward(ctx, grad_mean, grad_last):
        if ctx.cpu:
            vectors, weights, log_decay, initial, fallback = ctx.saved_tensors
            grads = cpu_kernels.kernel().decayed_mean_backward(
                cpu_kernels.ABSENT if grad_mean is None else grad_mean.to(vectors.dtype).contiguous(),
                cpu_kernels.ABSENT if grad_last is None else grad_last.to(vectors.dtype).contiguous(),
                vectors,
                weights,
                cpu_kernels.ABSENT if log_decay is None else log_decay.contiguous(),
                initial,
                fallback,
            )
            d_vectors, d_weights, d_log_decay, d_initial, d_fallback = grads
            return d_vectors, d_weights, None if log_decay is None else d_log_decay, d_initial, d_fallback, None
        vectors, weights, log_decay, exclusive, mean = ctx.saved_tensors
        dim = vectors.shape[-1]
        with torch.autocast(vectors.device.type, enabled=False):
            total = exclusive[..., dim:]  # (B, H, N, 1)
            positive = total > 0
            d_fallback = None
            if grad_mean is None:
                d_exclusive = torch.zeros_like(exclusive)
            else:
                grad_mean = grad_mean.to(mean.dtype)
                inverse = torch.where(positive, 1 / torch.where(positive, total, 1), 0)
                d_sums = grad_mean * inverse  # d mean / d sums = 1 / total
                d_total = -(d_sums * mean).sum(-1, keepdim=True)  # d mean / d total = -mean / total
                d_exclusive = torch.cat([d_sums, d_total], dim=-1)  # (B, H, N, D + 1)
                if ctx.needs_input_grad[4]:  # the fallback is the mean only where the total is 0
                    d_fallback = (
                        torch.zeros_like(grad_mean[..., 0, :])
                        if bool(positive.all())
                        else torch.where(positive, 0, grad_mean).sum(-2)
                    )
            # exclusive_t = exp(ld_t) y_{t-1}: with H_t = d exclusive_t + (dy_t), H is the reverse scan of
            # d exclusive (the last state's gradient added at the end), dx_t = dy_t = exp(ld_{t+1}) H_{t+1}
            seed = d_exclusive
            if grad_last is not None:
                seed = d_exclusive.clone()
                seed[..., -1, :] += grad_last.to(seed.dtype)
            h = _reverse_scan(seed, log_decay, ctx.chunk)  # (B, H, N, D + 1)
            decay = None if log_decay is None else log_decay.exp().unsqueeze(-1)  # (B, H, N, 1)
            dx = torch.empty_like(h)
            dx[..., :-1, :] = h[..., 1:, :] if decay is None else h[..., 1:, :] * decay[..., 1:, :]
            dx[..., -1, :] = 0 if grad_last is None else grad_last.to(dx.dtype)
            d_initial = h[..., 0, :] if decay is None else h[..., 0, :] * decay[..., 0, :]
            d_log_decay = (h * exclusive).sum(-1) if log_decay is not None and ctx.needs_input_grad[2] else None
            d_vectors = dx[..., :dim] * weights.unsqueeze(-1)
            d_weights = (dx[..., :dim] * vectors).sum(-1) + dx[..., dim]
        return d_vectors, d_weights, d_log_decay, d_initial, d_fallback, None


def decayed_mean(
    vectors: torch.Tensor,
    weights: torch.Tensor,
    log_decay: torch.Tensor | None,
    initial: torch.Tensor,
    fallback: torch.Tensor,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal decayed weighted mean of the tokens before each one, and the sums after the last.

    With ``y_t = exp(ld_t) y_{t-1} + [w_t v_t, w_t]`` (``y_{-1} = initial``), token ``t`` gets
    ``E_t = exp(ld_t) y_{t-1}`` (the tokens before it) and the mean ``E_t[:D] / E_t[D]`` (``fallback``
    where that total is 0). Backward: with ``H`` the reverse scan of ``dE`` (the last state's gradient added
    at the end), ``dy_t = exp(ld_{t+1}) H_{t+1}``, ``d ld_t = H_t . E_t``, ``d initial = exp(ld_0) H_0``.

    Args:
        vectors: ``(B, H, N, D)`` finite (padding already selected out); ``weights`` ``(B, H, N)``.
        log_decay: ``(B, H, N)`` or ``None``; ``initial``: ``(B, H, D + 1)`` the sums before the first
            token; ``fallback``: ``(B, H, D)``.

    Returns:
        ``mean`` ``(B, H, N, D)`` and ``last`` ``(B, H, D + 1)`` (the inclusive sums of the last token).
    """
    if vectors.shape[-2] == 0:
        return vectors.clone(), initial.clone()
    return DecayedMean.apply(vectors, weights, log_decay, initial, fallback, chunk_size)


# --------------------------------------------------------------------------------------------
# window sum


def _window_sum(full: torch.Tensor, window: int) -> torch.Tensor:
    """``out[i] = sum(full[i : i + window])``, ``i = 0 .. len(full) - window`` (no autograd).

    By doubling: ``p_2w[t] = p_w[t] + p_w[t + w]``, then the powers of two in ``window`` added at
    their offsets; ~``2 log2(n)`` in-place adds of shifted slices (no cumulative sums, no flips),
    each result a sum of exactly ``n`` terms (no difference of long prefix sums).
    """
    count = full.shape[-2] - window + 1
    out, offset, width, span = None, 0, 1, full
    while True:
        if window & width:
            piece = span[..., offset : offset + count, :]
            out = piece.clone() if out is None else out.add_(piece)
            offset += width
        if 2 * width > window:
            return out
        span = span[..., :-width, :] + span[..., width:, :]  # sums of 2 * width terms
        width *= 2


class WindowSum(torch.autograd.Function):
    """:func:`window_sum` with its backward written out (the window sum of the gradient, from the end)."""

    @staticmethod
    def forward(ctx, x, history, window):
        with torch.autocast(x.device.type, enabled=False):
            full = torch.cat([history.to(x.dtype), x], dim=-2)  # (..., n + N, D)
            out = _window_sum(full, window)[..., : x.shape[-2], :]
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, grad):
        window = ctx.window
        with torch.autocast(grad.device.type, enabled=False):
            # out[i] = sum full[i : i + n], so d full[p] = sum_{i = p-n+1}^{p} g_i: a window sum of the padded gradient
            d_full = _window_sum(F.pad(grad, (0, 0, window - 1, window)), window)  # (..., n + N, D)
        d_history = d_full[..., :window, :] if ctx.needs_input_grad[1] else None
        return d_full[..., window:, :], d_history, None


def window_sum(x: torch.Tensor, window: int, history: torch.Tensor | None = None) -> torch.Tensor:
    """``W_i = sum_{j=i-n}^{i-1} x_j`` (:func:`.functional.causal_window_sum`), backward written out.

    ``x`` ``(B, H, N, D)``; ``history`` ``(B, H, n, D)`` the ``n`` values before ``x`` or ``None``.
    """
    if history is None:
        history = x.new_zeros(*x.shape[:-2], window, x.shape[-1])
    return WindowSum.apply(x, history, window)


class LocalMean(torch.autograd.Function):
    """:func:`local_mean`: the window sums, their counts and the division in one Function."""

    @staticmethod
    def forward(ctx, x, real, null, history, history_real, window):
        with torch.autocast(x.device.type, enabled=False):
            full_real = torch.cat([history_real, real], dim=-1)[:, None, :, None]  # (B, 1, n + N, 1)
            full = torch.cat([history.to(x.dtype), x], dim=-2)  # (B, H, n + N, D)
            full = torch.where(full_real, full, 0)  # padding selected out, never multiplied by 0
            length = x.shape[-2]
            sums = _window_sum(full, window)[..., :length, :]  # (B, H, N, D)
            count = _window_sum(full_real.to(x.dtype), window)[..., :length, :]  # (B, 1, N, 1), exact integers
            seen = count > 0
            context = torch.where(seen, sums / count.clamp(min=1), null.to(x.dtype)[None, :, None, :])
        ctx.window = window
        ctx.save_for_backward(full_real, count)
        return context

    @staticmethod
    def backward(ctx, grad):
        full_real, count = ctx.saved_tensors
        window = ctx.window
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(count.dtype)
            seen = count > 0
            d_sums = torch.where(seen, grad / count.clamp(min=1), 0)
            d_null = torch.where(seen, 0, grad).sum((0, 2)) if ctx.needs_input_grad[2] else None
            d_full = _window_sum(F.pad(d_sums, (0, 0, window - 1, window)), window)  # (B, H, n + N, D)
            d_full = torch.where(full_real, d_full, 0)
        d_history = d_full[..., :window, :] if ctx.needs_input_grad[3] else None
        return d_full[..., window:, :], None, d_null, d_history, None, None


def local_mean(
    x: torch.Tensor,
    real: torch.Tensor,
    null: torch.Tensor,
    window: int,
    history: torch.Tensor | None = None,
    history_real: torch.Tensor | None = None,
) -> torch.Tensor:
    """The causal local mean ``T_i`` of :func:`.functional.local_context`, backward written out.

    ``T_i`` = the mean of the real tokens among the ``n`` positions before ``i`` (carried
    ``history`` first), or ``null`` where there is none. ``x`` ``(B, H, N, D)`` in the
    accumulation dtype, ``real`` ``(B, N)`` bool, ``null`` ``(H, D)``, ``history`` ``(B, H, n, D)``
    with ``history_real`` ``(B, n)`` bool, or ``None`` (no token before). Counts are summed once
    per sequence (not per head), the sums and the division are one node of the graph.
    """
    if history is None:
        history = x.new_zeros(*x.shape[:-2], window, x.shape[-1])
        history_real = torch.zeros(x.shape[0], window, dtype=torch.bool, device=x.device)
    return LocalMean.apply(x, real, null, history, history_real, window)


# --------------------------------------------------------------------------------------------
# softmax window


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x.amax(-1)) & torch.isfinite(x.amin(-1))


def _attend(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``weights @ values``; a non-finite value reaches only the queries that weigh it (as the reference)."""
    finite = _finite_rows(values)
    if finite.is_cuda or not bool(finite.all()):
        out = weights @ torch.where(finite.unsqueeze(-1), values, 0)
        sees = ((weights != 0) & ~finite.unsqueeze(-2)).any(-1, keepdim=True)
        return out.masked_fill(sees, float("nan"))
    return weights @ values


def _pairs(blocks: torch.Tensor) -> torch.Tensor:
    """``(B, Hk, b + 1, n, d)`` -> the keys of each query block, blocks ``b - 1`` and ``b``: ``(B, Hk, b, 2n, d)``."""
    return torch.cat([blocks[:, :, :-1], blocks[:, :, 1:]], dim=-2)


def _unpairs(pairs: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`_pairs`: ``(B, Hk, b, 2n, d)`` -> ``(B, Hk, b + 1, n, d)``."""
    n = pairs.shape[-2] // 2
    out = F.pad(pairs[..., n:, :], (0, 0, 0, 0, 1, 0))
    out[:, :, :-1] += pairs[..., :n, :]
    return out


class _Window:
    """The tensors of one softmax-window call, in the layout ``(B, Hk, blocks, G * n, .)``.

    Grouped query heads of one key head share its keys: stacking the ``G`` heads' query blocks
    makes each block one ``(G n) x 2n`` matrix product, not ``G`` products with copied keys.
    """

    def __init__(self, query, keys, values, allowed, sink_keys, sink_values, visible, logit, value, scale):
        batch, kv_heads, group, blocks, n, dim = query.shape
        self.shape = query.shape
        self.q = query.permute(0, 1, 3, 2, 4, 5).reshape(batch, kv_heads, blocks, group * n, dim)
        self.k2, self.v2 = _pairs(keys), _pairs(values)  # (B, Hk, b, 2n, d)
        self.allowed = allowed.permute(0, 1, 3, 2, 4, 5)  # (B, 1, b, 1, n, 2n)
        self.sink_keys, self.sink_values, self.visible = sink_keys, sink_values, visible
        self.logit = None if logit is None else self.grouped(logit.unsqueeze(-1))  # (B, Hk, b, G n, 1)
        self.value = None if value is None else self.grouped(value)  # (B, Hk, b, G n, d)
        self.scale = scale

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Hk, G, b, n, k)`` -> ``(B, Hk, b, G n, k)``."""
        batch, kv_heads, group, blocks, n, _ = self.shape
        return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, kv_heads, blocks, group * n, x.shape[-1])

    @staticmethod
    def flat(x: torch.Tensor) -> torch.Tensor:
        """``(B, Hk, b, G n, k)`` -> ``(B, Hk, b G n, k)`` (the sink is the same for every block)."""
        return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])

    def ungrouped(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Hk, b, G n, k)`` -> ``(B, Hk, G, b, n, k)``."""
        batch, kv_heads, group, blocks, n, _ = self.shape
        return x.view(batch, kv_heads, blocks, group, n, x.shape[-1]).permute(0, 1, 3, 2, 4, 5)

    def logits(self) -> torch.Tensor:
        """All logits of each query ``(B, Hk, b, G n, s + 2n + 1)``: sink, window, read-out slot (as present)."""
        batch, kv_heads, group, blocks, n, _ = self.shape
        window = (self.q @ self.k2.transpose(-1, -2)).mul_(self.scale)  # (B, Hk, b, G n, 2n)
        # torch.where, not masked_fill_: ~3x faster here with the mask broadcast over heads (and as exact)
        window = torch.where(self.allowed, window.view(batch, kv_heads, blocks, group, n, 2 * n), float("-inf"))
        parts = [window.view(batch, kv_heads, blocks, group * n, 2 * n)]
        if self.sink_keys is not None:
            sink = self.flat(self.q) @ self.sink_keys.transpose(-1, -2)  # (B, Hk, b G n, s): one product per key head
            sink = sink.mul_(self.scale).view(batch, kv_heads, blocks, group, n, -1)
            sink = torch.where(self.visible, sink, float("-inf"))
            parts.insert(0, sink.view(batch, kv_heads, blocks, group * n, -1))
        if self.logit is not None:
            parts.append(self.logit)
        logits = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return logits.clamp_(max=torch.finfo(logits.dtype).max)  # +inf would give inf - inf = NaN

    def split(self, probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Sink, window and read-out parts of the last axis of ``probs``."""
        first = 0 if self.sink_keys is None else self.sink_keys.shape[-2]
        last = first + self.k2.shape[-2]
        sink = probs[..., :first] if self.sink_keys is not None else None
        slot = probs[..., last:] if self.logit is not None else None
        return sink, probs[..., first:last], slot

    def output(self, probs: torch.Tensor) -> torch.Tensor:
        """``P @ [sink values; window values; read-out value]`` ``(B, Hk, b, G n, d)``."""
        sink, window, slot = self.split(probs)
        out = _attend(window, self.v2)
        if sink is not None:
            out = out + _attend(self.flat(sink), self.sink_values).view(out.shape)
        if slot is not None:
            out = out + slot * self.value
        return out


def _window_kernel_inputs(query, keys, values, allowed, sink_keys, sink_values, visible, logit, value):
    """The inputs of the C++ softmax window (``cpu_kernels.cpp``) in its layout, or ``None`` where it does not run
    (not on CPU, not float32/float64, mixed dtypes, kernels not built)."""
    floats = [t for t in (query, keys, values, sink_keys, sink_values, logit, value) if t is not None]
    if _cpu_kernels(query) is None or any(t.dtype != query.dtype or t.device != query.device for t in floats):
        return None
    batch, _, _, blocks, n, _ = query.shape
    absent = cpu_kernels.ABSENT
    return [
        query.contiguous(),
        keys.contiguous(),
        values.contiguous(),
        allowed.expand(batch, 1, 1, blocks, n, 2 * n).reshape(batch, blocks, n, 2 * n).contiguous(),
        absent if sink_keys is None else sink_keys.contiguous(),
        absent if sink_values is None else sink_values.contiguous(),
        absent if visible is None else visible.reshape(batch, blocks, n, -1).contiguous(),  # (B, 1, b, 1, n, s)
        absent if logit is None else logit.contiguous(),
        absent if value is None else value.contiguous(),
    ]


class WindowSoftmax(torch.autograd.Function):
    """:func:`window_softmax` with a flash-style backward (probabilities recomputed, not stored). On CPU, in
    float32/float64, both passes are C++ kernels (``cpu_kernels.cpp``) when they are built."""

    @staticmethod
    def forward(ctx, query, keys, values, allowed, sink_keys, sink_values, visible, logit, value, scale):
        ctx.scale = scale
        inputs = _window_kernel_inputs(query, keys, values, allowed, sink_keys, sink_values, visible, logit, value)
        ctx.cpu = inputs is not None
        if ctx.cpu:
            out, top, norm = cpu_kernels.kernel().window_softmax_forward(*inputs, scale)
            ctx.save_for_backward(*inputs, top, norm, out)
            return out
        with torch.autocast(query.device.type, enabled=False):
            win = _Window(query, keys, values, allowed, sink_keys, sink_values, visible, logit, value, scale)
            logits = win.logits()
            top = logits.amax(-1, keepdim=True).clamp_(min=torch.finfo(logits.dtype).min)  # -inf rows -> finite
            probs = logits.sub_(top).exp_()
            norm = probs.sum(-1, keepdim=True).clamp_(min=torch.finfo(logits.dtype).tiny)
            out = win.output(probs.div_(norm))  # (B, Hk, b, G n, d)
        ctx.save_for_backward(
            query, keys, values, allowed, sink_keys, sink_values, visible, logit, value, top, norm, out
        )
        return win.ungrouped(out).contiguous()

    @staticmethod
    def backward(ctx, grad):
        if ctx.cpu:
            *inputs, top, norm, out = ctx.saved_tensors
            grads = cpu_kernels.kernel().window_softmax_backward(
                grad.to(out.dtype).contiguous(), *inputs, ctx.scale, top, norm, out
            )
            d_q, d_keys, d_values, d_sink_keys, d_sink_values, d_logit, d_value = grads
            sink, slot = inputs[4].numel() > 0, inputs[7].numel() > 0
            return (
                d_q,
                d_keys,
                d_values,
                None,
                d_sink_keys if sink else None,
                d_sink_values if sink else None,
                None,
                d_logit if slot else None,
                d_value if slot else None,
                None,
            )
        query, keys, values, allowed, sink_keys, sink_values, visible, logit, value, top, norm, out = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            win = _Window(query, keys, values, allowed, sink_keys, sink_values, visible, logit, value, ctx.scale)
            probs = win.logits().sub_(top).exp_().div_(norm)  # (B, Hk, b, G n, slots)
            d_out = win.grouped(grad.to(out.dtype))  # (B, Hk, b, G n, d)
            delta = (d_out * out).sum(-1, keepdim=True)  # rowsum(dO * O) = sum_j P_j dP_j
            p_sink, p_window, p_slot = win.split(probs)
            # window: dP = dO V^T, dS = P (dP - delta); dq = dS K s, dK = dS^T q s, dV = P^T dO
            d_s = p_window * (d_out @ win.v2.transpose(-1, -2)).sub_(delta)  # (B, Hk, b, G n, 2n)
            d_q = (d_s @ win.k2).mul_(ctx.scale)
            d_keys = _unpairs((d_s.transpose(-1, -2) @ win.q).mul_(ctx.scale))
            d_values = _unpairs(p_window.transpose(-1, -2) @ d_out)
            d_sink_keys = d_sink_values = d_logit = d_value = None
            if p_sink is not None:  # the sink is shared by all blocks: products over (b G n) rows at once
                flat_out, flat_p = win.flat(d_out), win.flat(p_sink)  # (B, Hk, b G n, .)
                d_s = flat_p * (flat_out @ sink_values.transpose(-1, -2)).sub_(win.flat(delta))  # (B, Hk, b G n, s)
                d_q.add_((d_s @ sink_keys).mul_(ctx.scale).view(d_q.shape))
                d_sink_keys = (d_s.transpose(-1, -2) @ win.flat(win.q)).mul_(ctx.scale)  # (B, Hk, s, d)
                d_sink_values = flat_p.transpose(-1, -2) @ flat_out
            if p_slot is not None:
                d_logit = win.ungrouped(p_slot * ((d_out * win.value).sum(-1, keepdim=True) - delta)).squeeze(-1)
                d_value = win.ungrouped(p_slot * d_out)
        return (win.ungrouped(d_q), d_keys, d_values, None, d_sink_keys, d_sink_values, None, d_logit, d_value, None)


def window_softmax(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    allowed: torch.Tensor,
    sink: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    summary: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
) -> torch.Tensor:
    """The blocked softmax window of :func:`.functional.sliding_window_attention`, backward written out.

    Args:
        query: ``(B, Hk, G, b, n, d)`` the query blocks (``G`` query heads per key head).
        keys, values: ``(B, Hk, b + 1, n, d)`` the key/value blocks, block 0 the history; masked
            positions already zero.
        allowed: ``(B, 1, 1, b, n, 2n)`` bool: which keys of blocks ``b - 1`` and ``b`` each query sees.
        sink: ``(keys (B, Hk, s, d), values (B, Hk, s, d), visible (B, 1, 1, b, n, s) bool)`` or ``None``.
        summary: ``(logit (B, Hk, G, b, n), value (B, Hk, G, b, n, d))`` the read-out slot, or ``None``.
        scale: the logit scale.

    Returns:
        ``(B, Hk, G, b, n, d)``.
    """
    sink_keys, sink_values, visible = (None, None, None) if sink is None else sink
    logit, value = (None, None) if summary is None else summary
    if visible is not None:  # (B, 1, 1, b, n, s) -> the grouped layout (B, 1, b, 1, n, s)
        visible = visible.permute(0, 1, 3, 2, 4, 5)
    return WindowSoftmax.apply(query, keys, values, allowed, sink_keys, sink_values, visible, logit, value, scale)
