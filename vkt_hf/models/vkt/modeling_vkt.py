"""VKT models: pre-norm decoder blocks with a VKT token mixer and a SwiGLU MLP.

Read top to bottom: softmax attention (for hybrids and baselines) -> no-mixing mixer ->
decoder layer -> ``VKTPreTrainedModel`` -> ``VKTModel`` -> ``VKTForCausalLM``. The VKT
mixer itself is :class:`vkt_hf.layers.VKTAttention`; the norm and MLP are Llama's.

As in transformers' own models, the RoPE tables are computed once per forward (``position_embeddings``)
and handed to every layer; softmax layers dispatch through ``ALL_ATTENTION_FUNCTIONS`` (``eager``,
``sdpa``, ``flex_attention``) with the mask ``create_causal_mask`` builds for that implementation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.utils.generic import can_return_tuple

from ...cache import VKTCache, vkt_state_layer
from ...layers.vkt_attention import VKTAttention, init_vkt_parameters
from ...ops import functional as vkt
from ...utils import CACHE_FIELD, cache_kwarg_renamed, refuse_rollback_generation, sequence_starts, skip_cached_tokens
from .configuration_vkt import VKTConfig


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention written out (transformers' ``eager``): ``(B, H, N, d)`` queries, ``(B, Hk, K, d)`` keys.

    ``attention_mask`` is additive ``(B, 1, N, K)`` (0 / large negative). Returns the output ``(B, N, H, d)``
    and the weights ``(B, H, N, K)``.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)  # GQA
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, N, K)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class SoftmaxAttention(nn.Module):
    """Causal softmax attention with RoPE and a KV cache: the baseline and hybrid layers."""

    def __init__(self, config: VKTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        hidden, heads, kv_heads, dim = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, dim
        self.num_key_value_groups = heads // kv_heads
        self.scaling = dim**-0.5
        self.is_causal = True
        self.q_proj = nn.Linear(hidden, heads * dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(heads * dim, hidden, bias=config.attention_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Any = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``attention_mask``: what ``create_causal_mask`` made for ``config._attn_implementation``."""
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H, N, d)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # (B, Hk, N, d)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = vkt.apply_rotary(q, *position_embeddings), vkt.apply_rotary(k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(batch, length, -1).contiguous()), weights


class NoMixing(nn.Module):
    """No token mixing: a per-token linear map (the lower bound of the ablation)."""

    def __init__(self, config: VKTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        inner = config.num_attention_heads * config.head_dim
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=config.attention_bias)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=config.attention_bias)

    def forward(self, hidden_states: torch.Tensor, cache: Any = None, **kwargs) -> tuple[torch.Tensor, None]:
        if cache is not None:  # no state, but the cache still counts the tokens seen
            vkt_state_layer(cache, self.layer_idx).update_state(None, hidden_states.shape[1])
        return self.o_proj(self.v_proj(hidden_states)), None


#: the mixer of each ``layer_types`` kind
MIXERS: dict[str, type[nn.Module]] = {
    "linear_attention": VKTAttention,
    "full_attention": SoftmaxAttention,
    "mlp": NoMixing,
}


class VKTDecoderLayer(GradientCheckpointingLayer):
    """``x + mixer(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: VKTConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = MIXERS[self.layer_type](config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Any = None,
        softmax_mask: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``attention_mask``: the 2-D padding mask (VKT layers); ``softmax_mask``: the softmax layers' mask."""
        mask = softmax_mask if self.layer_type == "full_attention" else attention_mask
        mixed, weights = self.self_attn(
            self.input_layernorm(hidden_states),
            attention_mask=mask,
            position_embeddings=position_embeddings,
            cache=cache,
            **kwargs,
        )
        hidden_states = hidden_states + mixed
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, weights


class VKTPreTrainedModel(PreTrainedModel):
    config_class = VKTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["VKTDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # the VKT state summarises all past tokens and cannot be cropped back (as Mamba's and Qwen3-Next's):
    # generate() refuses assisted / prompt-lookup decoding
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # `transformers.initialization` skips tensors already loaded from a checkpoint
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, 0.0, std)
        elif isinstance(module, LlamaRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, VKTAttention):
            init_vkt_parameters(module)


def real_token_positions(
    attention_mask: torch.Tensor | None, batch: int, length: int, past: int, device
) -> torch.Tensor:
    """RoPE positions ``(B, N)`` of the new tokens: the number of real tokens before each (left padding does not count)."""
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] == past + length:
        return (attention_mask.to(device=device, dtype=torch.long).cumsum(-1) - 1).clamp(min=0)[:, -length:]
    return torch.arange(past, past + length, device=device).expand(batch, length)


