"""Triton kernels for the two context sums (CUDA; importable everywhere).

Same signatures and results as :func:`vkt_hf.ops.functional.global_context` /
:func:`vkt_hf.ops.functional.local_context`. Without the ``triton`` package (or without CUDA)
:data:`AVAILABLE` is False and nothing here is called by the dispatch. With
``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (Triton's interpreter), which is how
``tests/test_ops_fast.py`` checks them on machines without a GPU.

* ``_global_kernel``: one program per (sequence x head, block of channels) walks the tokens in
  chunks of ``C``: inside a chunk the decayed exclusive sums are one ``C x C`` matrix product
  (``exp(cl_t - cl_s)``, ``s < t``, exponents ``<= 0``, so nothing overflows) plus the decayed
  carried state;
  the weight total rides along as a scalar column; ``K = sum / total`` is written directly.
  Padding is handled (its decay is 0 and its weight 0).
* ``_chunk_sums_kernel`` / ``_chunk_states_kernel`` / ``_chunk_outputs_kernel``: the same sums
  sequence-parallel, in the style of fla's chunked kernels and Mamba2's SSD: each chunk's own decayed
  sums and total decay (all chunks at once), a scan over the chunk summaries (the state entering each
  chunk, ``N / C`` vector steps), then each chunk's outputs from its entering state (all at once); the
  default (``sequence_parallel``). Both are made of the same pieces: ``_chunk`` (load a chunk),
  ``_chunk_means`` (its outputs from the state entering it) and ``_chunk_summary`` (its sums at its end).
* ``_local_kernel``: one program per (sequence x head, block of tokens, block of channels) adds
  the ``n`` previous rows (from the chunk or from the carried history): exact sums of ``n``
  terms, then divides by the count (or writes the null vector).

The kernels run the forward pass only. The dispatch (:func:`vkt_hf.ops.global_context` with
``backend="triton"``) sends a call that needs a gradient to the fused PyTorch path
(:mod:`.fused`), which autograd differentiates; called directly, these functions refuse inputs
that require a gradient rather than return a result autograd cannot see.
"""

from __future__ import annotations

import os

import torch

from . import functional as ref
from . import fused

try:  # optional dependency: absent on CPU-only installs
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton, tl, HAS_TRITON = None, None, False

#: the interpreter runs the kernels on CPU tensors (slowly): for tests only
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: kernels can run here on CUDA tensors
AVAILABLE = HAS_TRITON and torch.cuda.is_available()

