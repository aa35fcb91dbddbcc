"""Configuration of a converted checkpoint: a base transformers model with some layers turned into VKT."""

from __future__ import annotations

import json
from typing import Any

from transformers import AutoConfig, LlamaConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# token ids / embedding tying are copied from the base config so tokenizers, generate() and
# pipelines that read them from the top-level config see the base model's values
_COPIED_FROM_BASE = ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")
# settings of this config that the wrapped base model reads from its own: this config is the one users and
# transformers set (``from_pretrained(d, output_hidden_states=True)``, ``config.tie_word_embeddings = False``),
# so it wins over the recorded ``base_config`` whenever the base model is built
SHARED_WITH_BASE = (*_COPIED_FROM_BASE, "use_cache", "output_hidden_states", "return_dict")


class VKTHybridConfig(PretrainedConfig):
    r"""Configuration of a [`VKTHybridForCausalLM`]: a GPT-2 / Llama-family model whose attention is
    replaced by VKT-Attention in the layers ``vkt_layers`` (all of them for a whole conversion).

    Args:
        base_config (`dict` or `PretrainedConfig`): the original model's config (its ``to_dict()``,
            including ``model_type``), from which the base architecture is rebuilt; a default
            ``LlamaConfig`` when omitted. Settings of this config that the base model also has
            (``tie_word_embeddings``, ``use_cache``, ``output_hidden_states``, ``return_dict``, token ids)
            are this config's: they override ``base_config`` when the base model is built.
        vkt_layers (`list[int]`, *optional*): indices of the decoder layers that are VKT (the
            others keep their softmax attention). Defaults to none.
        vkt_options (`dict`, *optional*): the VKT options of the converted layers (``preset``,
            ``normalization``, ``importance``, ``context_source``, ``gated_value``,
            ``context_weights``, ``distance_decay``, ``readout``, ``local_window``, ``eps``,
            ``mixer_chunk_size``, ...). Missing ones take the conversion defaults when the model
            is built, which also validates them and records the complete set here.

    Attributes of the base config (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ...) are
    readable on this config too.

    Example:

    ```python
    >>> import vkt_hf
    >>> from transformers import AutoModelForCausalLM
    >>> hybrid = vkt_hf.convert_to_vkt(AutoModelForCausalLM.from_pretrained("gpt2"), layers=[0, 2])
    >>> hybrid.config.vkt_layers, hybrid.config.base_config["model_type"]
    ([0, 2], 'gpt2')
    ```
    """

    model_type = "vkt_hybrid"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        base_config: dict[str, Any] | PretrainedConfig | None = None,
        vkt_layers: list[int] | None = None,
        vkt_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if isinstance(base_config, PretrainedConfig):
            base_config = base_config.to_dict()
        # as config.json will hold it (integer label ids become strings), so a saved config reloads equal
        self.base_config: dict[str, Any] = json.loads(json.dumps(base_config or LlamaConfig().to_dict(), default=str))
        if "model_type" not in self.base_config:
            raise ValueError("`base_config` must record the base `model_type`")
        self.vkt_layers = sorted(int(i) for i in (vkt_layers or []))
        # completed (preset, conversion defaults) and checked when the model is built: a config is plain data
        self.vkt_options: dict[str, Any] = dict(vkt_options or {})
        for name in _COPIED_FROM_BASE:
            if name in self.base_config:
                kwargs.setdefault(name, self.base_config[name])
        super().__init__(**kwargs)

    def get_base_config(self) -> PretrainedConfig:
        """The base model's config object, rebuilt from ``base_config`` with this config's shared settings."""
        values = dict(self.base_config)
        values.update({name: getattr(self, name) for name in SHARED_WITH_BASE})
        return AutoConfig.for_model(values.pop("model_type"), **values)

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: fall back to the base config's fields
        base = self.__dict__.get("base_config")
        if base is not None and not name.startswith("_"):
            if name in base:
                return base[name]
            # the base config's own aliases (GPT-2 stores `num_hidden_layers` as `n_layer`)
            model_type = base.get("model_type")
            aliases = CONFIG_MAPPING[model_type].attribute_map if model_type in CONFIG_MAPPING else {}
            if aliases.get(name) in base:
                return base[aliases[name]]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
