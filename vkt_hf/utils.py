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


def sequence_starts(
    position_ids: torch.Tensor | None,
    cu_seq_lens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``(B, N)`` bool, True where a packed sequence starts after an earlier one in the row; ``None`` if none does.

    A packed (padding-free) row holds several sequences end to end (transformers' ``DataCollatorWithFlattening``):
    each one's ``position_ids`` count from 0 again, and the flash-attention path also passes their cumulative
    lengths ``cu_seq_lens`` (1-D, over a single row). A sequence starts where a position is not the one before
    plus 1, or at a cumulative length. With the padding ``mask`` ``(B, N)``, only real tokens that follow a real
    token can start one: left padding (positions ``0, 0, 0, 1, ...``) and right padding are not packing.
    """
    if mask is not None:
        shape = mask.shape
    elif position_ids is not None and position_ids.dim() == 2:
        shape = position_ids.shape
    else:
        return None
    starts = torch.zeros(shape, dtype=torch.bool, device=mask.device if mask is not None else position_ids.device)
    if position_ids is not None and position_ids.dim() == 2 and shape[-1] > 1:
        positions = position_ids.to(starts.device).expand(shape)
        starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    if cu_seq_lens is not None and cu_seq_lens.dim() == 1 and shape[0] == 1:
        bounds = cu_seq_lens[1:-1].to(device=starts.device, dtype=torch.long)
        starts[0, bounds[(bounds > 0) & (bounds < shape[-1])]] = True
    if mask is not None:
        real = mask != 0
        starts &= real & (real.long().cumsum(-1) - real.long() > 0)
    else:
        starts[:, 0] = False
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
