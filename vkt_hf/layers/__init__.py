from .vkt_attention import VKTAttention, vkt_layers

__all__ = ["VKTAttention", "vkt_layers"]
