"""Importance maps: each token shaded by its scalar attention ``a``, per layer and head.

Works on any model holding :class:`~vkt_hf.layers.VKTAttention` modules (native VKT models and
converted Llama/GPT-2 hybrids): forward hooks collect the ``a`` every VKT layer returns.

:func:`attention_shares` shows what a layer with the local attention window reads besides: the
share of each head's softmax mass on the window, the sink and the VKT global slot (a converted
checkpoint whose importance ``V`` is still 0 has ``a = 0`` everywhere, a blank importance map,
while its global slot carries weight once trained).
"""

from __future__ import annotations

import contextlib
import html
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import encode
from .evaluation import _pyplot, _save, heatmap
from .layers import vkt_layers
from .ops import functional

SHARE_PARTS = ("window", "sink", "global slot")


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


@contextlib.contextmanager
def _record_window_shares(records: list[tuple[torch.Tensor, torch.Tensor]]):
    """While active, every call of the window's softmax also records ``(sink share, global-slot share)``
    ``(B, H, N)`` of its attention mass: the same softmax run twice more, with value 1 on the sink
    (or on the slot) and 0 elsewhere."""
    original = functional.sliding_window_attention

    def probe(
        query,
        keys,
        values,
        key_mask,
        window,
        history=None,
        sink=None,
        sink_visible=None,
        scale=None,
        summary=None,
        **rest,
    ):
        out = original(query, keys, values, key_mask, window, history, sink, sink_visible, scale, summary, **rest)

        def mass(on_sink: bool, on_slot: bool) -> torch.Tensor:
            fill = {True: torch.ones_like, False: torch.zeros_like}
            past = None if history is None else (history[0], torch.zeros_like(history[1]), history[2])
            sinks = None if sink is None else (sink[0], fill[on_sink](sink[1]), sink[2])
            slot = None if summary is None else (summary[0], fill[on_slot](summary[1]))
            zeros = torch.zeros_like(values)
            return original(query, keys, zeros, key_mask, window, past, sinks, sink_visible, scale, slot)[0][..., 0]

        records.append((mass(True, False).detach(), mass(False, True).detach()))
        return out

    functional.sliding_window_attention = probe
    try:
        yield
    finally:
        functional.sliding_window_attention = original


@torch.no_grad()
def attention_shares(model: nn.Module, ids: torch.Tensor) -> dict:
    """Per VKT layer and head, the mean share of the window softmax's mass on the window, the sink and
    the VKT global slot, over the tokens of ``ids`` ``(1, N)`` that have tokens older than the window.
    A learned sink (``learned_sink=True``) is merged into the global slot, so its mass counts there.

    Returns ``{"layers": [...], "parts": SHARE_PARTS, "shares": (layers, heads, 3) tensor, "tokens": n}``.
    """
    layers = vkt_layers(model)
    records: list[tuple[torch.Tensor, torch.Tensor]] = []
    model.eval()
    with _record_window_shares(records):
        model(ids.to(next(model.parameters()).device), use_cache=False)
    if len(records) != len(layers):
        raise ValueError(f"{len(layers)} VKT layers but {len(records)} window softmaxes: every layer needs its window")
    window = max(layer.config.local_attention_window + layer.config.sink_tokens for layer in layers)
    far = slice(min(window, ids.shape[1] - 1), None)  # before that, the slot has no far tokens to stand for
    shares = []
    for sink, slot in records:
        sink, slot = sink[0, :, far].float().mean(-1).cpu(), slot[0, :, far].float().mean(-1).cpu()
        shares.append(torch.stack([1 - sink - slot, sink, slot], dim=-1))
    layer_ids = [m.layer_idx for m in layers]
    return {"layers": layer_ids, "parts": SHARE_PARTS, "shares": torch.stack(shares), "tokens": ids.shape[1]}


def render_shares_png(shares: dict, path: str | Path, title: str = "") -> Path:
    """Heatmaps (layers x heads, values in %) of the sink's and the global slot's share of attention mass."""
    plt = _pyplot()
    grid = shares["shares"] * 100
    layers, heads = grid.shape[:2]
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.1 * heads, 1.2 + 0.32 * layers))
    for ax, part in zip(axes, (1, 2)):
        top = max(1.0, float(grid[..., part].max()))
        image = heatmap(ax, grid[..., part].tolist(), 0.0, top, cmap="magma", fmt="{:.1f}")
        ax.set_xticks(range(heads), [f"h{h}" for h in range(heads)])
        ax.set_yticks(range(layers), [f"L{i}" for i in shares["layers"]])
        ax.set_title(f"% of attention on the {shares['parts'][part]}")
        fig.colorbar(image, ax=ax, fraction=0.05, label="%")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
