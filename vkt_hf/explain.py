"""Importance maps: each token shaded by its scalar attention ``a``, per layer and head.

Works on any model holding :class:`~vkt_hf.layers.VKTAttention` modules (native VKT models and
converted Llama/GPT-2 hybrids): forward hooks collect the ``a`` every VKT layer returns.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import encode
from .layers import vkt_layers


@dataclass
class ImportanceMap:
    """Scalar attentions of one text.

    Attributes:
        tokens: the decoded tokens, in order.
        layers: the indices of the VKT layers (in model order).
        scalars: ``(vkt_layers, heads, tokens)`` the scalar attention ``a``.
        notes: lines that explain a map that would otherwise puzzle (every ``a`` is 0, and why).
    """

    tokens: list[str]
    layers: list[int]
    scalars: torch.Tensor
    notes: list[str] = field(default_factory=list)  # why the map looks as it does (e.g. all a = 0)

    def mean(self) -> torch.Tensor:
        """``(tokens,)`` ``a`` averaged over layers and heads."""
        return self.scalars.mean(dim=(0, 1))


@torch.no_grad()
def importance_map(model: nn.Module, tokenizer, text: str, max_tokens: int = 512) -> ImportanceMap:
    """Run ``text`` through ``model`` and collect every VKT layer's scalar attentions."""
    layers = list(enumerate(vkt_layers(model)))
    if not layers:
        raise ValueError("the model has no VKT layers: convert it first (`vkt-hf convert`) or load a VKT model")
    ids = encode(tokenizer, text)[:max_tokens]
    if not ids:
        raise ValueError("the text is empty after tokenization")
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, out[1].detach()))
        for i, module in layers
    ]
    try:
        model.eval()
        device = next(model.parameters()).device
        model(torch.tensor([ids], device=device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    scalars = torch.stack([captured[i][0].float().cpu() for i, _ in layers])  # (L, H, N)
    tokens = [tokenizer.decode([t]) for t in ids]
    notes = zero_map_notes([m for _, m in layers]) if not scalars.any() else []
    return ImportanceMap(tokens=tokens, layers=[m.layer_idx for _, m in layers], scalars=scalars, notes=notes)


def zero_map_notes(layers: list[nn.Module]) -> list[str]:
    """Why every scalar attention ``a`` is 0 (the page would be uniformly white)."""
    if not any(layer.config.vkt_terms for layer in layers):
        return ["Every a is 0: the VKT terms are off (vkt_terms=False), only the local attention window mixes."]
    zero_v = [
        layer.layer_idx
        for layer in layers
        if getattr(layer, "importance", None) is not None and not layer.importance.detach().any()
    ]
    if zero_v:
        return [
            f"Every a is 0: the importance vector V is 0 in VKT layers {zero_v}, so s = Q . V = 0 and a = 0. "
            "That is how conversion starts a layer (`vkt-hf convert`: the VKT part off, the model as it was); "
            "train the model (recipes/distill.py) and a moves away from 0."
        ]
    return ["Every a is 0 for this text (the importance scores s = Q . V are all 0)."]


def _color(value: float, scale: float) -> str:
    """Diverging shade: blue for negative, red for positive ``a``, white at 0."""
    x = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    r, g, b = (
        (255, int(255 * (1 - x)), int(255 * (1 - x))) if x >= 0 else (int(255 * (1 + x)), int(255 * (1 + x)), 255)
    )
    return f"rgb({r},{g},{b})"


def _row(tokens: list[str], values: torch.Tensor, scale: float) -> str:
    spans = (
        f'<span title="a = {v:.4g}" style="background:{_color(float(v), scale)}">{html.escape(t)}</span>'
        for t, v in zip(tokens, values.tolist())
    )
    return "".join(spans)


def render_html(imap: ImportanceMap, title: str = "VKT importance map") -> str:
    """A standalone HTML page: the average over layers and heads, then each layer and head."""
    scale = float(imap.scalars.abs().max()) or 1.0
    mean_scale = float(imap.mean().abs().max()) or 1.0
    legend = "".join(
        f'<span style="background:{_color(v * scale, scale)};padding:0 8px">{v * scale:+.3g}</span>'
        for v in (-1, -0.5, 0, 0.5, 1)
    )
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}"
        " .t{font-family:monospace;white-space:pre-wrap;line-height:1.8}</style>",
        f"<h1>{html.escape(title)}</h1>",
        *(f"<p style='background:#fff3cd;padding:6px'><b>Note.</b> {html.escape(n)}</p>" for n in imap.notes),
        "<p>Each token is shaded by its scalar attention <i>a</i> (hover for the value): red positive, "
        f"blue negative, white 0. Legend (per-layer rows): {legend}</p>",
        f"<h2>Average over {len(imap.layers)} VKT layers and {imap.scalars.shape[1]} heads "
        f"(scale ±{mean_scale:.3g})</h2>",
        f"<div class='t'>{_row(imap.tokens, imap.mean(), mean_scale)}</div>",
    ]
    for li, layer in enumerate(imap.layers):
        parts.append(f"<h2>Layer {layer}</h2>")
        parts.append(f"<p>mean of heads</p><div class='t'>{_row(imap.tokens, imap.scalars[li].mean(0), scale)}</div>")
        for h in range(imap.scalars.shape[1]):
            parts.append(f"<p>head {h}</p><div class='t'>{_row(imap.tokens, imap.scalars[li, h], scale)}</div>")
    return "\n".join(parts)


def render_png(imap: ImportanceMap, path: str | Path, max_tokens: int = 120) -> Path:
    """A heatmap of ``a`` (rows: layer/head, columns: tokens) above the per-token average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_tokens, len(imap.tokens))
    layers, heads = imap.scalars.shape[:2]
    grid = imap.scalars[:, :, :n].reshape(layers * heads, n).numpy()
    scale = float(abs(grid).max()) or 1.0
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(8, n * 0.18), 2 + 0.25 * layers * heads), height_ratios=[layers * heads, 2]
    )
    image = top.imshow(grid, cmap="coolwarm", vmin=-scale, vmax=scale, aspect="auto", interpolation="nearest")
    top.set_yticks(range(layers * heads), [f"L{imap.layers[i // heads]} h{i % heads}" for i in range(layers * heads)])
    top.set_xticks([])
    top.set_title("scalar attention a per VKT layer and head")
    fig.colorbar(image, ax=top, label="a")
    mean = imap.mean()[:n].numpy()[None]
    mean_scale = float(abs(mean).max()) or 1.0
    bottom.imshow(mean, cmap="coolwarm", vmin=-mean_scale, vmax=mean_scale, aspect="auto")
    bottom.set_yticks([0], ["mean"])
    bottom.set_xticks(range(n), [t.replace("\n", "⏎") for t in imap.tokens[:n]], rotation=90, fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