if HAS_TRITON:

    @triton.jit
    def _chunk(S, W, M, LD, bh, start, db, N, H, D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        """The chunk of row ``bh`` from token ``start``, channel block ``db``: the weighted vectors ``(C, BD)``
        (float32), the weights ``(C,)`` and the inclusive log decays ``(C,)`` (padding decays by 1, weighs 0)."""
        b = bh // H
        offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
        t = start + tl.arange(0, BLOCK_C)
        tmask = t < N
        m = tl.load(M + b * N + t, mask=tmask, other=0.0)
        w = tl.load(W + bh * N + t, mask=tmask, other=0.0)  # already masked
        x = tl.load(
            S + (bh * N + t)[:, None] * D + offs_d[None, :], mask=tmask[:, None] & (offs_d < D)[None, :], other=0.0
        )
        return x.to(tl.float32) * w[:, None], w, tl.cumsum(tl.load(LD + bh % H) * m, 0)

    @triton.jit
    def _chunk_means(x, w, cl, state, state_w, mean0, BLOCK_C: tl.constexpr):
        """The means ``(C, BD)`` of a chunk's tokens: the decayed sums of the tokens before each one inside the
        chunk (one ``C x C`` matrix of ``exp(cl_t - cl_s)``, ``s < t``: exponents ``<= 0``, nothing overflows)
        plus the decayed state entering it, over the same for the weights (``mean0`` where that is 0)."""
        offs_c = tl.arange(0, BLOCK_C)
        lower = offs_c[:, None] > offs_c[None, :]  # s < t
        decay = tl.where(lower, tl.exp(tl.minimum(cl[:, None] - cl[None, :], 0.0)), 0.0)  # (C, C)
        carry = tl.exp(cl)  # (C,)
        num = tl.dot(decay, x, input_precision="ieee") + carry[:, None] * state[None, :]
        den = tl.sum(decay * w[None, :], 1) + carry * state_w
        return tl.where(den[:, None] > 0, num / tl.where(den > 0, den, 1.0)[:, None], mean0[None, :])

    @triton.jit
    def _chunk_summary(x, w, cl, BLOCK_C: tl.constexpr):
        """A chunk's total log decay and its sums ``(BD,)`` and weight, decayed to its end."""
        offs_c = tl.arange(0, BLOCK_C)
        last = tl.sum(tl.where(offs_c == BLOCK_C - 1, cl, 0.0), 0)  # padding rows add 0
        tail = tl.exp(last - cl)  # (C,) decay from each row to the chunk's end
        return last, tl.sum(tail[:, None] * x, 0), tl.sum(tail * w, 0)

    @triton.jit
    def _global_kernel(
        S, W, M, LD, INIT, INITW, MEAN0, OUT, OUTS, OUTW,
        N, H, D,
        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        db = tl.program_id(1)
        offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        state = tl.load(INIT + bh * D + offs_d, mask=dmask, other=0.0)  # (BD,)
        state_w = tl.load(INITW + bh)
        mean0 = tl.load(MEAN0 + bh * D + offs_d, mask=dmask, other=0.0)  # where every weight underflowed
        for start in range(0, N, BLOCK_C):
            t = start + tl.arange(0, BLOCK_C)
            x, w, cl = _chunk(S, W, M, LD, bh, start, db, N, H, D, BLOCK_C, BLOCK_D)
            out = _chunk_means(x, w, cl, state, state_w, mean0, BLOCK_C)
            tl.store(OUT + (bh * N + t)[:, None] * D + offs_d[None, :], out, mask=(t < N)[:, None] & dmask[None, :])
            last, sums, sums_w = _chunk_summary(x, w, cl, BLOCK_C)
            state = tl.exp(last) * state + sums
            state_w = tl.exp(last) * state_w + sums_w
        tl.store(OUTS + bh * D + offs_d, state, mask=dmask)
        tl.store(OUTW + bh + db * 0, state_w, mask=db == 0)

    # The same sums, sequence-parallel (the chunked scan of fla / Mamba2-SSD): (1) every chunk's own decayed sums
    # and total decay, all chunks at once; (2) a scan over the chunks' summaries: the state entering each chunk;
    # (3) every chunk's outputs from its state, all chunks at once. (1) and (3) are the work, on B*H*chunks
    # programs instead of B*H; (2) is N / C vector steps.
    @triton.jit
    def _chunk_sums_kernel(
        S, W, M, LD, SUMS, SUMW, LAST,
        N, H, D, CHUNKS,
        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        c = tl.program_id(1)
        db = tl.program_id(2)
        offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
        x, w, cl = _chunk(S, W, M, LD, bh, c * BLOCK_C, db, N, H, D, BLOCK_C, BLOCK_D)
        last, sums, sums_w = _chunk_summary(x, w, cl, BLOCK_C)
        tl.store(SUMS + (bh * CHUNKS + c) * D + offs_d, sums, mask=offs_d < D)
        tl.store(SUMW + bh * CHUNKS + c + db * 0, sums_w, mask=db == 0)
        tl.store(LAST + bh * CHUNKS + c + db * 0, last, mask=db == 0)

    @triton.jit
    def _chunk_states_kernel(
        SUMS, SUMW, LAST, INIT, INITW, STATES, STATESW, OUTS, OUTW,
        D, CHUNKS,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        db = tl.program_id(1)
        offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        state = tl.load(INIT + bh * D + offs_d, mask=dmask, other=0.0)
        state_w = tl.load(INITW + bh)
        for c in range(0, CHUNKS):
            tl.store(STATES + (bh * CHUNKS + c) * D + offs_d, state, mask=dmask)
            tl.store(STATESW + bh * CHUNKS + c + db * 0, state_w, mask=db == 0)
            decay = tl.exp(tl.load(LAST + bh * CHUNKS + c))
            state = decay * state + tl.load(SUMS + (bh * CHUNKS + c) * D + offs_d, mask=dmask, other=0.0)
            state_w = decay * state_w + tl.load(SUMW + bh * CHUNKS + c)
        tl.store(OUTS + bh * D + offs_d, state, mask=dmask)
        tl.store(OUTW + bh + db * 0, state_w, mask=db == 0)

    @triton.jit
    def _chunk_outputs_kernel(
        S, W, M, LD, STATES, STATESW, MEAN0, OUT,
        N, H, D, CHUNKS,
        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        c = tl.program_id(1)
        db = tl.program_id(2)
        offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        t = c * BLOCK_C + tl.arange(0, BLOCK_C)
        state = tl.load(STATES + (bh * CHUNKS + c) * D + offs_d, mask=dmask, other=0.0)
        state_w = tl.load(STATESW + bh * CHUNKS + c)
        mean0 = tl.load(MEAN0 + bh * D + offs_d, mask=dmask, other=0.0)
        x, w, cl = _chunk(S, W, M, LD, bh, c * BLOCK_C, db, N, H, D, BLOCK_C, BLOCK_D)
        out = _chunk_means(x, w, cl, state, state_w, mean0, BLOCK_C)
        tl.store(OUT + (bh * N + t)[:, None] * D + offs_d[None, :], out, mask=(t < N)[:, None] & dmask[None, :])

    @triton.jit
    def _local_kernel(
        S, M, HIST, HMASK, NULL, OUT,
        N, H, D, WINDOW,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        tb = tl.program_id(1)
        db = tl.program_id(2)
        b = bh // H
        h = bh % H
        t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < N
        offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        count = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for k in range(1, WINDOW + 1):
            j = t - k
            in_seq = tmask & (j >= 0)
            in_hist = tmask & (j < 0) & (j >= -WINDOW)
            ms = tl.load(M + b * N + j, mask=in_seq, other=0.0)
            mh = tl.load(HMASK + b * WINDOW + WINDOW + j, mask=in_hist, other=0.0)
            xs = tl.load(
                S + (bh * N + j)[:, None] * D + offs_d[None, :], mask=in_seq[:, None] & dmask[None, :], other=0.0
            )
            xh = tl.load(
                HIST + (bh * WINDOW + WINDOW + j)[:, None] * D + offs_d[None, :],
                mask=in_hist[:, None] & dmask[None, :],
                other=0.0,
            )
            # padding is selected out, never multiplied by 0 (it may hold NaN)
            acc += tl.where(ms[:, None] > 0, xs.to(tl.float32), 0.0)
            acc += tl.where(mh[:, None] > 0, xh.to(tl.float32), 0.0)
            count += ms + mh
        null = tl.load(NULL + h * D + offs_d, mask=dmask, other=0.0)
        out = tl.where(count[:, None] > 0, acc / tl.maximum(count, 1.0)[:, None], null[None, :])
        tl.store(OUT + (bh * N + t)[:, None] * D + offs_d[None, :], out, mask=tmask[:, None] & dmask[None, :])


def _runnable(stream: torch.Tensor) -> bool:
    return HAS_TRITON and (stream.is_cuda or INTERPRET)


def _forward_only(*tensors: torch.Tensor | None) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            "the Triton VKT kernels compute the forward pass only; call vkt_hf.ops.global_context / "
            "local_context (backend='triton'), which run calls that need a gradient on the fused path"
        )


def _block_d(dim: int) -> int:
    return min(64, max(16, triton.next_power_of_2(dim)))


def global_context(
    stream: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    null: torch.Tensor,
    log_decay: torch.Tensor | None,
    causal: bool = True,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = 64,
    sequence_parallel: bool | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Triton :func:`vkt_hf.ops.functional.global_context` (forward only, see the module docstring).

    Bidirectional mixers, float64 inputs (the kernels accumulate in float32) and tensors the
    kernels cannot run on (CPU without the interpreter) go to :mod:`.fused`.

    ``sequence_parallel``: the three-kernel chunked scan (chunks in parallel, then a scan over their
    summaries) instead of one program walking each sequence; default: ``VKT_TRITON_SEQUENCE_PARALLEL``
    (``1``, the default, or ``0``). Neither has been timed on a GPU yet (``docs/performance.md``).
    """
    _forward_only(stream, weights, null, log_decay, *(state or ()))
    acc = ref.accumulation_dtype(stream.dtype)
    if not causal or not _runnable(stream) or acc != torch.float32:
        return fused.global_context(stream, weights, mask, null, log_decay, causal, state, chunk_size)
    batch, heads, length, dim = stream.shape
    inputs = ref.global_inputs(stream, weights, mask, null, state, causal)  # scaled weights, selected tokens
    stream = torch.where(inputs.use.unsqueeze(-1), stream, 0).contiguous()  # (B, H, N, D)
    m = (mask != 0).to(acc).contiguous()  # (B, N)
    w = inputs.weights.contiguous()  # (B, H, N)
    ld = torch.zeros(heads, dtype=acc, device=stream.device) if log_decay is None else log_decay.to(acc).contiguous()
    init, init_w = inputs.initial[..., :dim].contiguous(), inputs.initial[..., dim].contiguous()
    mean0 = inputs.start_mean.contiguous()
    out = torch.empty(batch, heads, length, dim, dtype=acc, device=stream.device)
    out_s = torch.empty(batch, heads, dim, dtype=acc, device=stream.device)
    out_w = torch.empty(batch, heads, dtype=acc, device=stream.device)
    block_d = _block_d(dim)
    if sequence_parallel is None:
        sequence_parallel = os.environ.get("VKT_TRITON_SEQUENCE_PARALLEL", "1") != "0"
    if length and sequence_parallel:
        chunks, rows, d_blocks = triton.cdiv(length, 64), batch * heads, triton.cdiv(dim, block_d)
        sums = torch.empty(rows, chunks, dim, dtype=acc, device=stream.device)
        states = torch.empty_like(sums)
        sums_w, last, states_w = (torch.empty(rows, chunks, dtype=acc, device=stream.device) for _ in range(3))
        _chunk_sums_kernel[(rows, chunks, d_blocks)](
            stream, w, m, ld, sums, sums_w, last, length, heads, dim, chunks, BLOCK_C=64, BLOCK_D=block_d
        )
        _chunk_states_kernel[(rows, d_blocks)](
            sums, sums_w, last, init, init_w, states, states_w, out_s, out_w, dim, chunks, BLOCK_D=block_d
        )
        _chunk_outputs_kernel[(rows, chunks, d_blocks)](
            stream, w, m, ld, states, states_w, mean0, out, length, heads, dim, chunks, BLOCK_C=64, BLOCK_D=block_d
        )
    elif length:
        grid = (batch * heads, triton.cdiv(dim, block_d))
        _global_kernel[grid](
            stream, w, m, ld, init, init_w, mean0, out, out_s, out_w, length, heads, dim, BLOCK_C=64, BLOCK_D=block_d
        )
    else:
        out_s, out_w = init, init_w
    return ref.global_outputs(out, torch.cat([out_s, out_w.unsqueeze(-1)], dim=-1), inputs, causal)


def local_context(
    stream: torch.Tensor,
    mask: torch.Tensor,
    null: torch.Tensor,
    window: int,
    causal: bool = True,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Triton :func:`vkt_hf.ops.functional.local_context` (forward only; falls back like :func:`global_context`)."""
    _forward_only(stream, null, *(state or ()))
    if not causal or not _runnable(stream) or stream.dtype == torch.float64:
        return fused.local_context(stream, mask, null, window, causal, state)
    acc = torch.float32
    batch, heads, length, dim = stream.shape
    stream = stream.contiguous()
    m = mask.to(acc).contiguous()  # (B, N)
    if state is None:
        hist = torch.zeros(batch, heads, window, dim, dtype=stream.dtype, device=stream.device)
        hist_mask = torch.zeros(batch, window, dtype=acc, device=stream.device)
    else:
        hist, hist_mask = state[0].to(stream.dtype).contiguous(), state[1].to(acc).contiguous()
    out = torch.empty(batch, heads, length, dim, dtype=acc, device=stream.device)
    block_d, block_t = _block_d(dim), 64
    grid = (batch * heads, triton.cdiv(length, block_t), triton.cdiv(dim, block_d))
    if length:
        _local_kernel[grid](
            stream, m, hist, hist_mask, null.to(acc).contiguous(), out, length, heads, dim, window,
            BLOCK_T=block_t, BLOCK_D=block_d,
        )  # fmt: skip
    last_vectors = torch.cat([hist, stream[..., -window:, :]], dim=-2)[..., -window:, :]
    last_mask = torch.cat([hist_mask.to(mask.dtype), mask[..., -window:]], dim=-1)[..., -window:]
    return out, (last_vectors, last_mask)
