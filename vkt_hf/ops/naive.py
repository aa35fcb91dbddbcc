"""The VKT math as slow per-token loops: the reference every backend is tested against.

Each function here has the signature and results of its twin in :mod:`.functional`, and is
written the way the definitions read: one token at a time, every sum spelled out, no scans,
no blocks, no prefix sums. It is ``O(N^2)`` and meant for tests on a few dozen tokens
(``tests/test_ops.py`` checks ``functional``, ``fused`` and ``triton`` against it, forward and
backward). Everything is computed in float64 and returned in float64; autograd differentiates
it like any other PyTorch code.

For token ``i`` of head ``h``::

    s_i = Q_i . V                                          importance score
    K_i = sum_j f_ij w_j R_j / sum_j f_ij w_j               global context, f_ij = g_h^d(i, j)
    T_i = mean of R_j over the real tokens j near i         local context
    a_i = norm( s_i / guard(K_i . T_i) )                    scalar attention

where ``d(i, j)`` counts real tokens: those strictly between ``i`` and ``j``, plus ``i`` itself
when it is real (so without padding ``d(i, j) = |i - j|``). A *null context* token of weight 1
stands just before the first token (position ``-1``), so every token has a context.
"""

from __future__ import annotations

import math

import torch

_F64 = torch.float64


