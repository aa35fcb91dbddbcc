"""Converted (hybrid) checkpoints and :func:`convert_to_vkt`; ``import vkt_hf`` registers them with the Auto classes."""

from .configuration_vkt_hybrid import VKTHybridConfig
from .modeling_vkt_hybrid import VKTHybridForCausalLM, VKTHybridPreTrainedModel, convert_to_vkt

__all__ = ["VKTHybridConfig", "VKTHybridForCausalLM", "VKTHybridPreTrainedModel", "convert_to_vkt"]
