"""VKT models: pre-norm decoder blocks with a VKT token mixer and a SwiGLU MLP.

Read top to bottom: softmax attention (for hybrids and baselines) -> no-mixing mixer ->
decoder layer -> ``VKTPreTrainedModel`` -> ``VKTModel`` -> ``VKTForCausalLM``. The VKT
mixer itself is :class:`vkt_hf.layers.VKTAttention`; the norm and MLP are Llama's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from ...cache import VKTCache, vkt_state_layer
from ...layers.vkt_attention import VKTAttention, init_vkt_parameters, padding_mask
from ...utils import CACHE_FIELD
from .configuration_vkt import VKTConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``(B, H, N, d)`` at integer ``positions`` ``(B, N)``."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = positions.float()[..., None] * inv_freq  # (B, N, d/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, N, d)
    return (x.float() * angles.cos() + rotate_half(x.float()) * angles.sin()).to(x.dtype)


class SoftmaxAttention(nn.Module):
    """Causal softmax attention (SDPA) with RoPE and a KV cache: the baseline and hybrid layers."""

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
        self.q_proj = nn.Linear(hidden, heads * dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(heads * dim, hidden, bias=config.attention_bias)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Any = None, **kwargs
    ) -> tuple[torch.Tensor, None]:
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        past = 0 if cache is None else cache.get_seq_length(self.layer_idx)
        # positions count real tokens only, so a left-padded row sees the same rotations as alone
        full_mask = padding_mask(attention_mask, batch, past + length, hidden_states.device)  # (B, past + N)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, -length:]
        q = apply_rope(q, positions, self.config.rope_theta)
        k = apply_rope(k, positions, self.config.rope_theta)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        total = k.shape[-2]
        causal = torch.ones(length, total, dtype=torch.bool, device=q.device).tril(total - length)
        itself = causal & ~causal.tril(total - length - 1)  # the diagonal: each query's own key
        # padding keys are hidden; a padded query still sees itself so its row stays finite
        allowed = (causal[None] & full_mask[:, None, -total:].bool()) | itself[None]  # (B, N, total)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[:, None], enable_gqa=self.num_kv_heads != self.num_heads
        )
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(out), None


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


MIXERS: dict[str, type[nn.Module]] = {"vkt": VKTAttention, "softmax": SoftmaxAttention, "none": NoMixing}


class VKTDecoderLayer(GradientCheckpointingLayer):
    """``x + mixer(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: VKTConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        self.self_attn = MIXERS[self.mixer_type](config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mixed, scalars = self.self_attn(
            self.input_layernorm(hidden_states), attention_mask=attention_mask, cache=cache
        )
        hidden_states = hidden_states + mixed
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, scalars


class VKTPreTrainedModel(PreTrainedModel):
    config_class = VKTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["VKTDecoderLayer"]
    _supports_sdpa = True

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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
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
            cache: a [`VKTCache`] to continue from (``past_key_values`` is the pre-5.24 name).
            use_cache: return the cache (created when not given). Defaults to ``config.use_cache``
                outside training.
            output_attentions: return the scalar attentions ``a`` of every layer, each
                ``(B, H, N)`` (``None`` for softmax / no-mixing layers).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of `input_ids` or `inputs_embeds`")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if not self.config.causal:
            use_cache = False
        if use_cache and cache is None:
            cache = VKTCache(self.config.mixer_types)
        if cache is not None and not use_cache:
            cache = None
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must have shape (batch, tokens), got {tuple(attention_mask.shape)}")

        all_hidden = [] if output_hidden_states else None
        all_scalars = [] if output_attentions else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states, scalars = layer(hidden_states, attention_mask=attention_mask, cache=cache)
            if all_scalars is not None:
                all_scalars.append(scalars)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_scalars) if all_scalars is not None else None,
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
            model_kwargs[CACHE_FIELD] = VKTCache(self.config.mixer_types)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
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
        positions only (an int) or for given positions (a 1-D tensor)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            cache=cache if cache is not None else past_key_values,
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
