"""C++ kernels for CPU (``cpu_kernels.cpp``), built on first use: the decoding step, the decayed mean, the softmax window.

* ``decode_step``: a decoding step of a converted layer is a few thousand multiply-adds per head, which the eager
  step (:func:`vkt_hf.layers.decode.decode_step`) spends ~100 tensor operations on: their dispatch, not their
  arithmetic, is its cost. The kernel does the same math in one call.
* ``decayed_mean_forward`` / ``decayed_mean_backward``: the causal global mean of
  :class:`vkt_hf.ops.autograd.DecayedMean` (training) as one sequential sweep per row, forward and back, instead
  of the chunked scan's ~20 passes over ``(N, D + 1)`` tensors.
* ``window_softmax_forward`` / ``window_softmax_backward``: :class:`vkt_hf.ops.autograd.WindowSoftmax` (the local
  softmax window with its sink and read-out slot; training, and inference on CPU) one query row at a time over
  its own ``n`` keys, with register-tiled products, instead of ``(G n) x 2n`` block products half of whose keys
  are masked and a dozen passes over ``(tokens x slots)`` tensors. Non-finite inputs follow the reference's
  rules row by row (a NaN logit makes its row NaN, a non-finite value reaches only the queries that weigh it).

The build uses ``-march=native`` (so the module is named after this CPU as well as the torch version),
``-fno-trapping-math`` (without it the selects of the vectorized ``exp`` are branches and the loops stay scalar)
and ``-fopenmp`` (``at::parallel_for`` is inline OpenMP: without it every kernel ran on one thread).

They are compiled with :func:`torch.utils.cpp_extension.load` the first time a process needs one (about a minute,
once per machine: the build is cached in ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); the
PyTorch code runs wherever they cannot: no C++ compiler, ``VKT_CPU_KERNELS=0``, another device, or (decoding) a
layer or state the kernel does not cover (:func:`supports`).
"""

from __future__ import annotations

import hashlib
import os
import platform
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


def _cpu_signature() -> str:
    """A short hash of this CPU's model and instruction-set flags (``/proc/cpuinfo``; the platform elsewhere)."""
    described = platform.machine() + platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        described += "".join(line for line in lines if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    return hashlib.sha1(described.encode()).hexdigest()[:10]


def kernel() -> Any | None:
    """The compiled module (built and cached on first call), or ``None`` if it is disabled or cannot be built."""
    global _MODULE, _FAILED
    if _MODULE is not None or _FAILED or not enabled():
        return _MODULE if enabled() else None
    from torch.utils.cpp_extension import load

    logger.info("loading the VKT CPU kernels (built on first use: about a minute, once per machine)")
    try:
        # one build per torch version and CPU (the build directory is named after the extension): a module
        # built against another torch, or for another machine's instruction set (-march=native), is never loaded
        version = "".join(c if c.isalnum() else "_" for c in torch.__version__)
        name = f"vkt_hf_cpu_kernels_{version}_{_cpu_signature()}"
        # -fopenmp: at::parallel_for is inline OpenMP, serial without it (libgomp resolves to the one torch loaded)
        flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-march=native"]
        _MODULE = load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
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
