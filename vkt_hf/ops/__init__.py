"""VKT math: the loop reference, the vectorised reference and fast paths, picked per call.

* :mod:`.naive` -- slow per-token loops, written as the definitions read (tests only).
* :mod:`.functional` -- the vectorised reference (the oracle every fast path is checked against).
* :mod:`.fused` -- blocked PyTorch, any device; :mod:`.triton` -- Triton kernels (CUDA, forward only).

``global_context`` and ``local_context`` here have the reference signatures plus a ``backend``
keyword: ``"reference"`` (:mod:`.functional`), ``"fused"``, ``"triton"`` or ``"auto"`` (default).
The environment variable ``VKT_BACKEND`` overrides ``"auto"`` for a whole process.

``auto`` follows the measurements of ``docs/performance.md``: on CPU, inputs of at least
:data:`FUSED_MIN_TOKENS` tokens -> ``fused`` (3-4x the reference at 64k tokens), shorter ones
(decoding) -> ``reference``; on CUDA -> ``reference``, whose few large kernels beat both the
block loop and the current Triton kernels on an H200 (17.5 ms vs 56 ms fused vs 81 ms Triton
for the VKT core at 64k tokens). When a gradient is needed (training) -> ``reference`` too:
autograd over the block loop made ``fused`` forward+backward 2.3x slower than the reference at
16k tokens on CPU. ``triton`` stays available by name; its kernels compute the forward pass
only, so a call that needs a gradient runs on ``fused`` instead.
"""

from __future__ import annotations

import os

import torch

from ..constants import BACKENDS
from . import functional, fused
from . import triton as triton_ops

#: below this many tokens per call the reference is as fast (decoding is 1 token)
FUSED_MIN_TOKENS = 64
_IMPLEMENTATIONS = {"reference": functional, "fused": fused, "triton": triton_ops}

GlobalState = tuple[torch.Tensor, torch.Tensor]
LocalState = tuple[torch.Tensor, torch.Tensor]


def needs_grad(*inputs: torch.Tensor | tuple[torch.Tensor, ...] | None) -> bool:
    """Whether autograd must see the result: grad mode is on and any tensor (or tensor in a tuple) requires it."""
    if not torch.is_grad_enabled():
        return False
    flat = [t for x in inputs for t in (x if isinstance(x, (tuple, list)) else (x,))]
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat)


def resolve_backend(stream: torch.Tensor, backend: str | None = None, grad: bool | None = None) -> str:
    """The backend that will run for ``stream`` ``(B, H, N, D)``: never ``"auto"``.

    ``grad``: whether the call needs autograd (default: :func:`needs_grad` of ``stream``). With
    autograd, ``auto`` picks the reference, whose backward is the fastest, and ``triton``
    (forward-only kernels) runs as ``fused``.
    """
    if grad is None:
        grad = needs_grad(stream)
    choice = backend if backend not in (None, "auto") else os.environ.get("VKT_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"VKT backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "triton":
        if not (stream.is_cuda and triton_ops.AVAILABLE):
            raise RuntimeError("the triton VKT backend needs CUDA tensors and the `triton` package")
        return "fused" if grad else "triton"
    if choice != "auto":
        return choice
    if stream.is_cuda or grad:
        return "reference"
    return "fused" if stream.shape[-2] >= FUSED_MIN_TOKENS else "reference"


def global_context(
    stream: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    null: torch.Tensor,
    log_decay: torch.Tensor | None,
    causal: bool = True,
    state: GlobalState | None = None,
    chunk_size: int = 64,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, GlobalState]:
    """:func:`functional.global_context` on the backend picked by :func:`resolve_backend`."""
    grad = needs_grad(stream, weights, null, log_decay, state)
    impl = _IMPLEMENTATIONS[resolve_backend(stream, backend, grad)]
    return impl.global_context(stream, weights, mask, null, log_decay, causal, state, chunk_size)


def local_context(
    stream: torch.Tensor,
    mask: torch.Tensor,
    null: torch.Tensor,
    window: int,
    causal: bool = True,
    state: LocalState | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, LocalState]:
    """:func:`functional.local_context` on the backend picked by :func:`resolve_backend`."""
    grad = needs_grad(stream, null, state)
    impl = _IMPLEMENTATIONS[resolve_backend(stream, backend, grad)]
    return impl.local_context(stream, mask, null, window, causal, state)


__all__ = [
    "BACKENDS",
    "FUSED_MIN_TOKENS",
    "functional",
    "fused",
    "global_context",
    "local_context",
    "needs_grad",
    "resolve_backend",
]
