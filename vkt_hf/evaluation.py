"""Evaluation of causal LMs (VKT, converted hybrids, softmax baselines) on long documents.

* :func:`perplexity` -- loss / perplexity over packed sequences (``exp`` of the mean NLL of
  every labelled token).
* :func:`position_bucket_perplexity` -- perplexity by token position over long segments
  (like fla's PG-19 evaluation): does the model use, or get lost in, long context?
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

import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .cache import layer_nbytes
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
    cache, previous, pieces = None, None, []
    for start in range(0, length, chunk_size):
        chunk = input_ids[:, start : start + chunk_size]
        out = model(input_ids=chunk, use_cache=True, **{CACHE_FIELD: cache})
        cache = getattr(out, CACHE_FIELD)
        logits, targets = out.logits.float(), chunk[:, 1:]
        if previous is not None:  # the last position of the previous chunk predicts this chunk's first token
            logits, targets = torch.cat([previous, logits], dim=1), chunk
        pieces.append(F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none"))
        previous = logits[:, -1:]
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
    per_position = sums / len(segments)
    edges = torch.linspace(1, context_length, num_buckets + 1).round().long().tolist()
    buckets = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        loss = float(per_position[lo - 1 : hi - 1].mean())
        buckets.append({"start": lo, "end": hi, "loss": loss, "ppl": math.exp(min(loss, 80.0))})
    overall = float(per_position.mean())
    return {
        "context_length": context_length,
        "segments": len(segments),
        "loss": overall,
        "ppl": math.exp(min(overall, 80.0)),
        "buckets": buckets,
    }


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
    points = sorted({int(x) for x in torch.linspace(1, len(nll), min(curve_points, len(nll))).tolist()})
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
) -> list[dict[str, str]]:
    """Sampled continuations (fixed seed) of each prompt."""
    model.eval()
    torch.manual_seed(seed)
    samples = []
    for prompt in prompts:
        ids = torch.tensor([encode(tokenizer, prompt)], device=_device(model))
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            pad_token_id=tokenizer.pad_token_id,
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
    """Write a figure as PNG and close it."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return Path(path)


def plot_position_buckets(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Perplexity by position bucket, one line per model (``{model: position_bucket_perplexity(...)}``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results.items():
        mids = [(b["start"] + b["end"]) / 2 for b in res["buckets"]]
        ax.plot(mids, [b["ppl"] for b in res["buckets"]], marker="o", label=name)
    ax.set(xlabel="token position", ylabel="perplexity", title="Perplexity by position")
    ax.legend()
    ax.grid(alpha=0.3)
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
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set(xticks=range(len(lengths)), xticklabels=lengths, yticks=range(len(depths)), yticklabels=depths)
        ax.set(xlabel="context length (tokens)", ylabel="depth", title=name)
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
