"""Names shared by the configs and the math, kept here so that configs import no math.

Plain data only: this module imports nothing, so ``configuration_vkt`` can validate its fields
against these tuples without loading ``vkt_hf.ops`` (torch kernels, Triton).
"""

#: the ``vkt_backend`` values: ``auto`` picks per call (see :mod:`vkt_hf.ops`)
BACKENDS: tuple[str, ...] = ("auto", "reference", "fused", "triton")
#: how the ratio ``s / (K . T)`` becomes the scalar attention (``decimal`` is the paper's reading)
NORMALIZATIONS: tuple[str, ...] = ("decimal", "softsign", "sigmoid", "tanh", "none")
