"""``VKTHybridForCausalLM``, a converted GPT-2 / Llama-family LM saved and reloaded through the Auto APIs,
and :func:`convert_to_vkt`, which builds one from a loaded model.

The class wraps the base model (``self.model``, e.g. a ``LlamaForCausalLM``) whose listed layers
hold :class:`~vkt_hf.layers.VKTAttention`. ``__init__`` rebuilds that exact structure from the
config (base architecture via ``AutoModelForCausalLM.from_config``, then the same in-place
conversion), so ``from_pretrained`` only has to load the saved tensors. ``forward`` and
``generate`` are the base model's.

Generation cache: ``generate()`` builds a ``VKTCache`` with a constant-size ``VKTStateLayer`` for every VKT
layer and the base model's growing keys/values for the softmax layers (a plain ``DynamicCache`` passed in
works too: each VKT layer swaps its own slot on first use). Beam search and batch expansion reorder both
kinds of layer. Like Mamba and Qwen3-Next, the model is ``_is_stateful``: ``generate()`` refuses assisted /
prompt-lookup decoding before the prefill.

The hybrid's config is the one users and transformers set; its shared settings (``SHARED_WITH_BASE``:
``tie_word_embeddings``, ``output_hidden_states``, ``return_dict``, ...) reach the wrapped model, and its
``_no_split_modules`` are the base model's (``device_map="auto"`` splits it where it splits the base).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils.generic import can_return_tuple

from ...cache import VKTCache
from ...convert import INIT_DEFAULTS, ConversionError, convert_layers, family_for
from ...convert.common import init_new_parameters
from ...layers.vkt_attention import vkt_layers
from ...utils import CACHE_FIELD, cache_kwarg_renamed, refuse_rollback_generation, sequence_starts, skip_cached_tokens
from .configuration_vkt_hybrid import VKTHybridConfig

#: the parameters a VKT layer adds to the pretrained projections (initialised here when a checkpoint lacks them)
NEW_PARAMETERS = (
    "importance",
    "importance_proj",
    "null_context",
    "null_value",
    "readout_gate",
    "decay_logit",
    "summary_bias",
)


class VKTHybridPreTrainedModel(PreTrainedModel):
    config_class = VKTHybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # set from the wrapped base model in `post_init` (transformers collects the children's)
    _no_split_modules: list[str] | None = None
    # the VKT state cannot be cropped back (as Mamba's and Qwen3-Next's): generate() refuses assisted decoding
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # the wrapped model initialises its own modules; VKT layers are initialised in `initialize_weights`
        pass

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Initialise what no checkpoint provided: the VKT layers' new parameters, then the base model's.

        The VKT layers sit inside the base model, whose own initialisation does not know them; their new
        parameters (``NEW_PARAMETERS``) start as :func:`vkt_hf.convert.common.init_new_parameters` says,
        which skips tensors loaded from a checkpoint (flagged ``_is_hf_initialized``), then count as done.
        """
        for layer in vkt_layers(self):
            init_new_parameters(layer)
            for name in NEW_PARAMETERS:
                part = getattr(layer, name, None)
                for param in [part] if isinstance(part, nn.Parameter) else getattr(part, "parameters", list)():
                    param._is_hf_initialized = True
        super().initialize_weights()


