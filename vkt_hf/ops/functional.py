"""The math of VKT-Attention as small pure functions.

This is the one file where the formula of the paper lives. Every function takes
and returns plain tensors, so it can be tested on its own and reused by the
layer, the fast paths and the benchmarks. Layout is ``(batch, heads, tokens,
dim)`` = ``(B, H, N, d)`` throughout.

For token ``i`` of head ``h`` (see ``docs/method.md`` and ``VKT_SPEC.md``)::

    s_i = Q_i . V                                  importance score
    K_i = sum_{j in P(i)} w_ij R_j / sum w_ij       global context (weighted mean)
    T_i = mean of R_j, j in the n tokens around i  local context
    a_i = norm( s_i / guard(K_i . T_i) )           scalar attention
    y_i = a_i * U_i                                 gated vector

All sums are accumulated in float32 (or float64 when the inputs are float64),
whatever the dtype of the inputs. The local sum never subtracts two long
prefix sums (which loses all precision after ~1M float32 additions): it adds a
within-block prefix and a within-block suffix of at most ``n`` terms each.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Normalization = Literal["decimal", "softsign", "sigmoid", "tanh", "none"]
NORMALIZATIONS: tuple[str, ...] = ("decimal", "softsign", "sigmoid", "tanh", "none")


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
    intra = decayed_cumsum(xc, ldc, None, chunk_size)  # each chunk from a zero state
    # state after each chunk: s_c = exp(sum ld in chunk c) * s_{c-1} + intra[c, -1]
    after = decayed_cumsum(intra[..., -1, :], ldc.sum(-1), initial, chunk_size)  # (B, H, c, D)
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
    magnitude = a.detach().abs()
    exponent = (torch.floor(torch.log10(magnitude)) + 1).clamp(min=0)
    exponent = torch.nan_to_num(exponent, nan=0.0, posinf=0.0, neginf=0.0)
    scale = torch.pow(10.0, exponent)
    # log10 rounding can leave |a / 10^k| == 1.0 (a = 1000 -> 2.9999999): one more shift
    scale = torch.where(magnitude >= scale, scale * 10.0, scale)
    return a / scale


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
    denominator = (global_context.to(acc) * local_context.to(acc)).sum(-1)
    return normalize(scores.to(acc) / guard(denominator, eps), normalization)


def global_context(
    stream: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    null: torch.Tensor,
    log_decay: torch.Tensor | None,
    causal: bool = True,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``K_i``: the weighted (optionally distance-decayed) mean of the other tokens' vectors.

    ``K_i = (sum_{j in P(i)} g^(i-j) w_j R_j) / (sum_{j in P(i)} g^(i-j) w_j)`` with
    ``P(i) = {j < i}`` (causal) or ``{j != i}``. A learned *null context* token with weight 1
    sits just before the first real token (it decays like any token), so the first token
    has a defined context and ``K`` is always a proper mean. Distances count real tokens
    only: padding neither contributes nor ages the others.

    Args:
        stream: ``(B, H, N, D)`` the vectors ``R`` (possibly with value vectors concatenated).
        weights: ``(B, H, N)`` positive ``w_j``.
        mask: ``(B, N)`` 1 for real tokens, 0 for padding.
        null: ``(H, D)`` the null context vector.
        log_decay: ``(H,)`` ``log(gamma_h)``, or ``None`` for no distance decay.
        causal: causal (``j < i``) or bidirectional (``j != i``).
        state: ``(weighted_sum (B, H, D), weight_total (B, H))`` carried from the previous
            chunk (causal only); ``None`` starts from the null token.

    Returns:
        ``K`` ``(B, H, N, D)`` and the new state (the sums including the last token).
    """
    acc = accumulation_dtype(stream.dtype)
    batch, heads, _, dim = stream.shape
    mask = mask.to(acc)[:, None, :]  # (B, 1, N)
    w = weights.to(acc) * mask  # (B, H, N)
    x = torch.cat([stream.to(acc) * w.unsqueeze(-1), w.unsqueeze(-1)], dim=-1)  # (B, H, N, D + 1)
    ld = None if log_decay is None else log_decay.to(acc)[None, :, None] * mask  # (B, H, N)
    if state is None:
        null_sum = null.to(acc).expand(batch, heads, dim)
        initial = torch.cat([null_sum, null_sum.new_ones(batch, heads, 1)], dim=-1)  # (B, H, D + 1)
    else:
        if not causal:
            raise ValueError("a carried state is only defined for causal VKT layers")
        initial = torch.cat([state[0].to(acc), state[1].to(acc).unsqueeze(-1)], dim=-1)
    inclusive = decayed_cumsum(x, ld, initial, chunk_size)  # (B, H, N, D + 1)
    previous = torch.cat([initial.unsqueeze(-2), inclusive[..., :-1, :]], dim=-2)
    exclusive = previous if ld is None else previous * ld.exp().unsqueeze(-1)  # tokens j < i
    if not causal:  # add the tokens after i, seen from the other side (no second null token)
        rev_x, rev_ld = x.flip(-2), None if ld is None else ld.flip(-1)
        after = decayed_cumsum(rev_x, rev_ld, None, chunk_size)
        after = torch.cat([torch.zeros_like(after[..., :1, :]), after[..., :-1, :]], dim=-2)
        if rev_ld is not None:
            after = after * rev_ld.exp().unsqueeze(-1)
        exclusive = exclusive + after.flip(-2)
    context = exclusive[..., :dim] / exclusive[..., dim:]
    last = inclusive[..., -1, :]
    return context, (last[..., :dim], last[..., dim])


