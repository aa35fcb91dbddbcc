"""vkt-hf: VKT-Attention for Hugging Face Transformers.

``import vkt_hf`` registers ``VKTConfig`` / ``VKTModel`` / ``VKTForCausalLM`` with
``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import VKTCache, VKTState, VKTStateLayer
from .layers import VKTAttention
from .models.vkt import VKT_PRESETS, VKTConfig, VKTForCausalLM, VKTModel, VKTPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(VKTConfig.model_type, VKTConfig, exist_ok=True)
AutoModel.register(VKTConfig, VKTModel, exist_ok=True)
AutoModelForCausalLM.register(VKTConfig, VKTForCausalLM, exist_ok=True)

__all__ = [
    "VKT_PRESETS",
    "VKTAttention",
    "VKTCache",
    "VKTConfig",
    "VKTForCausalLM",
    "VKTModel",
    "VKTPreTrainedModel",
    "VKTState",
    "VKTStateLayer",
]

# converted (hybrid) checkpoints: vkt_hf.convert_to_vkt and AutoModelForCausalLM.from_pretrained(dir)
from .convert import convert_to_vkt  # noqa: E402
from .models.vkt_hybrid import VKTHybridConfig, VKTHybridForCausalLM  # noqa: E402

AutoConfig.register(VKTHybridConfig.model_type, VKTHybridConfig, exist_ok=True)
AutoModelForCausalLM.register(VKTHybridConfig, VKTHybridForCausalLM, exist_ok=True)
__all__ += ["VKTHybridConfig", "VKTHybridForCausalLM", "convert_to_vkt"]
