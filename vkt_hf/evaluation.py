"""Evaluation of causal LMs (VKT, converted hybrids, softmax baselines) on long documents.

* :func:`perplexity` -- loss / perplexity over packed sequences (``exp`` of the mean NLL of
  every labelled token).
* :func:`position_bucket_perplexity` -- perplexity by token position over long segments
  (like fla's PG-19 evaluation): does the model use, or get lost in, long context?
* :func:`perplexity_at` -- perplexity at several segment lengths of one text (each segment
  read from its start); :func:`bucket_perplexity` groups per-position NLL into buckets.
* :func:`decode_benchmark` -- cache bytes and ms/token of greedy decoding at growing context.
* :func:`streaming_perplexity` -- one whole document through the model chunk by chunk,
  carrying the cache, in bounded memory; reports the largest cache size seen.
* :func:`passkey_retrieval` -- a random key hidden at several depths of filler text at
  several context lengths; exact-match accuracy of the greedy answer.
* :func:`generation_samples` -- sampled continuations of a few prompts.
* ``plot_*`` -- matplotlib PNGs of the above.

Every function works on any ``transformers`` causal LM; chunked runs pass the cache under the
name this transformers version uses (``cache`` from 5.24, ``past_key_values`` before).

``evaluate`` is not used: its ``perplexity`` metric is a Hub-hosted script (a fetch at run
time) that re-runs the model with its own padding and batching, so it can neither stream a
book through a VKT cache nor score positions; the computations here are short and are
checked against a direct computation in ``tests/test_evaluation.py``.
"""

from __future__ import annotations

import copy
import math
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .cache import VKTCache, layer_nbytes
from .data import IGNORE_INDEX, encode
from .utils import CACHE_FIELD

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there. "
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a cache: VKT states (``nbytes()``) plus keys/values of softmax layers."""
    return sum(layer_nbytes(layer) for layer in getattr(cache, "layers", []))


def new_cache(model: torch.nn.Module) -> Any:
    """An empty cache to carry through chunked calls: a ``VKTCache`` for a converted hybrid (the base
    model would make a ``DynamicCache``, which cannot tell its length once every layer holds a VKT
    state), ``None`` otherwise (the model makes its own)."""
    config = model.config
    if getattr(config, "vkt_layers", None) is None:
        return None
    converted = set(config.vkt_layers)
    return VKTCache(["vkt" if i in converted else "softmax" for i in range(config.num_hidden_layers)])


def _chunk_nll(logits: torch.Tensor, chunk: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """NLL ``(B, n)`` of one chunk read after a cache: ``previous`` (the last logits of the chunk
    before, or ``None`` at the start) predicts the chunk's first token."""
    logits, targets = logits.float(), chunk[:, 1:]
    if previous is not None:
        logits, targets = torch.cat([previous, logits], dim=1), chunk
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")


