"""C++ kernels for CPU (``cpu_kernels.cpp``), built on first use: the one-token decoding step and the decayed mean.

* ``decode_step``: a decoding step of a converted layer is a few thousand multiply-adds per head, which the eager
  step (:func:`vkt_hf.layers.decode.decode_step`) spends ~100 tensor operations on: their dispatch, not their
  arithmetic, is its cost. The kernel does the same math in one call.
* ``decayed_mean_forward`` / ``decayed_mean_backward``: the causal global mean of
  :class:`vkt_hf.ops.autograd.DecayedMean` (training) as one sequential sweep per row, forward and back, instead
  of the chunked scan's ~20 passes over ``(N, D + 1)`` tensors.

They are compiled with :func:`torch.utils.cpp_extension.load` the first time a process needs one (about a minute,
once per machine: the build is cached in ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); the
PyTorch code runs wherever they cannot: no C++ compiler, ``VKT_CPU_KERNELS=0``, another device, or (decoding) a
layer or state the kernel does not cover (:func:`supports`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: the normalizations the kernel computes, by the code it takes
NORMALIZATION_CODES = {"softsign": 0, "sigmoid": 1, "tanh": 2, "none": 3}
SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
#: an input the kernels take as absent (no RoPE, no decay, no sink, no gradient): an empty tensor
ABSENT = torch.empty(0)

_MODULE: Any = None
_FAILED = False


def enabled() -> bool:
    """Whether the kernel may be used: ``VKT_CPU_KERNELS`` is not ``0`` (read on every call)."""
    return os.environ.get("VKT_CPU_KERNELS", "1") != "0"


def kernel() -> Any | None:
    """The compiled module (built and cached on first call), or ``None`` if it is disabled or cannot be built."""
    global _MODULE, _FAILED
    if _MODULE is not None or _FAILED or not enabled():
        return _MODULE if enabled() else None
    from torch.utils.cpp_extension import load

    logger.info("loading the VKT CPU kernels (built on first use: about a minute, once per machine)")
    try:
        # one build per torch version (the build directory is named after the extension): a module built
        # against another torch is never loaded
        name = "vkt_hf_cpu_kernels_" + "".join(c if c.isalnum() else "_" for c in torch.__version__)
        _MODULE = load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp-simd"], verbose=False)
    except Exception as error:  # no compiler, no headers: the PyTorch code runs
        _FAILED = True
        warnings.warn(
            f"the VKT CPU kernels could not be built ({type(error).__name__}: {error}); decoding and the global "
            "mean run in PyTorch (slower). Install a C++ compiler, or set VKT_CPU_KERNELS=0 to silence this.",
            stacklevel=2,
        )
    return _MODULE


def supports(config: Any, x: torch.Tensor) -> bool:
    """Whether the decoding kernel computes this layer's step (the options conversions install), float32 on CPU.

    ``config`` is the step's :class:`~vkt_hf.layers.decode.Options`; ``x`` the new tokens' hidden states.
    """
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and config.vkt_terms
        and config.readout
        and config.local_attention
        and config.global_readout == "window"
        and config.context_source == "key"
        and config.gated_value == "value"
        and config.importance == "parameter"
        and config.accumulation_dtype != "float64"
        and config.normalization in NORMALIZATION_CODES
        and config.context_weights in ("importance", "uniform")
    )
