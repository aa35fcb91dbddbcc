"""Fast CPU/GPU path for the two context sums, in plain PyTorch (no compiler needed).

Same signatures and results as :func:`vkt_hf.ops.functional.global_context` and
:func:`vkt_hf.ops.functional.local_context` (checked against both references in ``tests/test_ops.py``
and ``tests/test_ops_fast.py``), but
computed block by block along the sequence, carrying the state, so every temporary is the
size of one block (``B x H x block x D``, about a megabyte: it stays in cache) instead of
the whole ``(B, H, N, D)`` sequence, and the decay matrices are shared by all chunks.

Global context (``K``), with a per-head decay ``g = exp(log_decay_h)`` (``g = 1`` without a
decay). A block of ``L`` tokens is cut into chunks of ``C``; with ``X`` the weighted vectors
``[w_j R_j, w_j]`` of one chunk and ``S_k`` the state entering chunk ``k``::

    exclusive_t = sum_{s<t} g^(t-s) X_s + g^(t+1) S_k         one (C+1) x C matrix per head,
    total_k     = sum_s g^(C-1-s) X_s                         the same for every chunk
    S_k         = sum_{j<k} g^(C(k-1-j)) total_j + g^(Ck) S_0  one (c+1) x c matrix per head

Every exponent is ``<= 0`` (no ``g^(-j)``, which overflows after a few hundred tokens of a
strong decay), sums are float32 matrix products of at most ``C`` (or ``c``) terms. Padding
with a decay makes the decay token-dependent; that case (and the bidirectional mixer) goes
to the reference.

Local context (``T``): the sum of the ``n`` previous vectors of ``[history; block]`` by
doubling (``p_2k[t] = p_k[t] + p_k[t+k]``, about ``2 log2 n`` in-cache passes) — exact sums
of ``n`` terms, never a difference of long prefix sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import functional as ref

#: tokens per block processed at once (the size of every temporary along the sequence)
BLOCK = 512
#: tokens per chunk of the decayed scan inside a block (the shared decay matrix is C x C)
CHUNK = 32


def _decay_matrices(
    log_decay: torch.Tensor, chunk: int, chunks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-head matrices of the chunked decayed scan (all exponents ``<= 0``).

    Args:
        log_decay: ``(H,)`` ``log g`` in the accumulation dtype (zeros: no decay).

    Returns:
        ``inner (H, C+1, C)``: rows ``t < C`` give ``g^(t-s)`` for ``s < t`` (exclusive sums),
        row ``C`` gives ``g^(C-1-s)`` (the chunk total);
        ``enter (H, C)``: ``g^(t+1)``, the weight of the state entering the chunk at row ``t``;
        ``outer (H, c+1, c)``: ``g^(C(k-1-j))`` for ``j < k``, the states entering chunk ``k``
        (row ``c``: the state after the block);
        ``start (H, c+1)``: ``g^(Ck)``, the weight of the state entering the block.
    """
    device, dtype = log_decay.device, log_decay.dtype
    ld = log_decay[:, None, None]  # (H, 1, 1)
    t = torch.arange(chunk + 1, device=device, dtype=dtype)[:, None]  # (C+1, 1)
    s = torch.arange(chunk, device=device, dtype=dtype)[None, :]  # (1, C)
    dist = torch.where(t < chunk, t - s, chunk - 1 - s)  # (C+1, C)
    keep = (dist > 0) | (t == chunk)
    inner = torch.exp(dist.clamp(min=0) * ld) * keep  # (H, C+1, C)
    enter = torch.exp((torch.arange(chunk, device=device, dtype=dtype) + 1) * log_decay[:, None])  # (H, C)
    k = torch.arange(chunks + 1, device=device, dtype=dtype)[:, None]  # (c+1, 1)
    j = torch.arange(chunks, device=device, dtype=dtype)[None, :]  # (1, c)
    outer = torch.exp((k - 1 - j).clamp(min=0) * chunk * ld) * (j < k)  # (H, c+1, c)
    start = torch.exp(torch.arange(chunks + 1, device=device, dtype=dtype) * chunk * log_decay[:, None])  # (H, c+1)
    return inner, enter, outer, start


