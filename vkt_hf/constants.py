"""Names shared by the configs and the math, kept here so that configs import no math.

Plain data only: this module imports nothing, so ``configuration_vkt`` can validate its fields
against these tuples without loading ``vkt_hf.ops`` (torch kernels, Triton).
"""

#: the ``vkt_backend`` values: ``auto`` picks per call (see :mod:`vkt_hf.ops`)
BACKENDS: tuple[str, ...] = ("auto", "reference", "autograd", "fused", "triton")
#: how the ratio ``s / (K . T)`` becomes the scalar attention (``decimal`` is the paper's reading)
NORMALIZATIONS: tuple[str, ...] = ("decimal", "softsign", "sigmoid", "tanh", "none")
#: the per-layer mixer kinds of ``layer_types`` in transformers' names (Qwen3-Next, Mamba): VKT layers are
#: recurrent ``linear_attention``, softmax layers ``full_attention``, layers without token mixing ``mlp``
#: (transformers keeps no cache for those); keyed by the short names the project also accepts
LAYER_TYPE_NAMES: dict[str, str] = {"vkt": "linear_attention", "softmax": "full_attention", "none": "mlp"}
