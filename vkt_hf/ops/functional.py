"""The math of VKT-Attention as small pure functions.

This is the one file where the formula of the paper lives. Every function takes
and returns plain tensors, so it can be tested on its own and reused by the
layer, the fast paths and the benchmarks. Layout is ``(batch, heads, tokens,
dim)`` = ``(B, H, N, d)`` throughout.

For token ``i`` of head ``h`` (see ``docs/method.md``)::

    s_i = Q_i . V                                  importance score
    K_i = sum_{j in P(i)} w_ij R_j / sum w_ij       global context (weighted mean)
    T_i = mean of R_j, j in the n tokens around i  local context
    a_i = norm( s_i / guard(K_i . T_i) )           scalar attention
    y_i = a_i * U_i                                 gated vector

All sums are accumulated in float32 (or float64 when the inputs are float64),
whatever the dtype of the inputs. The local sum never subtracts two long
prefix sums (which loses all precision after ~1M float32 additions): it adds a
within-block prefix and a within-block suffix of at most ``n`` terms each.

Non-finite values: padded positions are *selected* out, never multiplied by 0
(``0 * NaN = NaN``), so they may hold anything; a non-finite real token reaches
only the tokens after it (never the past); the global mean is summed with its
weights divided by their largest value, and its carried state is a mean and a
weight total, so finite inputs give finite means however large they are.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from ..constants import NORMALIZATIONS
from . import autograd

Normalization = Literal["decimal", "softsign", "sigmoid", "tanh", "none"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def importance_scores(query: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """``s_i = Q_i . V``, the token's scalar importance.

    Args:
        query: ``(B, H, N, d)`` the token representations ``Q``.
        importance: ``(H, d)`` a trainable vector per head (the paper's reading), or
            ``(B, H, N, d)`` a token-dependent importance ``W_V x_i``.

    Returns:
        ``(B, H, N)`` in the accumulation dtype.
    """
    acc = accumulation_dtype(query.dtype)
    if importance.dim() == 2:
        importance = importance[None, :, None, :]  # (1, H, 1, d)
    return (query.to(acc) * importance.to(acc)).sum(-1)


def context_weights(scores: torch.Tensor, mode: str) -> torch.Tensor:
    """Positive weights ``w_j`` of the global mean: ``softplus(s_j)`` or ``1``. ``(B, H, N)``."""
    if mode == "importance":
        return F.softplus(scores)
    if mode == "uniform":
        return torch.ones_like(scores)
    raise ValueError(f"context_weights must be 'importance' or 'uniform', got {mode!r}")


def decayed_cumsum(
    x: torch.Tensor,
    log_decay: torch.Tensor | None,
    initial: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Inclusive scan ``y_t = exp(log_decay_t) * y_{t-1} + x_t`` with ``y_{-1} = initial``.

    Without a decay this is a plain cumulative sum. With one, it is computed chunk-wise:
    inside a chunk of ``C`` tokens the decays between every pair are the ``C x C`` matrix
    ``exp(cl_t - cl_s)`` (exponents <= 0, so nothing overflows, and no ``gamma^(-j)`` is
    ever formed); the states entering each chunk solve the same recurrence over chunks,
    which is computed by the same function on ``N / C`` chunk totals. Total cost
    ``O(N * C * D)``, depth ``log_C(N)``.

    Args:
        x: ``(B, H, N, D)`` values to accumulate (already in the accumulation dtype).
        log_decay: ``(B, H, N)`` per-step log decay (``<= 0``), or ``None`` for no decay.
        initial: ``(B, H, D)`` state before the first token, or ``None`` for zeros.
        chunk_size: tokens per chunk of the decayed scan.

    Returns:
        ``(B, H, N, D)``.
    """
    if chunk_size < 2:
        raise ValueError(f"chunk_size must be >= 2, got {chunk_size}")
    finite = torch.isfinite(x)
    if not _all(finite):
        # a non-finite x_s reaches every y_t, t >= s (gamma^(t-s) * inf = inf), and nothing before it: the
        # matrix products below would multiply it by the 0 above the diagonal (0 * inf = NaN) into the past
        bad = torch.where(finite, torch.zeros_like(x), x).cumsum(-2)
        return _decayed_cumsum(torch.where(finite, x, 0), log_decay, initial, chunk_size) + bad
    return _decayed_cumsum(x, log_decay, initial, chunk_size)


def _all(flags: torch.Tensor) -> bool:
    """``flags.all()``, assumed ``False`` on CUDA (no host sync: the caller then takes the general path)."""
    return False if flags.is_cuda else bool(flags.all())


def _decayed_cumsum(
    x: torch.Tensor, log_decay: torch.Tensor | None, initial: torch.Tensor | None, chunk_size: int
) -> torch.Tensor:
    """:func:`decayed_cumsum` of a finite ``x``."""
    if log_decay is None:
        y = x.cumsum(dim=-2)
        return y if initial is None else y + initial.unsqueeze(-2)
    n = x.shape[-2]
    if n <= chunk_size:
        cl = log_decay.cumsum(-1)  # (B, H, N)
        diff = cl.unsqueeze(-1) - cl.unsqueeze(-2)  # (B, H, N_t, N_s)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        decay = diff.masked_fill(~causal, float("-inf")).exp()
        y = decay @ x  # (B, H, N, D)
        if initial is not None:
            y = y + cl.exp().unsqueeze(-1) * initial.unsqueeze(-2)
        return y
    pad = (-n) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
        log_decay = F.pad(log_decay, (0, pad))
    *lead, total, dim = x.shape
    chunks = total // chunk_size
    xc = x.reshape(*lead, chunks, chunk_size, dim)  # (B, H, c, C, D)
    ldc = log_decay.reshape(*lead, chunks, chunk_size)  # (B, H, c, C)
    intra = _decayed_cumsum(xc, ldc, None, chunk_size)  # each chunk from a zero state
    # state after each chunk: s_c = exp(sum ld in chunk c) * s_{c-1} + intra[c, -1]
    after = _decayed_cumsum(intra[..., -1, :], ldc.sum(-1), initial, chunk_size)  # (B, H, c, D)
    before = torch.cat([_zeros_or(initial, after[..., :1, :]), after[..., :-1, :]], dim=-2)
    y = intra + ldc.cumsum(-1).exp().unsqueeze(-1) * before.unsqueeze(-2)
    return y.reshape(*lead, total, dim)[..., :n, :]


def _zeros_or(initial: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if initial is None else initial.unsqueeze(-2)


def causal_window_sum(x: torch.Tensor, window: int, history: torch.Tensor | None = None) -> torch.Tensor:
    """``W_i = sum_{j=i-n}^{i-1} x_j``: the sum over the ``n`` tokens strictly before ``i``.

    Computed without long prefix sums: split the (shifted) sequence in blocks of ``n``;
    the window ending at ``i`` is a prefix of ``i``'s block plus a suffix of the block
    before, each a sum of at most ``n`` terms. Exact to float rounding at any length.

    Args:
        x: ``(B, H, N, D)``.
        window: ``n >= 1``.
        history: ``(B, H, n, D)`` the ``n`` values just before ``x`` (carried state), or
            ``None`` for zeros.

    Returns:
        ``(B, H, N, D)``.
    """
    n_tokens = x.shape[-2]
    if history is None:
        history = x.new_zeros(*x.shape[:-2], window, x.shape[-1])
    # with x_i at index i + n of `full`, W_i is the window of n entries of `full` ending at i + n - 1
    full = torch.cat([history, x], dim=-2)  # (B, H, n + N, D)
    pad = (-full.shape[-2]) % window
    full = F.pad(full, (0, 0, 0, pad))
    *lead, total, dim = full.shape
    blocks = full.reshape(*lead, total // window, window, dim)  # (B, H, b, n, D)
    prefix = blocks.cumsum(-2)  # sum of offsets 0..o of block b
    suffix = blocks.flip(-2).cumsum(-2).flip(-2)  # sum of offsets o..n-1 of block b
    # the window ending at offset o of block b also takes offsets o+1..n-1 of block b-1
    tail = F.pad(suffix[..., 1:, :], (0, 0, 0, 1))  # tail[b, o] = suffix[b, o + 1]
    tail = F.pad(tail[..., :-1, :, :], (0, 0, 0, 0, 1, 0))  # from block b-1
    sums = (prefix + tail).reshape(*lead, total, dim)
    return sums[..., window - 1 : window - 1 + n_tokens, :]


def guard(denominator: torch.Tensor, eps: float) -> torch.Tensor:
    """Keep the sign, bound ``|den| >= eps`` (zero counts as positive). Never 0, inf or NaN."""
    return torch.where(denominator >= 0, denominator.clamp(min=eps), denominator.clamp(max=-eps))


def decimal_normalize(a: torch.Tensor) -> torch.Tensor:
    """The paper's "add a decimal point": shift the decimal point left until ``|a| < 1``.

    ``a / 10^max(0, floor(log10|a|) + 1)``; the exponent is a constant under autograd, so
    the gradient is ``1 / 10^k``. Examples: 347 -> 0.347, 9.99 -> 0.999, 0.5 -> 0.5,
    -42 -> -0.42.
    """
    # the exponent is found in float64, where 10^k is exact up to 10^22 (in float32, 10^11 rounds
    # below itself), and corrected both ways: log10 rounds near a power of ten, so log10(1000) may
    # come out as 2.9999999 (one shift short) and log10(999.99994) as 3.0 (one too many)
    magnitude = a.detach().abs().double()
    exponent = (torch.floor(torch.log10(magnitude)) + 1).clamp(min=0)
    exponent = torch.nan_to_num(exponent, nan=0.0, posinf=0.0, neginf=0.0)
    exponent = torch.where((exponent > 0) & (magnitude < torch.pow(10.0, exponent - 1)), exponent - 1, exponent)
    exponent = torch.where(magnitude >= torch.pow(10.0, exponent), exponent + 1, exponent)
    shifted = (a.double() / torch.pow(10.0, exponent)).to(a.dtype)
    # |a| < 10^k, but a / 10^k may still round to 1.0 in a's dtype: the largest value below 1 then
    below_one = torch.nextafter(torch.ones((), dtype=a.dtype), torch.zeros((), dtype=a.dtype)).item()
    return torch.where(torch.isfinite(shifted), shifted.clamp(-below_one, below_one), shifted)


def normalize(a: torch.Tensor, normalization: str) -> torch.Tensor:
    """Turn the raw ratio into the scalar attention (``decimal`` is the literal reading)."""
    if normalization == "decimal":
        return decimal_normalize(a)
    if normalization == "softsign":
        return F.softsign(a)
    if normalization == "sigmoid":
        return torch.sigmoid(a)
    if normalization == "tanh":
        return torch.tanh(a)
    if normalization == "none":
        return a
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def scalar_attention(
    scores: torch.Tensor,
    global_context: torch.Tensor,
    local_context: torch.Tensor,
    eps: float,
    normalization: str,
) -> torch.Tensor:
    """``a_i = norm(s_i / guard(K_i . T_i))``.

    Args:
        scores: ``(B, H, N)`` importance ``s``.
        global_context: ``(B, H, N, d)`` ``K``.
        local_context: ``(B, H, N, d)`` ``T``.

    Returns:
        ``(B, H, N)`` in the accumulation dtype.
    """
    acc = accumulation_dtype(scores.dtype)
    finite = torch.finfo(acc).max  # a ratio beyond the accumulation dtype saturates there (no inf / inf)
    denominator = (global_context.to(acc) * local_context.to(acc)).sum(-1)
    ratio = scores.to(acc) / guard(denominator, eps)
    overflowed = ~torch.isfinite(denominator)
    if not _all(~overflowed):  # K . T overflowed (contexts ~1e19 and up): redone in float64 for those tokens,
        # where a product of two float32 cannot overflow (the others keep their bits: causality is exact)
        wide = (global_context.double() * local_context.double()).sum(-1)
        wide = (scores.double() / guard(wide, eps)).clamp(-finite, finite).to(acc)
        ratio = torch.where(overflowed, wide, ratio)
    return normalize(ratio.clamp(-finite, finite), normalization)


class GlobalInputs(NamedTuple):
    """What every backend of :func:`global_context` starts from (see :func:`global_inputs`)."""

    use: torch.Tensor  # (B, H, N) bool: real tokens with a finite vector and weight, the ones summed
    weights: torch.Tensor  # (B, H, N) w_j / scale, 0 where not `use`
    initial: torch.Tensor  # (B, H, D + 1) the starting sums (mean * total, total) / scale
    start_mean: torch.Tensor  # (B, H, D) the starting mean (null context or carried state)
    scale: torch.Tensor  # (B, H) the common scale of all weights (no gradient: the means do not depend on it)
    bad: torch.Tensor  # (B, H, N) bool: real tokens with a non-finite vector or weight


def global_inputs(
    stream: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    null: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None,
    causal: bool,
) -> GlobalInputs:
    """The weights and starting sums of :func:`global_context`, scaled so no sum overflows.

    A mean does not change when every weight is divided by one number, so the weights and the
    starting total are divided by the power of two just above their largest value (per sequence
    and head): each weighted vector ``w_j R_j / scale`` is then at most ``|R_j|``, and ``w R``
    never overflows for finite ``R``. Padded positions and real tokens whose vector or weight is not finite are selected
    out (never multiplied by 0: ``0 * NaN = NaN``); the latter are returned as ``bad``.
    """
    if state is not None and not causal:
        raise ValueError("a carried state is only defined for causal VKT layers")
    acc = accumulation_dtype(stream.dtype)
    batch, heads, _, dim = stream.shape
    w = weights.to(acc)
    finite = torch.isfinite(w) & finite_rows(stream)  # (B, H, N)
    real = (mask != 0)[:, None, :]  # (B, 1, N)
    use = real & finite
    if state is None:
        start_mean = null.to(acc).expand(batch, heads, dim)
        start_total = torch.ones(batch, heads, dtype=acc, device=stream.device)
    else:
        start_mean, start_total = state[0].to(acc), state[1].to(acc)
    w = torch.where(use, w, 0)
    peak = w.detach().amax(-1) if w.shape[-1] else torch.zeros_like(start_total)
    peak = torch.maximum(start_total.detach(), peak).clamp(min=torch.finfo(acc).tiny)  # (B, H)
    # a power of two: dividing by it is exact, so every sum is the same bits whatever the scale (a huge
    # later token changes the scale, not the earlier tokens' results: causality holds bit for bit)
    top = 127 if acc == torch.float32 else 1023  # 2^128 is inf in float32
    exponent = torch.frexp(peak).exponent.clamp(max=top)
    scale = torch.ldexp(torch.ones_like(peak), exponent)
    total = start_total / scale
    initial = torch.cat([start_mean * total.unsqueeze(-1), total.unsqueeze(-1)], dim=-1)
    return GlobalInputs(use, w / scale.unsqueeze(-1), initial, start_mean, scale, real & ~finite)


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``isfinite(x).all(-1)``, ~10x faster on CPU: the largest and smallest entries are finite (NaN propagates)."""
    if x.shape[-1] == 0:
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    return torch.isfinite(x.amax(-1)) & torch.isfinite(x.amin(-1))


def global_outputs(
    context: torch.Tensor,
    last: torch.Tensor,
    inputs: GlobalInputs,
    causal: bool = True,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``K`` and the new state, from what :func:`global_context`'s backends computed.

    Args:
        context: ``(B, H, N, D)`` the means ``K`` (:func:`weighted_mean` of the scaled sums).
        last: ``(B, H, D + 1)`` the scaled sum and weight total a token after the last one sees.

    A token that sees a ``bad`` token gets NaN (only tokens after it when causal, so a
    non-finite token never reaches the past). The state is ``(weighted mean, weight total)``:
    a mean cannot overflow where a sum of weighted vectors would.
    """
    dim = context.shape[-1]
    mean = weighted_mean(last, inputs.start_mean)
    total = last[..., dim] * inputs.scale
    bad = inputs.bad
    if not _all(~bad):
        count = bad.sum(-1, keepdim=True)
        sees = (bad.cumsum(-1) - bad.long() if causal else count - bad.long()) > 0  # (B, H, N)
        context = context.masked_fill(sees.unsqueeze(-1), float("nan"))
        mean = mean.masked_fill(count > 0, float("nan"))
        total = total.masked_fill(count[..., 0] > 0, float("nan"))
    return context, (mean, total)


def weighted_mean(sums: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``sums[..., :D] / sums[..., D]``, or ``fallback`` where the total is 0 (no NaN gradient either).

    A total underflows to 0 only when every weight is tiny (a strong decay over many tokens of
    weight ~0); the starting mean ``fallback`` is then the limit of the ratio.
    """
    dim = sums.shape[-1] - 1
    total = sums[..., dim:]
    positive = total > 0
    if _all(positive):
        return sums[..., :dim] / total
    return torch.where(positive, sums[..., :dim] / torch.where(positive, total, 1), fallback)


def global_context(
    stream: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    null: torch.Tensor,
    log_decay: torch.Tensor | None,
    causal: bool = True,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = 64,
    *,
    custom_backward: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``K_i``: the weighted (optionally distance-decayed) mean of the other tokens' vectors.

    ``K_i = (sum_{j in P(i)} g^(i-j) w_j R_j) / (sum_{j in P(i)} g^(i-j) w_j)`` with
    ``P(i) = {j < i}`` (causal) or ``{j != i}``. A learned *null context* token with weight 1
    sits just before the first real token (it decays like any token), so the first token
    has a defined context and ``K`` is always a proper mean. Distances count real tokens
    only: padding neither contributes nor ages the others. The sums are taken with every
    weight divided by a common scale (:func:`global_inputs`), so they do not overflow.

    Args:
        stream: ``(B, H, N, D)`` the vectors ``R`` (possibly with value vectors concatenated).
        weights: ``(B, H, N)`` positive ``w_j``.
        mask: ``(B, N)`` 1 for real tokens, 0 for padding.
        null: ``(H, D)`` the null context vector.
        log_decay: ``(H,)`` ``log(gamma_h)``, or ``None`` for no distance decay.
        causal: causal (``j < i``) or bidirectional (``j != i``).
        state: ``(weighted_mean (B, H, D), weight_total (B, H))`` carried from the previous
            chunk (causal only); ``None`` starts from the null token.
        custom_backward: causal, the whole mean as :func:`.autograd.decayed_mean` (the same forward, backward
            written out: the reverse scan); bidirectional, the scans through :func:`.autograd.decayed_scan`;
            instead of autograd over the chunks.

    Returns:
        ``K`` ``(B, H, N, D)`` and the new state (the mean and total including the last token).
    """
    scan = autograd.decayed_scan if custom_backward else _decayed_cumsum
    inputs = global_inputs(stream, weights, mask, null, state, causal)
    acc = inputs.weights.dtype
    w = inputs.weights  # (B, H, N)
    vectors = stream.to(acc) if _all(inputs.use) else torch.where(inputs.use.unsqueeze(-1), stream.to(acc), 0)
    ld = None if log_decay is None else log_decay.to(acc)[None, :, None] * (mask != 0).to(acc)[:, None, :]
    if custom_backward and causal:  # the scan, its shift and the division as one node
        mean, last = autograd.decayed_mean(vectors, w, ld, inputs.initial, inputs.start_mean, chunk_size)
        return global_outputs(mean, last, inputs, causal)
    x = torch.cat([vectors * w.unsqueeze(-1), w.unsqueeze(-1)], dim=-1)  # (B, H, N, D + 1)
    inclusive = scan(x, ld, inputs.initial, chunk_size)  # (B, H, N, D + 1)
    previous = torch.cat([inputs.initial.unsqueeze(-2), inclusive[..., :-1, :]], dim=-2)[..., : x.shape[-2], :]
    exclusive = previous if ld is None else previous * ld.exp().unsqueeze(-1)  # tokens j < i
    if not causal:  # add the tokens after i, seen from the other side (no second null token)
        rev_x, rev_ld = x.flip(-2), None if ld is None else ld.flip(-1)
        after = scan(rev_x, rev_ld, None, chunk_size)
        after = torch.cat([torch.zeros_like(after[..., :1, :]), after[..., :-1, :]], dim=-2)
        if rev_ld is not None:
            after = after * rev_ld.exp().unsqueeze(-1)
        exclusive = exclusive + after.flip(-2)
    last = inclusive[..., -1, :] if x.shape[-2] else inputs.initial
    return global_outputs(weighted_mean(exclusive, inputs.start_mean.unsqueeze(-2)), last, inputs, causal)


def local_context(
    stream: torch.Tensor,
    mask: torch.Tensor,
    null: torch.Tensor,
    window: int,
    causal: bool = True,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    custom_backward: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``T_i``: the plain mean of the vectors of the ``n`` tokens before (and after) ``i``.

    Causal: ``j in [i-n, i-1]``; bidirectional: ``j in [i-n, i+n], j != i``. At the edges
    the mean is over the tokens that exist; with none at all (the first token) ``T`` is the
    null context vector. Padded positions are not tokens.

    Args:
        stream: ``(B, H, N, D)``.
        mask: ``(B, N)`` 1 for real tokens.
        null: ``(H, D)``.
        window: ``n``.
        state: ``(last vectors (B, H, n, D), their mask (B, n))`` from the previous chunk.
        custom_backward: compute ``T`` with :func:`.autograd.local_mean` (causal; window sums,
            counts and division as one node, backward written out) or, bidirectional,
            :func:`.autograd.window_sum`, instead of autograd over the blocks.

    Returns:
        ``T`` ``(B, H, N, D)`` and the new state (the last ``n`` positions).
    """
    acc = accumulation_dtype(stream.dtype)
    batch, heads, _, dim = stream.shape
    if state is not None and not causal:
        raise ValueError("a carried state is only defined for causal VKT layers")
    if custom_backward and causal:
        past = (None, None) if state is None else (state[0].to(acc), state[1] != 0)
        context = autograd.local_mean(stream.to(acc), mask != 0, null.to(acc), window, *past)
    else:
        context = _local_mean(stream.to(acc), mask, null.to(acc), window, causal, state, custom_backward)
    # new state: the last `window` positions of history + this chunk
    prev = state if state is not None else (stream.new_zeros(batch, heads, window, dim), mask.new_zeros(batch, window))
    last_vectors = torch.cat([prev[0].to(stream.dtype), stream], dim=-2)[..., -window:, :]
    last_mask = torch.cat([prev[1].to(mask.dtype), mask], dim=-1)[..., -window:]
    return context, (last_vectors, last_mask)


def _local_mean(
    x: torch.Tensor,
    mask: torch.Tensor,
    null: torch.Tensor,
    window: int,
    causal: bool,
    state: tuple[torch.Tensor, torch.Tensor] | None,
    custom_backward: bool,
) -> torch.Tensor:
    """``T`` of :func:`local_context` from ``x`` ``(B, H, N, D)`` in the accumulation dtype (the reference path)."""
    heads, dim = x.shape[1], x.shape[-1]
    counted = counted_vectors(x, mask, heads)  # (B, H, N, D + 1): sums and counts
    history = None if state is None else counted_vectors(state[0].to(x.dtype), state[1], heads)
    window_sum = autograd.window_sum if custom_backward else causal_window_sum
    sums = window_sum(counted, window, history)
    if not causal:
        sums = sums + window_sum(counted.flip(-2), window).flip(-2)
    count = sums[..., dim:]
    return torch.where(count > 0, sums[..., :dim] / count.clamp(min=1), null[None, :, None, :])


def counted_vectors(vectors: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """``[R_j, 1]`` for real tokens and zeros for padding ``(B, H, N, D + 1)``: padding is selected
    out, never multiplied by 0 (``0 * NaN = NaN``)."""
    real = (mask != 0)[:, None, :, None].expand(-1, heads, -1, 1)  # (B, H, N, 1)
    selected = vectors if _all(real) else torch.where(real, vectors, 0)
    return torch.cat([selected, real.to(vectors.dtype)], dim=-1)


def decay_logit_init(num_heads: int) -> torch.Tensor:
    """``logit(gamma_h)`` of :func:`gamma_init`: the stored parameter (``gamma = sigmoid(logit)``)."""
    gamma = gamma_init(num_heads)
    return torch.log(gamma) - torch.log1p(-gamma)


def gamma_init(num_heads: int, min_half_life: float = 1.0, max_half_life: float = 1024.0) -> torch.Tensor:
    """Per-head decays ``gamma_h`` with half-lives log-spaced from ``min`` to ``max`` tokens."""
    half_lives = torch.logspace(math.log10(min_half_life), math.log10(max_half_life), num_heads)
    return torch.exp(-math.log(2.0) / half_lives)  # (H,) in (0, 1)


def rank_of_real_tokens(mask: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """How many real tokens precede each position: ``(B, N)`` int64 (``seen`` ``(B,)`` carried in).

    A padded position gets the rank of the next real token, which is harmless: padded
    positions are selected out wherever the rank is used.
    """
    real = mask.to(torch.int64)
    rank = real.cumsum(-1) - real
    return rank if seen is None else rank + seen.to(torch.int64)[:, None]


def fill_sink(
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    rank: torch.Tensor,
    sink: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Store the first ``s`` real tokens of the sequence as the attention sink.

    Slot ``j`` of the sink holds the real token of rank ``j``; slots already filled by an
    earlier chunk are kept. Cost ``O(N * s + s * d)``.

    Args:
        keys, values: ``(B, Hk, N, d)`` of this chunk.
        mask: ``(B, N)`` bool, real tokens.
        rank: ``(B, N)`` real tokens before each position (:func:`rank_of_real_tokens`).
        sink: ``(keys (B, Hk, s, d), values (B, Hk, s, d), filled (B, s) bool)`` so far.

    Returns:
        The updated sink, same shapes.
    """
    sink_keys, sink_values, filled = sink
    if keys.shape[2] == 0:
        return sink
    slots = torch.arange(filled.shape[-1], device=mask.device)
    select = mask[:, :, None] & (rank[:, :, None] == slots)  # (B, N, s): the token of each slot
    found = select.any(1)  # (B, s)
    # gathered, not summed with one-hot weights: the other tokens may hold anything (0 * NaN = NaN)
    index = select.to(torch.int8).argmax(1)[:, None, :, None]  # (B, 1, s, 1)
    new_keys = keys.gather(2, index.expand(-1, keys.shape[1], -1, keys.shape[-1]))
    new_values = values.gather(2, index.expand(-1, values.shape[1], -1, values.shape[-1]))
    keep = (filled | ~found)[:, None, :, None]
    return (
        torch.where(keep, sink_keys.to(new_keys.dtype), new_keys),
        torch.where(keep, sink_values.to(new_values.dtype), new_values),
        filled | found,
    )


def sliding_window_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_mask: torch.Tensor,
    window: int,
    history: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    sink: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    sink_visible: torch.Tensor | None = None,
    scale: float | None = None,
    summary: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    custom_backward: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Exact causal softmax attention over the last ``window`` positions (the token itself
    included), plus optional sink keys/values that every query may attend to.

    Blocked so nothing is ``N x N``: the sequence (after ``window`` positions of history) is cut
    into blocks of ``window`` tokens and each query block attends to its own block and the one
    before, ``O(N * window * d)`` in all. The sink and the window share one softmax.

    Args:
        query: ``(B, H, N, d)``.
        keys, values: ``(B, Hk, N, d)`` with ``H`` a multiple of ``Hk`` (grouped-query heads).
        key_mask: ``(B, N)`` bool: positions that are keys of the window (real tokens that are
            not sink tokens). Masked positions are selected out, so they may hold anything.
        window: ``n >= 1``.
        history: ``(keys (B, Hk, n, d), values (B, Hk, n, d), mask (B, n))``: the ``n``
            positions just before ``query`` (carried state), or ``None``.
        sink: ``(keys (B, Hk, s, d), values (B, Hk, s, d), filled (B, s))`` or ``None``.
        sink_visible: ``(B, N, s)`` bool, which sink slots each query may see (causality
            inside the first tokens); default: the filled ones.
        scale: logit scale, default ``d ** -0.5``.
        summary: ``(logit (B, H, N), value (B, H, N, d))``: one more slot per query in the same
            softmax (the VKT global read-out, see ``docs/method.md``); a ``-inf`` logit hides it.
        custom_backward: run the softmax through :func:`.autograd.window_softmax`, whose backward
            is written out (recomputed probabilities, no autograd graph over the blocks) and whose two
            passes are C++ kernels on CPU; ``False`` is autograd over the reference (the layer decides
            with :func:`vkt_hf.ops.window_custom_backward` and :func:`vkt_hf.ops.window_cpu_kernel`).

    Returns:
        ``(B, H, N, d)`` (a query with no visible key gets zeros) and the new history: the last
        ``n`` positions' keys, values and mask, for the next chunk.
    """
    batch, heads, length, dim = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    if history is None:
        history = (
            keys.new_zeros(batch, kv_heads, window, dim),
            values.new_zeros(batch, kv_heads, window, dim),
            key_mask.new_zeros(batch, window),
        )
    full_mask = torch.cat([history[2].bool(), key_mask.bool()], dim=-1)  # (B, n + N)
    full_keys = torch.cat([history[0].to(keys.dtype), keys], dim=-2).masked_fill(~full_mask[:, None, :, None], 0)
    full_values = torch.cat([history[1].to(values.dtype), values], dim=-2).masked_fill(~full_mask[:, None, :, None], 0)
    new_history = (full_keys[..., -window:, :], full_values[..., -window:, :], full_mask[:, -window:])
    pad = (-(window + length)) % window
    if pad:
        full_keys = F.pad(full_keys, (0, 0, 0, pad))
        full_values = F.pad(full_values, (0, 0, 0, pad))
        full_mask = F.pad(full_mask, (0, pad))
    blocks = (window + length + pad) // window  # block 0 is the history
    kb = full_keys.view(batch, kv_heads, blocks, window, dim)
    vb = full_values.view(batch, kv_heads, blocks, window, dim)
    mb = full_mask.view(batch, blocks, window)
    m2 = torch.cat([mb[:, :-1], mb[:, 1:]], dim=-1)  # (B, b', 2n): the keys of query block b are blocks b-1, b
    q = F.pad(query, (0, 0, 0, pad)).view(batch, kv_heads, group, blocks - 1, window, dim)
    # query offset o sees key offset u of the pair when 0 <= (n + o - u) <= n - 1
    offsets = torch.arange(window, device=query.device)
    rel = window + offsets[:, None] - torch.arange(2 * window, device=query.device)[None, :]
    allowed = ((rel >= 0) & (rel < window))[None, None, None, None] & m2[:, None, None, :, None, :]
    if sink is not None:
        s = sink[2].shape[-1]
        visible = (
            sink[2][:, None, :].expand(batch, length, s) if sink_visible is None else sink_visible & sink[2][:, None]
        )
        visible = F.pad(visible, (0, 0, 0, pad)).view(batch, 1, 1, blocks - 1, window, s)
        sink_values = sink[1].masked_fill(~sink[2][:, None, :, None], 0).to(q.dtype)
        sink = (sink[0].to(q.dtype), sink_values, visible)
    if summary is not None:
        logit = F.pad(summary[0], (0, pad), value=float("-inf")).view(batch, kv_heads, group, blocks - 1, window)
        value = F.pad(summary[1], (0, 0, 0, pad)).view(batch, kv_heads, group, blocks - 1, window, dim)
        summary = (logit.to(q.dtype), value.to(q.dtype))
    core = autograd.window_softmax if custom_backward else _window_core
    out = core(q, kb, vb, allowed, sink, summary, scale)  # (B, Hk, G, b', n, d)
    return out.reshape(batch, heads, (blocks - 1) * window, dim)[:, :, :length], new_history


def _window_core(
    q: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    allowed: torch.Tensor,
    sink: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    summary: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
) -> torch.Tensor:
    """The softmax of :func:`sliding_window_attention` over prepared blocks (the reference, autograd over it).

    Shapes as in :func:`.autograd.window_softmax`: ``q`` ``(B, Hk, G, b, n, d)``, ``kb``/``vb``
    ``(B, Hk, b + 1, n, d)``, ``allowed`` ``(B, 1, 1, b, n, 2n)``, ``sink`` = (keys, values with
    unfilled slots zeroed, visible ``(B, 1, 1, b, n, s)``), ``summary`` = (logit, value). Returns
    ``(B, Hk, G, b, n, d)``.
    """
    k2 = torch.cat([kb[:, :, :-1], kb[:, :, 1:]], dim=-2)  # (B, Hk, b, 2n, d)
    v2 = torch.cat([vb[:, :, :-1], vb[:, :, 1:]], dim=-2)
    logits = (q @ k2.unsqueeze(2).transpose(-1, -2)) * scale  # (B, Hk, G, b, n, 2n)
    logits = logits.masked_fill(~allowed, float("-inf"))
    if sink is not None:
        sink_keys, sink_values, visible = sink
        s = sink_keys.shape[-2]
        sink_logits = (q @ sink_keys[:, :, None, None].transpose(-1, -2)) * scale  # (B, Hk, G, b, n, s)
        logits = torch.cat([sink_logits.masked_fill(~visible, float("-inf")), logits], dim=-1)
    if summary is not None:
        logits = torch.cat([logits, summary[0].unsqueeze(-1).to(logits.dtype)], dim=-1)
    # a logit past the dtype's range saturates there (+inf - +inf would be NaN in the softmax)
    logits = logits.clamp(max=torch.finfo(logits.dtype).max)
    top = logits.amax(-1, keepdim=True).clamp(min=torch.finfo(logits.dtype).min)  # -inf rows -> finite
    weights = (logits - top).exp()
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(logits.dtype).tiny)
    first = 0
    out = 0
    if sink is not None:
        out = _attend(weights[..., :s], sink_values[:, :, None, None])
        first = s
    out = out + _attend(weights[..., first : first + k2.shape[-2]], v2.unsqueeze(2))  # (B, Hk, G, b, n, d)
    if summary is not None:
        out = out + weights[..., -1:] * summary[1].to(out.dtype)
    return out


def _attend(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``weights @ values``, where a non-finite value reaches only the queries that give it weight.

    A key outside a query's window (a later token of the same block) has weight exactly 0, and
    ``0 * inf = NaN`` would carry a non-finite value to earlier queries: such values are set
    to 0 in the product, and the queries that do weigh them get NaN.
    """
    finite = finite_rows(values)  # (..., keys)
    if _all(finite):
        return weights @ values
    out = weights @ torch.where(finite.unsqueeze(-1), values, 0)
    sees = ((weights != 0) & ~finite.unsqueeze(-2)).any(-1, keepdim=True)  # (..., queries, 1)
    return out.masked_fill(sees, float("nan"))


def rotary_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables ``(cos, sin)``, each ``(B, N, dim)``, at integer ``positions`` ``(B, N)`` (Llama's layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[..., None] * inv_freq  # (B, N, d/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, N, d)`` by the RoPE tables ``(B, N, d)`` (the half-split convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None].to(x.dtype) + rotated * sin[:, None].to(x.dtype)