@torch.no_grad()
def sequence_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    stats: dict[str, int] | None = None,
) -> torch.Tensor:
    """Per-token NLL (nats) of predicting token ``t+1`` from tokens ``<= t``: ``(B, N-1)`` float32.

    With ``chunk_size`` the sequence goes through in chunks carrying the cache (the same
    numbers as one pass, in memory bounded by the chunk and the cache). ``stats`` (a dict)
    receives ``max_cache_bytes``.
    """
    device = _device(model)
    input_ids = input_ids.to(device)
    length = input_ids.shape[1]
    if chunk_size is None or chunk_size >= length:
        mask = None if attention_mask is None else attention_mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    if attention_mask is not None:
        raise ValueError("chunked NLL is for unpadded sequences; pass attention_mask=None")
    cache, previous, pieces = new_cache(model), None, []
    for start in range(0, length, chunk_size):
        chunk = input_ids[:, start : start + chunk_size]
        out = model(input_ids=chunk, use_cache=True, **{CACHE_FIELD: cache})
        cache = getattr(out, CACHE_FIELD)
        pieces.append(_chunk_nll(out.logits, chunk, previous))
        previous = out.logits[:, -1:].float()
        if stats is not None:
            stats["max_cache_bytes"] = max(stats.get("max_cache_bytes", 0), cache_nbytes(cache))
    return torch.cat(pieces, dim=1)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 8, max_batches: int | None = None
) -> dict[str, float]:
    """Mean NLL and perplexity over the labelled tokens of packed rows (``input_ids``, ``labels``,
    ``attention_mask``). Returns ``loss`` (nats/token), ``ppl`` and ``tokens``."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        nll = sequence_nll(model, batch["input_ids"], batch["attention_mask"])
        keep = batch["labels"][:, 1:].to(nll.device) != IGNORE_INDEX
        total += float(nll[keep].double().sum())
        count += int(keep.sum())
    model.train(was_training)
    loss = total / max(1, count)
    return {"loss": loss, "ppl": math.exp(min(loss, 80.0)), "tokens": count}


def _segments(token_docs: Sequence[Sequence[int]], length: int, max_segments: int) -> torch.Tensor:
    """Up to ``max_segments`` non-overlapping ``length``-token segments, taken round-robin over documents."""
    per_doc = [[list(doc[s : s + length]) for s in range(0, len(doc) - length + 1, length)] for doc in token_docs]
    out: list[list[int]] = []
    for k in range(max((len(p) for p in per_doc), default=0)):
        for pieces in per_doc:
            if k < len(pieces) and len(out) < max_segments:
                out.append(pieces[k])
    if not out:
        raise ValueError(f"no document has {length} tokens")
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def position_bucket_perplexity(
    model: torch.nn.Module,
    token_docs: Sequence[Sequence[int]],
    context_length: int,
    num_buckets: int = 8,
    max_segments: int = 8,
    batch_size: int = 4,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """Perplexity by target position over ``context_length``-token segments of long documents.

    Position ``p`` (1 ... ``context_length - 1``) is the token predicted from ``p`` tokens of
    context; the positions are grouped into ``num_buckets`` equal buckets.
    """
    model.eval()
    segments = _segments(token_docs, context_length, max_segments)
    sums = torch.zeros(context_length - 1, dtype=torch.float64)
    for start in range(0, len(segments), batch_size):
        nll = sequence_nll(model, segments[start : start + batch_size], chunk_size=chunk_size)
        sums += nll.double().sum(0).cpu()
    return {"segments": len(segments), **bucket_perplexity(sums / len(segments), num_buckets)}


def bucket_perplexity(per_position: torch.Tensor, num_buckets: int = 8) -> dict[str, Any]:
    """Perplexity by position bucket from the mean NLL at each position ``(context_length - 1,)``
    (entry ``p - 1``: the token predicted from ``p`` tokens of context)."""
    per_position = per_position.double().cpu()
    context_length = len(per_position) + 1
    edges = torch.linspace(1, context_length, num_buckets + 1).round().long().tolist()
    buckets = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        loss = float(per_position[lo - 1 : hi - 1].mean())
        buckets.append({"start": lo, "end": hi, "loss": loss, "ppl": math.exp(min(loss, 80.0))})
    overall = float(per_position.mean())
    return {"context_length": context_length, "loss": overall, "ppl": math.exp(min(overall, 80.0)), "buckets": buckets}


@torch.no_grad()
def perplexity_at(
    model: torch.nn.Module,
    ids: torch.Tensor,
    lengths: Sequence[int],
    rows: dict[int, torch.Tensor] | None = None,
) -> dict[int, float]:
    """Perplexity at each of ``lengths`` on one text ``ids`` ``(1, N)``.

    Perplexity at ``L`` tokens is ``exp`` of the mean NLL over the non-overlapping ``L``-token
    segments of the first ``N // L * L`` tokens, each segment read from its start (so at a long
    ``L`` most positions see far more context than a local window). The model is causal, so an
    ``L``-segment that starts where a longer segment starts is that segment's prefix: its NLL is
    read off the longer one instead of being computed again.

    ``rows``: ``{start: (n,) NLL of the segment read from token start}``, segments already
    computed (e.g. by :func:`decode_benchmark`); filled with the ones computed here.
    """
    rows = {} if rows is None else rows
    total = ids.shape[1]
    out = {}
    for length in sorted(lengths, reverse=True):
        if total < length:
            raise ValueError(f"the text has {total} tokens, fewer than {length}")
        nll = []
        for start in range(0, total // length * length, length):
            if rows.get(start) is None or len(rows[start]) < length - 1:
                rows[start] = sequence_nll(model, ids[:, start : start + length])[0].cpu()
            nll.append(rows[start][: length - 1])
        out[length] = math.exp(min(float(torch.cat(nll).double().mean()), 80.0))
    return out


@torch.no_grad()
def decode_benchmark(
    model: torch.nn.Module, ids: torch.Tensor, contexts: Sequence[int], steps: int = 16
) -> dict[str, Any]:
    """Decode cost at growing context: ``ids`` ``(1, N)`` is read chunk by chunk up to each of
    ``contexts`` (carrying the cache), then ``steps`` greedy tokens are decoded from a copy of the
    cache. Per context: the cache's bytes, the prefill time of the chunk, and ms/token (median
    of the steps after the first).

    Returns ``{"rows": [...], "nll": (max(contexts) - 1,)}``: the NLL of the text read, the
    same as one pass over it (see :func:`sequence_nll`).
    """
    model.eval()
    ids = ids.to(_device(model))
    cache, previous, pieces, rows, start = new_cache(model), None, [], [], 0
    for context in sorted(contexts):
        chunk = ids[:, start:context]
        began = time.perf_counter()
        out = model(input_ids=chunk, use_cache=True, **{CACHE_FIELD: cache})
        prefill_s = time.perf_counter() - began
        cache = getattr(out, CACHE_FIELD)
        pieces.append(_chunk_nll(out.logits, chunk, previous)[0].cpu())
        previous = out.logits[:, -1:].float()
        fork, token, times = copy.deepcopy(cache), out.logits[:, -1:].argmax(-1), []
        for _ in range(steps):
            began = time.perf_counter()
            step = model(input_ids=token, use_cache=True, **{CACHE_FIELD: fork})
            times.append(time.perf_counter() - began)
            fork, token = getattr(step, CACHE_FIELD), step.logits[:, -1:].argmax(-1)
        timed = sorted(times[1:] or times)
        rows.append(
            {
                "context": context,
                "cache_bytes": cache_nbytes(cache),
                "cache_bytes_after_decode": cache_nbytes(fork),
                "prefill_s": round(prefill_s, 3),
                "ms_per_token": round(1000 * timed[len(timed) // 2], 2),
            }
        )
        start = context
    return {"steps": steps, "rows": rows, "nll": torch.cat(pieces)}


@torch.no_grad()
def streaming_perplexity(
    model: torch.nn.Module,
    tokens: Sequence[int],
    chunk_size: int = 1024,
    max_tokens: int | None = None,
    curve_points: int = 16,
) -> dict[str, Any]:
    """A whole document through the model ``chunk_size`` tokens at a time, carrying the cache.

    Returns ``loss``/``ppl`` over all ``tokens - 1`` predictions, ``max_cache_bytes`` (constant
    in the length for VKT layers, growing for softmax layers) and ``curve``: cumulative
    perplexity at ``curve_points`` points along the document.
    """
    model.eval()
    ids = torch.tensor(list(tokens[:max_tokens] if max_tokens else tokens), dtype=torch.long)[None]
    stats: dict[str, int] = {}
    nll = sequence_nll(model, ids, chunk_size=chunk_size, stats=stats)[0].double().cpu()
    cumulative = nll.cumsum(0) / torch.arange(1, len(nll) + 1)
    first = max(1, len(nll) // max(1, curve_points))  # the first point averages a real stretch of text, not 1 token
    points = sorted({int(x) for x in torch.linspace(first, len(nll), min(curve_points, len(nll))).tolist()})
    loss = float(nll.mean())
    return {
        "tokens": int(ids.shape[1]),
        "chunk_size": chunk_size,
        "loss": loss,
        "ppl": math.exp(min(loss, 80.0)),
        "max_cache_bytes": stats.get("max_cache_bytes", 0),
        "curve": [{"tokens": p + 1, "ppl": math.exp(min(float(cumulative[p - 1]), 80.0))} for p in points],
    }


def passkey_prompt(tokenizer: Any, context_length: int, depth: float, key: str) -> list[int]:
    """Token ids of a passkey prompt of about ``context_length`` tokens with the key at ``depth`` (0 ... 1)."""
    intro, filler = encode(tokenizer, PASSKEY_INTRO), encode(tokenizer, PASSKEY_FILLER)
    needle, question = encode(tokenizer, PASSKEY_NEEDLE.format(key=key)), encode(tokenizer, PASSKEY_QUESTION)
    room = max(0, context_length - len(intro) - len(needle) - len(question))
    hay = (filler * (room // len(filler) + 1))[:room]  # exactly `room` filler tokens
    cut = min(room, round(room * depth / len(filler)) * len(filler))  # the needle goes between two fillers
    return intro + hay[:cut] + needle + hay[cut:] + question


@torch.no_grad()
def passkey_retrieval(
    model: torch.nn.Module,
    tokenizer: Any,
    context_lengths: Sequence[int] = (256, 512, 1024),
    depths: Sequence[float] = (0.0, 0.5, 1.0),
    trials: int = 3,
    digits: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy passkey retrieval per (context length, depth).

    The answer counts when the first run of digits the model writes equals the key.
    """
    model.eval()
    rng = random.Random(seed)
    device = _device(model)
    answer_tokens = len(encode(tokenizer, " " + "9" * digits)) + 2
    rows = []
    for length in context_lengths:
        for depth in depths:
            hits = 0
            for _ in range(trials):
                key = str(rng.randrange(10 ** (digits - 1), 10**digits))
                ids = torch.tensor([passkey_prompt(tokenizer, length, depth, key)], device=device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=answer_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                found = re.search(r"\d+", text)
                hits += int(found is not None and found.group() == key)
            rows.append({"context_length": length, "depth": depth, "accuracy": hits / trials, "trials": trials})
    return {"results": rows, "accuracy": sum(r["accuracy"] for r in rows) / max(1, len(rows))}


@torch.no_grad()
def generation_samples(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
    do_sample: bool = True,
    repetition_penalty: float = 1.0,
) -> list[dict[str, str]]:
    """Sampled continuations (fixed seed) of each prompt; greedy ones with ``do_sample=False``
    (``repetition_penalty`` > 1 keeps a small model's greedy text from looping)."""
    model.eval()
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k} if do_sample else {"do_sample": False}
    samples = []
    for prompt in prompts:
        ids = torch.tensor([encode(tokenizer, prompt)], device=_device(model))
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            repetition_penalty=repetition_penalty,
            **sampling,
        )
        samples.append(
            {"prompt": prompt, "completion": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)}
        )
    return samples