def local_context(
    stream: torch.Tensor,
    mask: torch.Tensor,
    null: torch.Tensor,
    window: int,
    causal: bool = True,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
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

    Returns:
        ``T`` ``(B, H, N, D)`` and the new state (the last ``n`` positions).
    """
    acc = accumulation_dtype(stream.dtype)
    batch, heads, _, dim = stream.shape
    m = mask.to(acc)[:, None, :, None].expand(batch, heads, -1, 1)  # (B, H, N, 1)
    x = torch.cat([stream.to(acc) * m, m], dim=-1)  # (B, H, N, D + 1): sums and counts
    history = None
    if state is not None:
        if not causal:
            raise ValueError("a carried state is only defined for causal VKT layers")
        hist_mask = state[1].to(acc)[:, None, :, None].expand(batch, heads, -1, 1)
        history = torch.cat([state[0].to(acc) * hist_mask, hist_mask], dim=-1)
    sums = causal_window_sum(x, window, history)
    if not causal:
        sums = sums + causal_window_sum(x.flip(-2), window).flip(-2)
    count = sums[..., dim:]
    context = torch.where(count > 0, sums[..., :dim] / count.clamp(min=1), null.to(acc)[None, :, None, :])
    # new state: the last `window` positions of history + this chunk
    prev = state if state is not None else (stream.new_zeros(batch, heads, window, dim), mask.new_zeros(batch, window))
    last_vectors = torch.cat([prev[0].to(stream.dtype), stream], dim=-2)[..., -window:, :]
    last_mask = torch.cat([prev[1].to(mask.dtype), mask], dim=-1)[..., -window:]
    return context, (last_vectors, last_mask)


def decay_logit_init(num_heads: int) -> torch.Tensor:
    """``logit(gamma_h)`` of :func:`gamma_init`: the stored parameter (``gamma = sigmoid(logit)``)."""
    gamma = gamma_init(num_heads)
    return torch.log(gamma) - torch.log1p(-gamma)


def gamma_init(num_heads: int, min_half_life: float = 1.0, max_half_life: float = 1024.0) -> torch.Tensor:
    """Per-head decays ``gamma_h`` with half-lives log-spaced from ``min`` to ``max`` tokens."""
    half_lives = torch.logspace(math.log10(min_half_life), math.log10(max_half_life), num_heads)
    return torch.exp(-math.log(2.0) / half_lives)  # (H,) in (0, 1)
