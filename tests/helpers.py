"""Builders shared by the tests: tiny models (native and converted) and random inputs of the ops.

Imported as ``from tests.helpers import ...`` (``pyproject.toml`` puts the repository root on
pytest's ``pythonpath``, so this works under plain ``pytest`` and ``python -m pytest`` alike).
Every builder seeds its own generator, so a test gets the same model or inputs on every run.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen3Config,
)

import vkt_hf
from vkt_hf.ops import functional
from vkt_hf.utils import CACHE_FIELD

# ------------------------------------------------------------------------------------ native VKT models

# configs every model-level behaviour test runs on: the two presets, every option flipped,
# and hybrids with softmax and no-mixing layers
TINY_VARIANTS: dict[str, dict] = {
    "paper": dict(preset="paper"),
    "default": dict(preset="default"),
    "options": dict(
        preset="paper",
        normalization="softsign",
        importance="projection",
        context_source="key",
        gated_value="value",
        context_weights="uniform",
        distance_decay=True,
        readout=True,
        num_key_value_heads=2,
    ),
    "hybrid": dict(preset="default", num_hidden_layers=3, mixer_types=["vkt", "softmax", "none"]),
}
NATIVE_VOCAB = 97
NATIVE_HIDDEN = 32


def tiny_config(**overrides) -> vkt_hf.VKTConfig:
    kwargs = dict(
        vocab_size=NATIVE_VOCAB,
        hidden_size=NATIVE_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        local_window=3,
    )
    kwargs.update(overrides)
    return vkt_hf.VKTConfig(**kwargs)


def tiny_model(variant: str = "default", seed: int = 0, **overrides) -> vkt_hf.VKTForCausalLM:
    """A tiny ``VKTForCausalLM`` of one of :data:`TINY_VARIANTS`, in eval mode."""
    torch.manual_seed(seed)
    model = vkt_hf.VKTForCausalLM(tiny_config(**{**TINY_VARIANTS[variant], **overrides})).eval()
    randomize_zero_initialised(model)
    return model


@torch.no_grad()
def randomize_zero_initialised(model: torch.nn.Module) -> None:
    """Random values for the VKT parameters that start at zero, so the tests exercise them."""
    for name, param in model.named_parameters():
        if "null_" in name or "readout_gate" in name:
            param.normal_(0.0, 0.5)


def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """One forward without a cache."""
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def run_in_chunks(model: torch.nn.Module, ids: torch.Tensor, bounds: list[int]):
    """Logits of ``ids`` fed in the chunks ``bounds[k]:bounds[k+1]``, carrying the cache, and the cache."""
    cache, outputs = None, []
    with torch.no_grad():
        for start, end in zip(bounds[:-1], bounds[1:]):
            out = model(ids[:, start:end], use_cache=True, **{CACHE_FIELD: cache})
            cache = getattr(out, CACHE_FIELD)
            outputs.append(out.logits)
    return torch.cat(outputs, dim=1), cache


# ------------------------------------------------------------------------------- converted checkpoints

CONVERTED_VOCAB = 61
_SMALL = dict(vocab_size=CONVERTED_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4)


def tiny_base(kind: str, **overrides) -> torch.nn.Module:
    """A tiny random causal LM of a convertible family (fixed seed, eval mode)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=CONVERTED_VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64, **overrides)
        return AutoModelForCausalLM.from_config(config).eval()
    small = dict(_SMALL, num_attention_heads=4, num_key_value_heads=2, **overrides)  # grouped-query attention
    configs = {
        "llama": lambda: LlamaConfig(**small),
        "mistral": lambda: MistralConfig(**small),
        "mixtral": lambda: MixtralConfig(**small, num_local_experts=2, num_experts_per_tok=1),
        "qwen2": lambda: Qwen2Config(**small),
        "qwen3": lambda: Qwen3Config(**small, head_dim=8),
    }
    return AutoModelForCausalLM.from_config(configs[kind]()).eval()


def tiny_hybrid(kind: str = "llama", layers=(1, 3), **options) -> vkt_hf.VKTHybridForCausalLM:
    """``tiny_base(kind)`` with ``layers`` converted to VKT (eval mode)."""
    return vkt_hf.convert_to_vkt(tiny_base(kind), layers=list(layers), **options).eval()


# ------------------------------------------------------------------------------------------ op inputs

#: float32 agreement of a fast path with a reference on the same inputs
TOL = dict(atol=1e-5, rtol=1e-5)


def op_inputs(batch, heads, length, dim, decay, padded, window, seed=0, device="cpu", dtype=torch.float32):
    """Random inputs of ``global_context`` / ``local_context``.

    Returns ``(stream, weights, mask, null, log_decay, global_state, local_state)``; with
    ``padded`` the first row is left-padded by a third and the second (if any) has a hole.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    stream = rnd(batch, heads, length, dim)  # (B, H, N, D)
    weights = torch.nn.functional.softplus(rnd(batch, heads, length)).to(torch.promote_types(dtype, torch.float32))
    mask = torch.ones(batch, length, device=device)
    if padded:
        mask[0, : length // 3] = 0  # left padding in the first row
        if batch > 1 and length > 2:
            mask[1, length // 2] = 0  # a hole in the second
    null = rnd(heads, dim).to(weights.dtype)
    log_decay = torch.log(functional.gamma_init(heads)).to(device=device, dtype=weights.dtype) if decay else None
    total = torch.rand(batch, heads, generator=g) + 0.5
    global_state = (rnd(batch, heads, dim).to(weights.dtype), total.to(device=device, dtype=weights.dtype))
    local_state = (rnd(batch, heads, window, dim), (torch.rand(batch, window, generator=g) > 0.3).float().to(device))
    return stream, weights, mask, null, log_decay, global_state, local_state


def count_kernel_calls(monkeypatch, labels: dict[str, str]) -> list[str]:
    """Record the calls of the compiled CPU kernels named in ``labels`` (kernel name -> label appended to the
    returned list) for the rest of the test. The kernels must build here (a C++ compiler is installed)."""
    from vkt_hf.ops import cpu_kernels

    module = cpu_kernels.kernel()
    assert module is not None, "the CPU kernels must build here (a C++ compiler is installed)"
    calls: list[str] = []

    class Counted:  # the extension's attributes are read-only: count through a stand-in module
        def __getattr__(self, name):
            function = getattr(module, name)
            if name not in labels:
                return function

            def counted(*args):
                calls.append(labels[name])
                return function(*args)

            return counted

    monkeypatch.setattr(cpu_kernels, "_MODULE", Counted())
    return calls
