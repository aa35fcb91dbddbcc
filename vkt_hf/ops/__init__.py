"""VKT math: the loop reference, the vectorised reference and fast paths, picked per call.

* :mod:`.naive` -- slow per-token loops, written as the definitions read (tests only).
* :mod:`.functional` -- the vectorised reference (the oracle every fast path is checked against).
* :mod:`.autograd` -- the reference's forward with hand-written backward passes (training).
* :mod:`.fused` -- blocked PyTorch, any device; :mod:`.triton` -- Triton kernels (CUDA, forward only).

``global_context`` and ``local_context`` here have the reference signatures plus a ``backend``
keyword: ``"reference"`` (:mod:`.functional`, autograd over it), ``"autograd"`` (the reference's
forward, backward written out), ``"fused"``, ``"triton"`` or ``"auto"`` (default). The
environment variable ``VKT_BACKEND`` overrides ``"auto"`` for a whole process. The layer
calls the local softmax window (:func:`.functional.sliding_window_attention`) directly; with a
``"reference"`` backend (by name or by ``VKT_BACKEND``) it runs as autograd over the reference
too (:func:`window_custom_backward`); otherwise training, and inference on CPU, run it as
:class:`.autograd.WindowSoftmax`, whose two passes are C++ kernels on CPU (:func:`window_cpu_kernel`).

``auto`` follows the measurements of ``docs/performance.md``: when a gradient is needed
(training) -> ``autograd`` on any device (the reverse scans: several times faster than
autograd over the chunked reference, which was itself 2.3x faster than autograd over the fused
block loop). Without a gradient, on CPU, inputs of at least :data:`FUSED_MIN_TOKENS` tokens ->
``fused`` (3-4x the reference at 64k tokens), shorter ones (decoding) -> ``reference``; on
CUDA -> ``reference``, whose few large kernels beat both the block loop and the current Triton
kernels on an H200 (17.5 ms vs 56 ms fused vs 81 ms Triton for the VKT core at 64k tokens).
``triton`` stays available by name; its kernels compute the forward pass only, so a call that
needs a gradient runs on ``autograd`` instead.
"""

from __future__ import annotations

import os

import torch

from ..constants import BACKENDS
from . import autograd, functional, fused
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


def _chosen(backend: str | None) -> str:
    """The backend asked for: ``backend``, or ``VKT_BACKEND`` (default ``"auto"``) where it says ``auto``."""
    return backend if backend not in (None, "auto") else os.environ.get("VKT_BACKEND", "auto")


def window_custom_backward(backend: str | None, *inputs: torch.Tensor | tuple[torch.Tensor, ...] | None) -> bool:
    """Whether the local softmax window (:func:`.functional.sliding_window_attention`) runs its
    hand-written backward: a gradient is needed for ``inputs`` and the backend asked for (the
    layer's ``vkt_backend``, else ``VKT_BACKEND``) is not ``"reference"``."""
    return _chosen(backend) != "reference" and needs_grad(*inputs)


def window_cpu_kernel(backend: str | None, query: torch.Tensor) -> bool:
    """Whether an inference call (no gradient) of the softmax window runs the C++ kernel of
    :class:`.autograd.WindowSoftmax`: ``query`` is a float32/float64 CPU tensor, the kernels are built
    (:mod:`.cpu_kernels`) and the backend asked for is not ``"reference"``."""
    return _chosen(backend) != "reference" and autograd._cpu_kernels(query) is not None


def resolve_backend(stream: torch.Tensor, backend: str | None = None, grad: bool | None = None) -> str:
    """The backend that will run for ``stream`` ``(B, H, N, D)``: never ``"auto"``.

    ``grad``: whether the call needs autograd (default: :func:`needs_grad` of ``stream``). With
    autograd, ``auto`` picks ``autograd`` (hand-written backward passes), and ``triton``
    (forward-only kernels) runs as ``autograd`` too.
    """
    if grad is None:
        grad = needs_grad(stream)
    choice = _chosen(backend)
    if choice not in BACKENDS:
        raise ValueError(f"VKT backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "triton":
        if not (stream.is_cuda and triton_ops.AVAILABLE):
            raise RuntimeError("the triton VKT backend needs CUDA tensors and the `triton` package")
        return "autograd" if grad else "triton"
    if choice != "auto":
        return choice
    if grad:
        return "autograd"
    if stream.is_cuda:
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
    name = resolve_backend(stream, backend, grad)
    if name == "autograd":
        return functional.global_context(
            stream, weights, mask, null, log_decay, causal, state, chunk_size, custom_backward=True
        )
    return _IMPLEMENTATIONS[name].global_context(stream, weights, mask, null, log_decay, causal, state, chunk_size)


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
    name = resolve_backend(stream, backend, grad)
    if name == "autograd":
        return functional.local_context(stream, mask, null, window, causal, state, custom_backward=True)
    return _IMPLEMENTATIONS[name].local_context(stream, mask, null, window, causal, state)


__all__ = [
    "BACKENDS",
    "FUSED_MIN_TOKENS",
    "autograd",
    "functional",
    "fused",
    "global_context",
    "local_context",
    "needs_grad",
    "resolve_backend",
]