def _distance(real: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """``d(i, j)``: real tokens strictly between ``i`` and ``j`` (``j = -1``: the null token), plus ``i`` if real."""
    low, high = min(i, j), max(i, j)
    return real[low + 1 : high].sum() + real[i]


def importance_scores(query: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """``s_i = Q_i . V`` for ``query`` ``(B, H, N, d)`` and ``importance`` ``(H, d)`` or ``(B, H, N, d)``."""
    batch, heads, length, _ = query.shape
    rows = []
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                v = importance[h] if importance.dim() == 2 else importance[b, h, i]
                rows.append((query[b, h, i].to(_F64) * v.to(_F64)).sum())
    return torch.stack(rows).view(batch, heads, length)


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
    """``K_i``, the decayed weighted mean of the other tokens' vectors, and the state after the last token.

    ``K_i = (f_i0 c + sum_{j in P(i)} f_ij w_j R_j) / (f_i0 + sum_{j in P(i)} f_ij w_j)`` with
    ``P(i)`` the real tokens ``j < i`` (causal) or ``j != i`` (bidirectional), ``f_ij = g^d(i, j)``
    and ``f_i0 = g^d(i, -1)`` the weight of the null token ``c`` (or, with a carried ``state``
    ``(mean m, total W)``, of the sums ``(W m, W)`` carried from the previous chunk). The new
    state is what a token after the last one would see before its own step: the weighted mean
    of ``sum_j g^(real tokens after j) w_j R_j`` (plus the decayed start) and the matching sum
    of weights. Padded positions are skipped (whatever they hold). ``chunk_size`` is ignored.

    Shapes as in :func:`vkt_hf.ops.functional.global_context`.
    """
    if state is not None and not causal:
        raise ValueError("a carried state is only defined for causal VKT layers")
    batch, heads, length, dim = stream.shape
    real = mask.to(_F64)
    log_g = torch.zeros(heads, dtype=_F64) if log_decay is None else log_decay.to(_F64)
    contexts, sums, totals = [], [], []
    for b in range(batch):
        for h in range(heads):
            start_total = torch.ones((), dtype=_F64) if state is None else state[1][b, h].to(_F64)
            start_sum = null[h].to(_F64) if state is None else state[0][b, h].to(_F64) * start_total
            weight = [weights[b, h, j].to(_F64) for j in range(length)]
            vector = [stream[b, h, j].to(_F64) for j in range(length)]
            for i in range(length):
                f0 = torch.exp(log_g[h] * _distance(real[b], i, -1))
                num, den = f0 * start_sum, f0 * start_total
                for j in range(length):
                    if j == i or (causal and j > i) or not real[b, j]:
                        continue
                    f = torch.exp(log_g[h] * _distance(real[b], i, j)) * weight[j]
                    num, den = num + f * vector[j], den + f
                contexts.append(num / den)
            # the state after the last token: every token decayed by the real tokens after it
            num = torch.exp(log_g[h] * real[b].sum()) * start_sum
            den = torch.exp(log_g[h] * real[b].sum()) * start_total
            for j in range(length):
                if real[b, j]:
                    f = torch.exp(log_g[h] * real[b, j + 1 :].sum()) * weight[j]
                    num, den = num + f * vector[j], den + f
            sums.append(num / den)
            totals.append(den)
    context = (
        torch.stack(contexts).view(batch, heads, length, dim)
        if contexts
        else stream.new_zeros(stream.shape, dtype=_F64)
    )
    return context, (torch.stack(sums).view(batch, heads, dim), torch.stack(totals).view(batch, heads))


def local_context(
    stream: torch.Tensor,
    mask: torch.Tensor,
    null: torch.Tensor,
    window: int,
    causal: bool = True,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``T_i``: the plain mean of ``R_j`` over the real tokens ``j`` in ``[i-n, i-1]`` (and ``[i+1, i+n]``).

    With a carried ``state`` (the last ``n`` vectors of the previous chunk and their mask) the
    window reaches back into it; a token with no real neighbour gets the null vector. The new
    state is the last ``n`` positions of ``[state; stream]``, as they are (padding included,
    with its mask). Shapes as in :func:`vkt_hf.ops.functional.local_context`.
    """
    if state is not None and not causal:
        raise ValueError("a carried state is only defined for causal VKT layers")
    batch, heads, length, dim = stream.shape
    if state is None:
        state = (stream.new_zeros(batch, heads, window, dim), mask.new_zeros(batch, window))
    vectors = torch.cat([state[0].to(stream.dtype), stream], dim=-2)  # position p of the chunk at p + n
    real = torch.cat([state[1].to(mask.dtype), mask], dim=-1).to(_F64)
    contexts = []
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                near = list(range(i - window, i))
                if not causal:
                    near += range(i + 1, min(i + window, length - 1) + 1)
                near = [j for j in near if real[b, j + window] > 0]
                if near:
                    contexts.append(sum(vectors[b, h, j + window].to(_F64) for j in near) / len(near))
                else:
                    contexts.append(null[h].to(_F64))
    context = (
        torch.stack(contexts).view(batch, heads, length, dim)
        if contexts
        else stream.new_zeros(stream.shape, dtype=_F64)
    )
    return context, (vectors[..., -window:, :], torch.cat([state[1].to(mask.dtype), mask], dim=-1)[..., -window:])


# the smooth normalizations, one formula each
_SMOOTH = {
    "softsign": lambda a: a / (1 + a.abs()),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "none": lambda a: a,
}


def normalize(a: torch.Tensor, normalization: str) -> torch.Tensor:
    """One ratio to a scalar attention. ``decimal``: move the decimal point left until ``|a| < 1``."""
    if normalization == "decimal":
        shifts = 0
        while math.isfinite(a.item()) and abs(a.item()) >= 10.0**shifts:
            shifts += 1  # 347 -> 0.347 (3 shifts), 0.5 -> 0.5 (none)
        return a / 10.0**shifts
    if normalization not in _SMOOTH:
        raise ValueError(f"unknown normalization {normalization!r}")
    return _SMOOTH[normalization](a)


def scalar_attention(
    scores: torch.Tensor,
    global_context: torch.Tensor,
    local_context: torch.Tensor,
    eps: float,
    normalization: str,
) -> torch.Tensor:
    """``a_i = norm(s_i / guard(K_i . T_i))``; ``guard`` keeps the sign and makes ``|K . T| >= eps``."""
    batch, heads, length = scores.shape
    out = []
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                den = (global_context[b, h, i].to(_F64) * local_context[b, h, i].to(_F64)).sum()
                den = den.clamp(min=eps) if den >= 0 else den.clamp(max=-eps)
                out.append(normalize(scores[b, h, i].to(_F64) / den, normalization))
    return torch.stack(out).view(batch, heads, length)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    window: int,
    sinks: int,
    summary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The local attention window of :func:`.functional.sliding_window_attention`, one query at a time.

    Query ``i`` (a real token) attends with softmax to the real tokens ``j <= i`` that are among the
    last ``window`` positions or among the first ``sinks`` real tokens, and to the ``summary`` slot
    ``(logit (B, H, N), value (B, H, N, d))`` when given. ``q`` ``(B, H, N, d)``, ``k`` / ``v``
    ``(B, Hk, N, d)``, ``mask`` ``(B, N)``. Padded queries get zeros.
    """
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(batch):
        real = [j for j in range(length) if mask[b, j]]
        rank = {j: r for r, j in enumerate(real)}
        for i in real:
            keys = [j for j in real if j <= i and (j > i - window or rank[j] < sinks)]
            for h in range(heads):
                kk, vv = k[b, h // group, keys], v[b, h // group, keys]
                logits = kk @ q[b, h, i] / math.sqrt(dim)
                if summary is not None:
                    logits = torch.cat([logits, summary[0][b, h, i : i + 1]])
                    vv = torch.cat([vv, summary[1][b, h, i : i + 1]])
                out[b, h, i] = torch.softmax(logits, 0) @ vv
    return out