# --- plots ----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, tight: bool = True) -> Path:
    """Write a figure as PNG and close it; the saved area grows to every label (none is clipped)."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.1)
    _pyplot().close(fig)
    return Path(path)


def heatmap(ax, grid: Any, vmin: float, vmax: float, cmap: str = "viridis", fmt: str = "{:.2f}", max_cells: int = 400):
    """``imshow`` of ``grid`` (rows x columns) with each cell's value written in it when there are at most
    ``max_cells`` cells (in black or white, whichever reads on the cell's shade). Returns the image."""
    plt = _pyplot()
    values = [[float(v) for v in row] for row in grid]
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto", interpolation="nearest")
    if sum(len(row) for row in values) <= max_cells:
        colormap, span = plt.get_cmap(cmap), (vmax - vmin) or 1.0
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                r, g, b, _ = colormap(min(1.0, max(0.0, (v - vmin) / span)))
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, fmt.format(v), ha="center", va="center", color=ink, fontsize=8)
    return image


def plot_position_buckets(
    results: dict[str, dict[str, Any]], path: str | Path, marks: dict[str, int] | None = None, title: str = ""
) -> Path:
    """Perplexity by position bucket, one line per model (``{model: position_bucket_perplexity(...)}``);
    ``marks``: ``{label: position}`` drawn as vertical lines (e.g. the training length)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, res in results.items():
        mids = [(b["start"] + b["end"]) / 2 for b in res["buckets"]]
        ax.plot(mids, [b["ppl"] for b in res["buckets"]], marker="o", label=name)
    for (label, position), style in zip((marks or {}).items(), (":", "--", "-.")):
        ax.axvline(position, color="grey", linestyle=style, label=label)
    ax.set(xlabel="token position", ylabel="perplexity", title=title or "Perplexity by position")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)  # beside the axes: never over a line
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_decode(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Decode memory and ms/token at growing context, one line per model (``{model: decode_benchmark(...)}``)."""
    plt = _pyplot()
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for name, res in results.items():
        contexts = [r["context"] for r in res["rows"]]
        mem.plot(contexts, [r["cache_bytes"] / 2**20 for r in res["rows"]], marker="o", label=name)
        speed.plot(contexts, [r["ms_per_token"] for r in res["rows"]], marker="o", label=name)
    for ax in (mem, speed):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{c:,}" for c in contexts])
        ax.grid(alpha=0.3)
        ax.legend()
    mem.set(xlabel="context (tokens)", ylabel="cache / state (MiB)", title="Decoding memory", ylim=(0, None))
    speed.set(xlabel="context (tokens)", ylabel="ms per token", title="Greedy decode speed", ylim=(0, None))
    return _save(fig, path)


