"""vkt-hf: VKT-Attention for Hugging Face Transformers.

``import vkt_hf`` registers ``VKTConfig`` / ``VKTModel`` / ``VKTForCausalLM`` and the converted
hybrids (``VKTHybridConfig`` / ``VKTHybridForCausalLM``) with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``. It loads torch and transformers only: the training, plotting and
command-line dependencies are imported by the modules that need them (``vkt_hf.training``,
``vkt_hf.evaluation``, ``vkt_hf.cli``, ...).

The modules depend on each other one way only::

    constants, utils -> ops -> cache, layers -> models.vkt -> convert (families)
        -> models.vkt_hybrid (the hybrid model, convert_to_vkt)
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import VKTCache, VKTState, VKTStateLayer
from .layers import VKTAttention
from .models.vkt import VKT_PRESETS, VKTConfig, VKTForCausalLM, VKTModel, VKTPreTrainedModel
from .models.vkt_hybrid import VKTHybridConfig, VKTHybridForCausalLM, convert_to_vkt

__version__ = "0.1.0"

AutoConfig.register(VKTConfig.model_type, VKTConfig, exist_ok=True)
AutoModel.register(VKTConfig, VKTModel, exist_ok=True)
AutoModelForCausalLM.register(VKTConfig, VKTForCausalLM, exist_ok=True)
AutoConfig.register(VKTHybridConfig.model_type, VKTHybridConfig, exist_ok=True)
AutoModelForCausalLM.register(VKTHybridConfig, VKTHybridForCausalLM, exist_ok=True)

__all__ = [
    "VKT_PRESETS",
    "VKTAttention",
    "VKTCache",
    "VKTConfig",
    "VKTForCausalLM",
    "VKTHybridConfig",
    "VKTHybridForCausalLM",
    "VKTModel",
    "VKTPreTrainedModel",
    "VKTState",
    "VKTStateLayer",
    "convert_to_vkt",
]