def _global_block(
    x: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    chunk: int,
    cache: dict[tuple[int, int], tuple[torch.Tensor, ...]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exclusive decayed sums of one block and the state after it.

    Args:
        x: ``(B, H, L, D)`` weighted vectors (``L`` any length >= 1).
        log_decay: ``(H,)``.
        state: ``(B, H, D)`` the inclusive state before the block.
        cache: decay matrices already built, by ``(chunk, chunks)`` (filled on a miss).

    Returns:
        ``exclusive (B, H, L, D)`` (tokens ``j < i`` plus the decayed state) and the new state.
    """
    batch, heads, length, dim = x.shape
    chunk = min(chunk, length)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    key = (chunk, chunks)
    mats = None if cache is None else cache.get(key)
    if mats is None:
        mats = _decay_matrices(log_decay, chunk, chunks)
        if cache is not None:
            cache[key] = mats
    inner, enter, outer, start = mats
    xc = x.view(batch, heads, chunks, chunk, dim)  # (B, H, c, C, D)
    y = inner[None, :, None] @ xc  # (B, H, c, C+1, D)
    totals = y[..., chunk, :]  # (B, H, c, D)
    states = outer[None] @ totals + start[None, :, :, None] * state[:, :, None, :]  # (B, H, c+1, D)
    excl = y[..., :chunk, :] + enter[None, :, None, :, None] * states[:, :, :chunks, None, :]  # (B, H, c, C, D)
    excl = excl.reshape(batch, heads, chunks * chunk, dim)
    if pad == 0:
        return excl, states[:, :, chunks]
    # the block ends inside its last chunk: state after its last real row r-1
    last, real = chunks - 1, chunk - pad
    dist = real - 1 - torch.arange(chunk, device=x.device, dtype=x.dtype)  # (C,)
    vec = torch.exp(dist.clamp(min=0) * log_decay[:, None]) * (dist >= 0)  # (H, C)
    new = (vec[None, :, None, :] @ xc[:, :, last]).squeeze(-2)  # (B, H, D)
    new = new + torch.exp(real * log_decay)[None, :, None] * states[:, :, last]
    return excl[..., :length, :], new


def global_context(
    stream: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    null: torch.Tensor,
    log_decay: torch.Tensor | None,
    causal: bool = True,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = 64,
    block: int = BLOCK,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Blocked version of :func:`vkt_hf.ops.functional.global_context` (same arguments/results).

    ``chunk_size`` is accepted for signature compatibility; the shared-matrix chunk is
    :data:`CHUNK`. Falls back to the reference for bidirectional mixers and for padded inputs
    with a distance decay (there the decay depends on the token).
    """
    if not causal or (log_decay is not None and not bool((mask != 0).all())):
        return ref.global_context(stream, weights, mask, null, log_decay, causal, state, chunk_size)
    inputs = ref.global_inputs(stream, weights, mask, null, state, causal)
    w, acc = inputs.weights, inputs.weights.dtype  # (B, H, N), scaled
    batch, heads, length, dim = stream.shape
    ld = torch.zeros(heads, dtype=acc, device=stream.device) if log_decay is None else log_decay.to(acc)
    carry = inputs.initial  # (B, H, D+1)
    clean = bool(inputs.use.all())  # no padding, nothing non-finite: the vectors are used as they are
    # without autograd the blocks are written into one preallocated output (no temporaries)
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (stream, w, ld, carry))
    out = None if tracked else torch.empty(batch, heads, length, dim, dtype=acc, device=stream.device)
    start = inputs.start_mean.unsqueeze(-2)  # (B, H, 1, D)
    pieces, mats = [], {}
    for begin in range(0, length, block):
        end = min(begin + block, length)
        wb = w[:, :, begin:end, None]  # (B, H, L, 1)
        vectors = stream[:, :, begin:end]
        if not clean:
            vectors = torch.where(inputs.use[:, :, begin:end, None], vectors.to(acc), 0)
        if out is None:
            x = torch.cat([vectors.to(acc) * wb, wb], dim=-1)  # (B, H, L, D+1)
        else:  # the same without the temporary product
            x = torch.empty(batch, heads, end - begin, dim + 1, dtype=acc, device=stream.device)
            torch.mul(vectors, wb, out=x[..., :dim])
            x[..., dim:] = wb
        excl, carry = _global_block(x, ld, carry, CHUNK, mats)
        if out is None:
            pieces.append(ref.weighted_mean(excl, start))  # (B, H, L, D)
        elif bool((excl[..., dim:] > 0).all()):
            torch.div(excl[..., :dim], excl[..., dim:], out=out[:, :, begin:end])
        else:
            out[:, :, begin:end] = ref.weighted_mean(excl, start)
    context = out if out is not None else torch.cat(pieces, dim=-2)
    return ref.global_outputs(context, carry, inputs, causal)


def window_sums(ext: torch.Tensor, window: int) -> torch.Tensor:
    """``out_t = sum_{s=t}^{t+n-1} ext_s`` for every full window of ``ext`` ``(..., n + L, D)``.

    By doubling: ``p_2k[t] = p_k[t] + p_k[t+k]``, and ``n`` is a sum of powers of two, so
    about ``2 log2(n)`` passes over the block; each output is an exact sum of ``n`` terms
    (in tree order), never a difference of prefix sums.
    """
    length = ext.shape[-2] - window + 1
    out, offset, power, part = None, 0, 1, ext
    while True:
        if window & power:
            piece = part[..., offset : offset + length, :]
            out = piece if out is None else out + piece
            offset += power
        if 2 * power > window:
            return out
        part = part[..., :-power, :] + part[..., power:, :]  # p_2k, valid rows shrink by k
        power *= 2


def local_context(
    stream: torch.Tensor,
    mask: torch.Tensor,
    null: torch.Tensor,
    window: int,
    causal: bool = True,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    block: int = BLOCK,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Blocked version of :func:`vkt_hf.ops.functional.local_context` (same arguments/results).

    Handles padding; falls back to the reference for bidirectional mixers.
    """
    if not causal:
        return ref.local_context(stream, mask, null, window, causal, state)
    acc = ref.accumulation_dtype(stream.dtype)
    batch, heads, length, dim = stream.shape
    full = bool((mask != 0).all())
    real = (mask != 0)[:, None, :, None].expand(batch, heads, -1, 1)  # (B, H, N, 1)
    m = real.to(acc)
    if state is None:
        hist = stream.new_zeros(batch, heads, window, dim + 1, dtype=acc)
    else:
        hist = ref.counted_vectors(state[0].to(acc), state[1], heads)  # (B, H, n, D+1)
    block = max(block, window)
    null_acc = null.to(acc)[None, :, None, :]  # (1, H, 1, D)
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (stream, null, hist))
    out = None if tracked else torch.empty(batch, heads, length, dim, dtype=acc, device=stream.device)
    pieces = []
    for begin in range(0, length, block):
        end = min(begin + block, length)
        xs = stream[:, :, begin:end].to(acc)
        mb = m[:, :, begin:end]
        x = torch.cat([xs if full else torch.where(real[:, :, begin:end], xs, 0), mb], dim=-1)  # sums, counts
        ext = torch.cat([hist, x], dim=-2)  # (B, H, n + L, D+1)
        sums = window_sums(ext[..., :-1, :], window)  # (B, H, L, D+1): rows i-n .. i-1
        hist = ext[..., -window:, :]
        count = sums[..., dim:]
        ctx = torch.where(count > 0, sums[..., :dim] / count.clamp(min=1), null_acc)
        if out is None:
            pieces.append(ctx)
        else:
            out[:, :, begin:end] = ctx
    context = out if out is not None else torch.cat(pieces, dim=-2)
    prev = state if state is not None else (stream.new_zeros(batch, heads, window, dim), mask.new_zeros(batch, window))
    last_vectors = torch.cat([prev[0].to(stream.dtype), stream[..., -window:, :]], dim=-2)[..., -window:, :]
    last_mask = torch.cat([prev[1].to(mask.dtype), mask[..., -window:]], dim=-1)[..., -window:]
    return context, (last_vectors, last_mask)
