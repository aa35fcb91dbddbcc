"""Small helpers for the range of supported transformers versions."""

import torch
from transformers.generation import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

#: the name under which models take and return the cache: ``cache`` from transformers 5.24,
#: ``past_key_values`` before
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

#: the error message of generation modes that need to roll the cache back (shared by native and converted models)
NO_ROLLBACK = (
    "{name}: assisted, prompt-lookup and speculative decoding are not supported with VKT layers: their recurrent "
    "state summarises every past token and cannot be rolled back to re-check draft tokens"
)


def refuse_rollback_generation(model, generation_mode) -> None:
    """Raise before any forward pass when ``generate()`` would need to crop the cache (VKT states cannot be cropped)."""
    if generation_mode == GenerationMode.ASSISTED_GENERATION:
        raise ValueError(NO_ROLLBACK.format(name=type(model).__name__))


def sequence_starts(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """``(B, N)`` bool, True where a packed sequence starts after the first token, from ``position_ids``; or ``None``.

    A packed (padding-free) row holds several sequences end to end, each with positions counting from 0
    (transformers' ``DataCollatorWithFlattening``); a new sequence starts wherever a position is not the one
    before plus 1. ``None`` when no row restarts (a plain batch).
    """
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] < 2:
        return None
    starts = torch.zeros(position_ids.shape, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts if bool(starts.any()) else None
