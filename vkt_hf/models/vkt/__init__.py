"""VKT models, registered with the transformers Auto classes by ``import vkt_hf``."""

from .configuration_vkt import VKT_PRESETS, VKTConfig
from .modeling_vkt import VKTForCausalLM, VKTModel, VKTPreTrainedModel

__all__ = ["VKT_PRESETS", "VKTConfig", "VKTForCausalLM", "VKTModel", "VKTPreTrainedModel"]
