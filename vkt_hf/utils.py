"""Small helpers shared by the models: the range of supported transformers versions, generation, packed batches."""

import torch
from transformers.generation import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

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


def skip_cached_tokens(input_ids: torch.Tensor, kwargs: dict) -> None:
    """Make ``generate()`` feed only the tokens a passed-in cache has not seen, also when every layer is VKT.

    transformers slices a prompt that continues a cache by the length its attention layers hold, and skips
    that when all layers are recurrent (``all(cache.is_linear)``); a VKT cache counts its tokens itself.
    Edits ``kwargs`` of ``prepare_inputs_for_generation`` in place (releases with ``next_sequence_length``).
    """
    cache = kwargs.get(CACHE_FIELD)
    if cache is None or kwargs.get("next_sequence_length", 0) is not None or kwargs.get("inputs_embeds") is not None:
        return
    seen = cache.get_seq_length()
    if 0 < seen < input_ids.shape[1]:
        kwargs["next_sequence_length"] = input_ids.shape[1] - seen


def cache_kwarg_renamed(forward):
    """transformers' warning for ``past_key_values=`` (renamed ``cache`` in 5.24), where that rename exists."""
    if CACHE_FIELD != "cache":
        return forward
    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)