class VKTHybridForCausalLM(VKTHybridPreTrainedModel, GenerationMixin):
    """A causal LM whose attention is VKT in ``config.vkt_layers`` and the original elsewhere.

    Build one with :func:`vkt_hf.convert_to_vkt` (from a loaded model) or the ``vkt-hf convert``
    CLI; reload with ``AutoModelForCausalLM.from_pretrained(dir)`` after ``import vkt_hf``.

    Args:
        config: a [`VKTHybridConfig`].
        model: an already converted base model to wrap (used by :func:`vkt_hf.convert_to_vkt`);
            when omitted, the base model is built from ``config.base_config`` and converted.
    """

    def __init__(self, config: VKTHybridConfig, model: PreTrainedModel | None = None):
        super().__init__(config)
        if model is None:
            base_config = config.get_base_config()
            family_for(base_config)  # fail early with the list of supported architectures
            attn = getattr(config, "_attn_implementation", None)
            model = AutoModelForCausalLM.from_config(base_config, attn_implementation=attn)
            # completes and checks the options; the config records the complete set
            _, config.vkt_options = convert_layers(model, config.vkt_layers, **config.vkt_options)
            # nothing is loaded yet: `from_pretrained` must report the VKT tensors a checkpoint lacks (not
            # take them for initialised, as a conversion of loaded weights does) and `initialize_weights` start them
            for layer in vkt_layers(model):
                for tensor in [*layer.modules(), *layer.parameters()]:
                    tensor._is_hf_initialized = False
        self.model = model
        self.post_init()
        self._no_split_modules = set(getattr(model, "_no_split_modules", None) or [])

    @classmethod
    def from_converted(
        cls, model: PreTrainedModel, vkt_layers: list[int], vkt_options: dict[str, Any]
    ) -> VKTHybridForCausalLM:
        """Wrap a base LM whose ``vkt_layers`` were converted in place with ``vkt_options``."""
        config = VKTHybridConfig(
            base_config=model.config.to_dict(),
            vkt_layers=vkt_layers,
            vkt_options=vkt_options,
            dtype=getattr(model.config, "dtype", None),
        )
        config._attn_implementation = getattr(model.config, "_attn_implementation", None)
        hybrid = cls(config, model=model)
        hybrid.generation_config = model.generation_config
        return hybrid

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        self.model.config.tie_word_embeddings = self.config.tie_word_embeddings  # the hybrid's setting decides
        super().tie_weights(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args, **kwargs) -> None:
        # a VKTCache: VKT states for the converted layers, the base model's keys/values for the others
        if generation_config.use_cache is not False and model_kwargs.get(CACHE_FIELD) is None:
            converted = set(self.config.vkt_layers)
            kinds = ["vkt" if i in converted else "softmax" for i in range(self.config.num_hidden_layers)]
            model_kwargs[CACHE_FIELD] = VKTCache(kinds)

    def _validate_generation_mode(self, generation_mode, *args, **kwargs) -> None:
        refuse_rollback_generation(self, generation_mode)  # before the prefill, with a message naming VKT
        super()._validate_generation_mode(generation_mode, *args, **kwargs)

    @cache_kwarg_renamed
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ):
        """The base model's forward (``output_attentions`` etc. pass through; ``cache`` is ``past_key_values``
        before transformers 5.24). ``return_dict=False`` returns a tuple.

        With ``output_attentions=True`` the VKT layers contribute their scalar attentions
        ``(B, H, N)``; softmax layers contribute ``(B, H, N, N)`` weights where their attention
        implementation returns them (eager), nothing otherwise.
        """
        config = self.config
        kwargs[CACHE_FIELD] = cache if cache is not None else past_key_values
        for name in ("output_attentions", "output_hidden_states"):  # this config's settings, not the base's
            if kwargs.get(name) is None:
                kwargs[name] = getattr(config, name)
        if use_cache is None:
            use_cache = config.use_cache and not self.training
        if attention_mask is None and kwargs.get(CACHE_FIELD) is None and sequence_starts(position_ids) is not None:
            use_cache = False  # a packed batch (restarting positions) has no single continuation to cache
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **kwargs,
        )

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        kwargs["inputs_embeds"] = inputs_embeds
        skip_cached_tokens(input_ids, kwargs)  # continuing a passed-in cache feeds only the new tokens
        return self.model.prepare_inputs_for_generation(input_ids, **kwargs)


def convert_to_vkt(
    model: nn.Module,
    layers: str | int | Iterable[int] = "all",
    preset: str = "default",
    *,
    progress: bool = False,
    importance_init: str = INIT_DEFAULTS["importance_init"],
    readout_init: tuple[float, float] | None = INIT_DEFAULTS["readout_init"],
    **vkt_options: Any,
) -> nn.Module:
    """Replace the attention of the chosen decoder layers of a loaded model by VKT-Attention.

    The swap is done in place: the listed layers get a :class:`~vkt_hf.layers.VKTAttention` that
    reuses the pretrained projections; every other layer, and everything else in the model, is
    left exactly as it was. See ``docs/conversion.md`` for the weight mapping.

    Example::

        base = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
        hybrid = vkt_hf.convert_to_vkt(base, layers="even")   # half the layers VKT
        hybrid.save_pretrained("smollm2-vkt-half")            # AutoModelForCausalLM reloads it

    Args:
        model: a ``GPT2LMHeadModel`` / ``GPT2Model`` or a Llama-family model (Llama, Mistral,
            Mixtral, Qwen2, Qwen3; ``*ForCausalLM`` or the bare ``*Model``).
        layers: ``"all"``, ``"none"``, ``"even"``, ``"odd"``, ``"0,2,5-7"`` or a list of indices.
        preset: ``"default"`` or ``"paper"``; conversion then reuses the pretrained keys and values
            (``context_source="key"``, ``gated_value="value"``) unless you override them.
        progress: show a progress bar.
        importance_init: ``"zeros"`` (default) or ``"random"``: start of the importance vectors ``V``.
        readout_init: ``(g_K, g_T)`` initial read-out gates (when ``readout`` is on); ``None``: the
            conversion default (see :func:`vkt_hf.convert.common.init_new_parameters`).
        **vkt_options: any VKT option (``normalization``, ``local_window``, ``distance_decay``, ...).

    Returns:
        For a causal LM, a :class:`VKTHybridForCausalLM` wrapping ``model`` (its
        ``save_pretrained`` writes the hybrid format that ``AutoModelForCausalLM`` reloads). For a
        bare decoder (``GPT2Model``, ``LlamaModel``), ``model`` itself, converted in place.

    Raises:
        ConversionError: unsupported architecture (the message lists the supported ones), bad
            layer indices or options.
    """
    if isinstance(model, VKTHybridForCausalLM):
        raise ConversionError("this model is already a converted VKT hybrid")
    indices, options = convert_layers(
        model,
        layers,
        preset=preset,
        progress=progress,
        importance_init=importance_init,
        readout_init=readout_init,
        **vkt_options,
    )
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        return model
    return VKTHybridForCausalLM.from_converted(model, indices, options)
