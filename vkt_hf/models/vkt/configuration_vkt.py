"""Configuration of VKT models."""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

from ...constants import BACKENDS, LAYER_TYPE_NAMES, NORMALIZATIONS

LAYER_TYPES = tuple(LAYER_TYPE_NAMES.values())

# The settings a preset fixes. `paper` is the word-for-word reading of the paper (see
# docs/method.md); `default` is the best O(N) row of the project's ablation (docs/ablation.md).
VKT_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        normalization="decimal",
        importance="parameter",
        context_source="query",
        gated_value="query",
        context_weights="importance",
        distance_decay=False,
        readout=False,
        local_attention=False,
    ),
    "default": dict(
        normalization="softsign",
        importance="parameter",
        context_source="key",
        gated_value="value",
        context_weights="importance",
        distance_decay=True,
        readout=True,
        local_attention=False,
    ),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "normalization": NORMALIZATIONS,
    "importance": ("parameter", "projection"),
    "context_source": ("query", "key"),
    "gated_value": ("query", "value"),
    "context_weights": ("importance", "uniform"),
}


def validate_vkt_options(config: Any) -> None:
    """Check the VKT fields of any config (``VKTConfig`` or a converted hybrid); raise ``ValueError``."""
    for name, choices in _CHOICES.items():
        value = getattr(config, name)
        if value not in choices:
            raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
    for name in (
        "local_window",
        "local_attention_window",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "mixer_chunk_size",
    ):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
    eps = config.eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
        # eps = inf would set every scalar attention to 0; NaN compares false with everything
        raise ValueError(f"`eps` must be a finite positive number, got {eps!r}")
    if config.num_attention_heads % config.num_key_value_heads != 0:
        raise ValueError(
            f"`num_attention_heads` ({config.num_attention_heads}) must be a multiple of "
            f"`num_key_value_heads` ({config.num_key_value_heads})"
        )
    if config.accumulation_dtype not in ("float32", "float64"):
        raise ValueError(f"`accumulation_dtype` must be 'float32' or 'float64', got {config.accumulation_dtype!r}")
    backend = getattr(config, "vkt_backend", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"`vkt_backend` must be one of {BACKENDS}, got {backend!r}")
    for name in (
        "distance_decay",
        "readout",
        "causal",
        "local_attention",
        "local_attention_rope",
        "vkt_terms",
        "learned_sink",
    ):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"`{name}` must be True or False, got {getattr(config, name)!r}")
    sinks = config.sink_tokens
    if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
        raise ValueError(f"`sink_tokens` must be an integer >= 0, got {sinks!r}")
    if config.global_readout not in ("window", "add"):
        raise ValueError(f"`global_readout` must be 'window' or 'add', got {config.global_readout!r}")
    if not (config.vkt_terms or config.local_attention):
        raise ValueError("`vkt_terms=False` needs `local_attention=True` (the layer would mix nothing)")
    if config.local_attention and not config.causal:
        raise ValueError("`local_attention=True` needs `causal=True` (the window is causal softmax attention)")
    if config.learned_sink and not config.local_attention:
        raise ValueError("`learned_sink=True` needs `local_attention=True` (the sink is a slot of the window)")


def _default_head_dim(hidden_size: Any, num_attention_heads: Any) -> int:
    """``hidden_size // num_attention_heads``, with a clear error when it is not a whole number."""
    if not isinstance(num_attention_heads, int) or num_attention_heads < 1:
        raise ValueError(f"`num_attention_heads` must be an integer >= 1, got {num_attention_heads!r}")
    if hidden_size % num_attention_heads != 0:
        raise ValueError(
            f"`hidden_size` ({hidden_size}) must be divisible by `num_attention_heads` "
            f"({num_attention_heads}), or give `head_dim` explicitly"
        )
    return hidden_size // num_attention_heads


