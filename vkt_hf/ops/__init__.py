"""VKT math: the reference (:mod:`.functional`, the oracle) and fast paths, picked automatically.

``global_context`` and ``local_context`` here have the reference signatures plus a
``backend`` keyword: ``"reference"`` (:mod:`.functional`), ``"fused"`` (:mod:`.fused`, blocked
PyTorch, any device), ``"triton"`` (:mod:`.triton`, CUDA only) or ``"auto"`` (default). The
environment variable ``VKT_BACKEND`` overrides ``"auto"`` for a whole process.

``auto`` follows the measurements of ``docs/performance.md``: on CPU, inputs of at least
:data:`FUSED_MIN_TOKENS` tokens -> ``fused`` (3-4x the reference at 64k tokens), shorter ones
(decoding) -> ``reference``; on CUDA -> ``reference``, whose few large kernels beat both the
block loop and the current Triton kernels on an H200 (17.5 ms vs 56 ms fused vs 81 ms Triton
for the VKT core at 64k tokens). When a gradient is needed (training) -> ``reference`` too:
autograd over the block loop made ``fused`` forward+backward 2.3x slower than the reference at
16k tokens on CPU. ``triton`` stays available by name.
"""

from __future__ import annotations

import os

import torch

from . import functional, fused
from . import triton as triton_ops

BACKENDS: tuple[str, ...] = ("auto", "reference", "fused", "triton")
#: below this many tokens per call the reference is as fast (decoding is 1 token)
FUSED_MIN_TOKENS = 64


def resolve_backend(stream: torch.Tensor, backend: str | None = None, grad: bool | None = None) -> str:
    """The backend that will run for ``stream`` ``(B, H, N, D)``: never ``"auto"``.

    ``grad``: whether the call needs autograd (default: ``stream`` requires grad); with autograd
    ``auto`` picks the reference, whose backward is the fastest.
    """
    choice = backend if backend not in (None, "auto") else os.environ.get("VKT_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"VKT backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "triton" and not (stream.is_cuda and triton_ops.AVAILABLE):
        raise RuntimeError("the triton VKT backend needs CUDA tensors and the `triton` package")
    if choice != "auto":
        return choice
    if grad is None:
        grad = fused.needs_grad(stream)
    if stream.is_cuda or grad:
        return "reference"
    return "fused" if stream.shape[-2] >= FUSED_MIN_TOKENS else "reference"


def global_context(*args, backend: str | None = None, **kwargs):
    """:func:`functional.global_context` on the backend picked by :func:`resolve_backend`."""
    stream = args[0] if args else kwargs["stream"]
    grad = fused.needs_grad(*args, *kwargs.values())
    impl = {"reference": functional, "fused": fused, "triton": triton_ops}[resolve_backend(stream, backend, grad)]
    return impl.global_context(*args, **kwargs)


def local_context(*args, backend: str | None = None, **kwargs):
    """:func:`functional.local_context` on the backend picked by :func:`resolve_backend`."""
    stream = args[0] if args else kwargs["stream"]
    grad = fused.needs_grad(*args, *kwargs.values())
    impl = {"reference": functional, "fused": fused, "triton": triton_ops}[resolve_backend(stream, backend, grad)]
    return impl.local_context(*args, **kwargs)


__all__ = ["BACKENDS", "FUSED_MIN_TOKENS", "functional", "fused", "global_context", "local_context", "resolve_backend"]