def plot_streaming(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Cumulative perplexity along a streamed document, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results.items():
        ax.plot([p["tokens"] for p in res["curve"]], [p["ppl"] for p in res["curve"]], marker=".", label=name)
    ax.set(xlabel="tokens read", ylabel="cumulative perplexity", title="Streaming perplexity", yscale="log")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_passkey(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Passkey accuracy heat maps (context length x depth), one panel per model."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        lengths = sorted({r["context_length"] for r in res["results"]})
        depths = sorted({r["depth"] for r in res["results"]})
        grid = [[0.0] * len(lengths) for _ in depths]
        for r in res["results"]:
            grid[depths.index(r["depth"])][lengths.index(r["context_length"])] = r["accuracy"]
        image = heatmap(ax, grid, 0.0, 1.0)
        ax.set(xticks=range(len(lengths)), xticklabels=lengths, yticks=range(len(depths)), yticklabels=depths)
        ax.set(xlabel="context length (tokens)", ylabel="depth of the key", title=f"{name}: passkey accuracy")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    return _save(fig, path, tight=False)


def plot_curves(
    curves: dict[str, list[tuple[float, float]]], path: str | Path, xlabel: str, ylabel: str, title: str
) -> Path:
    """Generic line plot of ``{label: [(x, y), ...]}`` (e.g. training loss curves)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)