class VKTModel(VKTPreTrainedModel):
    """The bare VKT decoder: embeddings, blocks and the final norm."""

    def __init__(self, config: VKTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([VKTDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _softmax_mask(self, inputs_embeds, attention_mask, cache, position_ids) -> Any:
        """The softmax layers' mask for ``config._attn_implementation`` (``None`` without softmax layers)."""
        if "full_attention" not in self.config.layer_types:
            return None
        kwargs = {CACHE_FIELD: cache, "position_ids": position_ids}
        return create_causal_mask(self.config, inputs_embeds, attention_mask, **kwargs)

    @cache_kwarg_renamed
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: VKTCache | None = None,
        past_key_values: VKTCache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Run the decoder.

        Args:
            input_ids: ``(B, N)`` token ids (or give ``inputs_embeds`` ``(B, N, hidden)``).
            attention_mask: ``(B, past + N)`` 1 for real tokens, 0 for padding (left padding).
            position_ids: ``(B, N)`` RoPE positions; by default the number of real tokens before each token.
                Without ``attention_mask``, positions that restart (``[[0, 1, 2, 0, 1]]``) mark packed sequences
                (``DataCollatorWithFlattening``): no layer mixes tokens across a sequence start.
            cache: a [`VKTCache`] to continue from (``past_key_values`` is the pre-5.24 name).
            use_cache: return the cache (created when not given). Defaults to ``config.use_cache``
                outside training; packed batches build none.
            output_attentions: return the scalar attentions ``a`` of every VKT layer, each ``(B, H, N)``
                (softmax layers add their ``(B, H, N, N)`` weights when run with ``eager`` attention).
            output_hidden_states: return the input of every layer and the final hidden states.
            return_dict: ``False`` returns a tuple (default ``config.return_dict``).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of `input_ids` or `inputs_embeds`")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must have shape (batch, tokens), got {tuple(attention_mask.shape)}")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden_states.shape[:2]
        cache = cache if cache is not None else past_key_values
        packed = attention_mask is None and sequence_starts(position_ids) is not None
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if not self.config.causal or (packed and cache is None):
            use_cache = False  # a packed batch is a training / scoring input: it has no single continuation
        if use_cache and cache is None:
            cache = VKTCache(self.config.layer_types)
        if not use_cache:
            cache = None
        past = 0 if cache is None else cache.get_seq_length()
        if position_ids is None:
            position_ids = real_token_positions(attention_mask, batch, length, past, hidden_states.device)
        position_ids = position_ids.expand(batch, length)
        rotary = vkt.rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        softmax_mask = self._softmax_mask(hidden_states, attention_mask, cache, position_ids)
        if attention_mask is not None:  # padding is not context: whatever padded positions hold (NaN, inf)
            # is zeroed before any layer, so a softmax layer's 0 weight never multiplies it (0 * NaN = NaN)
            hidden_states = hidden_states.masked_fill(attention_mask[:, -length:, None] == 0, 0)

        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        all_hidden = [] if output_hidden_states else None
        all_weights = [] if output_attentions else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states, weights = layer(
                hidden_states,
                attention_mask=attention_mask,
                position_embeddings=rotary,
                position_ids=position_ids,
                cache=cache,
                softmax_mask=softmax_mask,
                **kwargs,
            )
            if all_weights is not None and weights is not None:
                all_weights.append(weights)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_weights) if all_weights is not None else None,
            **{CACHE_FIELD: cache},
        )


class VKTForCausalLM(VKTPreTrainedModel, GenerationMixin):
    """VKT decoder with a language-modelling head; generates with a constant-size [`VKTCache`]."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: VKTConfig):
        super().__init__(config)
        if not config.causal:
            raise ValueError("VKTForCausalLM needs `causal=True`; use VKTModel for bidirectional mixing")
        self.model = VKTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args, **kwargs) -> None:
        # generate() would build a DynamicCache; VKT layers need their constant-size state instead
        if generation_config.use_cache is not False and model_kwargs.get(CACHE_FIELD) is None:
            model_kwargs[CACHE_FIELD] = VKTCache(self.config.layer_types)

    def _validate_generation_mode(self, generation_mode, *args, **kwargs) -> None:
        refuse_rollback_generation(self, generation_mode)  # before the prefill, with a message naming VKT
        super()._validate_generation_mode(generation_mode, *args, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        kwargs["inputs_embeds"] = inputs_embeds
        skip_cached_tokens(input_ids, kwargs)  # continuing a passed-in cache feeds only the new tokens
        return super().prepare_inputs_for_generation(input_ids, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: VKTCache | None = None,
        past_key_values: VKTCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Language-model forward; see [`VKTModel.forward`]. ``labels`` ``(B, N)`` (``-100`` ignored)
        give the shifted next-token loss; ``logits_to_keep=k`` computes logits for the last ``k``
        positions only (an int) or for given positions (a 1-D tensor); ``return_dict=False`` returns
        ``(loss, logits, ...)``."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            cache=cache if cache is not None else past_key_values,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
