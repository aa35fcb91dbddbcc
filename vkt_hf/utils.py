"""Small helpers for the range of supported transformers versions."""

from transformers.modeling_outputs import CausalLMOutputWithPast

#: the name under which models take and return the cache: ``cache`` from transformers 5.24,
#: ``past_key_values`` before
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
