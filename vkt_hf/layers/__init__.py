from .vkt_attention import VKTAttention

__all__ = ["VKTAttention"]
