"""Converted (hybrid) checkpoints, registered with the transformers Auto classes by ``import vkt_hf``."""

from .configuration_vkt_hybrid import VKTHybridConfig
from .modeling_vkt_hybrid import VKTHybridForCausalLM, VKTHybridPreTrainedModel

__all__ = ["VKTHybridConfig", "VKTHybridForCausalLM", "VKTHybridPreTrainedModel"]