class VKTConfig(PretrainedConfig):
    r"""Configuration of a [`VKTModel`] / [`VKTForCausalLM`]: pre-norm decoder blocks whose token
    mixer is VKT-Attention (optionally softmax attention or no mixing in chosen layers), each
    followed by a SwiGLU MLP.

    Args:
        vocab_size (`int`, *optional*, defaults to 32000): vocabulary size.
        hidden_size (`int`, *optional*, defaults to 512): width of the residual stream.
        intermediate_size (`int`, *optional*, defaults to 1408): width of the MLP.
        num_hidden_layers (`int`, *optional*, defaults to 8): number of decoder blocks.
        num_attention_heads (`int`, *optional*, defaults to 8): heads ``H`` of the mixer.
        num_key_value_heads (`int`, *optional*): heads of the key/value projections (grouped
            like GQA); defaults to ``num_attention_heads``.
        head_dim (`int`, *optional*): head size ``d``; defaults to ``hidden_size // num_attention_heads``.
        preset (`str`, *optional*, defaults to `"default"`): `"default"` (the ablation's best
            O(N) setting) or `"paper"` (the literal reading). Fills every VKT option not given.
        normalization (`str`): how the ratio becomes the scalar attention: `"decimal"` (the
            paper's "add a decimal point"), `"softsign"`, `"sigmoid"`, `"tanh"` or `"none"`.
        importance (`str`): `"parameter"` (a trainable vector ``V`` per head) or `"projection"`
            (token-dependent ``V_i = W_V x_i``).
        context_source (`str`): vectors the contexts are averaged over: `"query"` (``Q``, the
            paper) or `"key"` (a separate key projection).
        gated_value (`str`): vector scaled by the attention: `"query"` (the paper) or `"value"`.
        context_weights (`str`): weights of the global mean: `"importance"` (``softplus(s_j)``)
            or `"uniform"`.
        distance_decay (`bool`): multiply the global-mean weights by a learned per-head
            ``gamma_h^(i-j)`` (heads start at different half-lives).
        readout (`bool`): add the gated global and local means of the value vectors to the output.
        local_attention (`bool`): add exact causal softmax attention over the last
            ``local_attention_window`` tokens (the token itself included) and the first ``sink_tokens``
            tokens (the attention sink) to the output; what keeps a converted checkpoint's
            short-range behaviour. Off in both presets; on by default when converting a checkpoint.
        local_attention_window (`int`, *optional*, defaults to 64): tokens the softmax window sees.
        sink_tokens (`int`, *optional*, defaults to 1): first real tokens every query may attend to
            (kept in the decoding state); 0 turns the sink off.
        learned_sink (`bool`, *optional*, defaults to `False`): add a learned sink to the window's
            softmax: per head a key ``k_s`` and a value ``v_s`` (both starting at zero), one more slot
            with logit ``q_i . k_s / sqrt(d)`` (``q_i`` without RoPE: the sink has no position). It can
            replace the kept first tokens (``sink_tokens=0``) or join them.
        global_readout (`str`, *optional*, defaults to `"window"`): how the read-out's global mean of
            values joins the local attention window: `"window"`, as one more slot of the window's
            softmax whose logit is the query against the global mean key (plus the log of the number
            of far tokens and a learned per-head bias), or `"add"`, added with its gate ``gK``.
            Without the window it is always added.
        vkt_terms (`bool`, *optional*, defaults to `True`): compute the VKT terms (the scalar
            attention ``a U`` and the read-out); `False` leaves the local attention window alone, the
            window + sink baseline of the quality measurements (and an evaluation-time switch).
        local_attention_rope (`bool`, *optional*, defaults to `True`): rotate the window's queries
            and keys with RoPE (the model's own tables when it passes ``position_embeddings``, else
            ``rope_theta``); `False` for models without RoPE (GPT-2).
        local_window (`int`, *optional*, defaults to 16): ``n``, tokens on each side in ``T``.
        eps (`float`, *optional*, defaults to 1e-3): lower bound of ``|K . T|``. It also bounds how
            much float rounding in ``K . T`` is amplified in ``a`` (the ratio is ill-conditioned when
            ``K`` and ``T`` are nearly orthogonal): see ``benchmarks/conditioning.py``.
        accumulation_dtype (`str`, *optional*, defaults to `"float32"`): dtype of the context sums
            and the ratio, `"float32"` or `"float64"`.
        vkt_backend (`str`, *optional*): kernels for the context sums: `"reference"`, `"fused"`,
            `"triton"` or `"auto"` (the default: picked per device and size, see `vkt_hf.ops`; the
            `VKT_BACKEND` environment variable overrides `"auto"`). Same results, different speed.
        causal (`bool`, *optional*, defaults to `True`): causal (decoder) or bidirectional mixing.
        layer_types (`list[str]`, *optional*): the token mixer of each layer, in transformers' names:
            `"linear_attention"` (VKT), `"full_attention"` (softmax attention with RoPE and a KV cache, for
            hybrids and baselines) or `"mlp"` (no token mixing); the short names `"vkt"`, `"softmax"` and
            `"none"` are accepted too. Defaults to all VKT. (`mixer_types`, the name before, still loads;
            `config.mixer_types` reads the kinds in the short names.)
        mixer_chunk_size (`int`, *optional*, defaults to 4096): the mixer processes longer inputs
            in chunks of this many tokens, carrying its state, so memory stays bounded.
        rope_theta (`float`, *optional*, defaults to 10000.0): RoPE base of softmax layers.
        hidden_act (`str`, *optional*, defaults to `"silu"`), rms_norm_eps (`float`, defaults to
        1e-6), initializer_range (`float`, defaults to 0.02), attention_bias (`bool`), mlp_bias
        (`bool`), tie_word_embeddings (`bool`, defaults to `True`), use_cache (`bool`), and the
        usual token ids.

    Example:

    ```python
    >>> import vkt_hf
    >>> config = vkt_hf.VKTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4)
    >>> model = vkt_hf.VKTForCausalLM(config)
    ```
    """

    model_type = "vkt"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        intermediate_size: int = 1408,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        preset: str = "default",
        normalization: str | None = None,
        importance: str | None = None,
        context_source: str | None = None,
        gated_value: str | None = None,
        context_weights: str | None = None,
        distance_decay: bool | None = None,
        readout: bool | None = None,
        local_attention: bool | None = None,
        local_attention_window: int = 64,
        sink_tokens: int = 1,
        learned_sink: bool = False,
        local_attention_rope: bool = True,
        global_readout: str = "window",
        vkt_terms: bool = True,
        local_window: int = 16,
        eps: float = 1e-3,
        accumulation_dtype: str = "float32",
        vkt_backend: str = "auto",
        causal: bool = True,
        layer_types: list[str] | None = None,
        mixer_chunk_size: int = 4096,
        rope_theta: float = 10000.0,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs: Any,
    ):
        if preset not in VKT_PRESETS:
            raise ValueError(f"`preset` must be one of {tuple(VKT_PRESETS)}, got {preset!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = _default_head_dim(hidden_size, num_attention_heads) if head_dim is None else head_dim
        self.preset = preset
        given = dict(
            normalization=normalization,
            importance=importance,
            context_source=context_source,
            gated_value=gated_value,
            context_weights=context_weights,
            distance_decay=distance_decay,
            readout=readout,
            local_attention=local_attention,
        )
        for name, value in given.items():
            setattr(self, name, VKT_PRESETS[preset][name] if value is None else value)
        self.local_attention_window = local_attention_window
        self.sink_tokens = sink_tokens
        self.learned_sink = learned_sink
        self.local_attention_rope = local_attention_rope
        self.global_readout = global_readout
        self.vkt_terms = vkt_terms
        self.local_window = local_window
        self.eps = eps
        self.accumulation_dtype = accumulation_dtype
        self.vkt_backend = vkt_backend
        self.causal = causal
        self.mixer_chunk_size = mixer_chunk_size
        self.rope_theta = rope_theta
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **{k: v for k, v in kwargs.items() if k != "mixer_types"},
        )
        # set after the base __init__, whose checks know no kind for a layer without token mixing (see `validate`);
        # configs saved before `layer_types` name it `mixer_types`
        layer_types = layer_types or kwargs.get("mixer_types") or ["vkt"] * num_hidden_layers
        self.layer_types = [LAYER_TYPE_NAMES.get(t, t) for t in layer_types]
        self._validate()

    def validate(self) -> None:
        """transformers' checks of a config, with this model's own check of ``layer_types``.

        transformers checks ``layer_types`` against the kinds of its own models, which have no layer
        without token mixing (``"mlp"`` here, the ablation's lower bound); ``_validate`` checks ours.
        """
        for check in getattr(PretrainedConfig, "__class_validators__", []):
            if check.__name__ != "validate_layer_type":
                check(self)
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        validate_vkt_options(self)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"`layer_types` has {len(self.layer_types)} entries but `num_hidden_layers` is {self.num_hidden_layers}"
            )
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad:
            raise ValueError(
                f"`layer_types` entries must be in {LAYER_TYPES} (or {tuple(LAYER_TYPE_NAMES)}), got {bad}"
            )
        if not self.causal and "full_attention" in self.layer_types:
            raise ValueError("`layer_types` may only contain softmax ('full_attention') layers when `causal=True`")

    @property
    def mixer_types(self) -> list[str]:
        """The layer kinds in the project's short names (``"vkt"``, ``"softmax"``, ``"none"``)."""
        short = {kind: name for name, kind in LAYER_TYPE_NAMES.items()}
        return [short.get(t, t) for t in self.layer_types]

    @mixer_types.setter
    def mixer_types(self, value: list[str]) -> None:
        self.layer_types = [LAYER_TYPE_NAMES.get(t, t) for t in value]
