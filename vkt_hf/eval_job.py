"""One evaluation job (``recipes/eval.py``): :class:`EvalConfig` and :func:`evaluate_model`.

Runs the chosen tasks of :mod:`vkt_hf.evaluation` on a model's held-out documents -- perplexity,
perplexity by position, streaming perplexity of a whole book, passkey retrieval and generation
samples -- and writes ``results.json`` and PNG plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from . import evaluation as ev
from .config_loading import ConfigError, check_local, write_text_atomic
from .data import (
    PackedDataset,
    bits_per_byte,
    bytes_per_token,
    get_tokenizer,
    load_documents,
    pack_documents,
    split_documents,
    tokenize_documents,
)

TASKS = ("perplexity", "positions", "streaming", "passkey", "samples")
DEFAULT_PROMPTS = ["It is a truth universally acknowledged", "To be, or not to be", "In the beginning"]


@dataclass
class EvalConfig:
    """What to evaluate and how (every field is a flag of ``recipes/eval.py``)."""

    run_dir: str | None = None  # a training run: model, data and held-out documents from its run.json
    model: str | None = None
    tokenizer: str | None = None  # default: the model's
    data: str | None = None
    val_documents: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    seed: int = 0
    out_dir: str | None = None
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    seq_len: int = 256  # perplexity over packed sequences of this length
    eval_batches: int = 32
    batch_size: int = 8
    position_context: int = 1024
    position_buckets: int = 8
    position_segments: int = 8
    stream_document: str | None = None  # default: the longest held-out document
    stream_chunk: int = 1024
    stream_max_tokens: int | None = None  # None: the whole document
    passkey_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    passkey_trials: int = 2
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = 64
    num_threads: int | None = None


def resolve(cfg: EvalConfig) -> EvalConfig:
    """Fill model / data / held-out documents / output folder from ``run_dir`` where not given."""
    if cfg.run_dir:
        run_json = Path(cfg.run_dir) / "run.json"
        if not run_json.is_file():
            raise ConfigError(f"--run_dir {cfg.run_dir}: no run.json there (is it a finished training run?)")
        run = json.loads(run_json.read_text())
        cfg.model = cfg.model or str(Path(cfg.run_dir) / "model")
        cfg.data = cfg.data or run["data"]["source"]
        cfg.val_documents = cfg.val_documents or run["data"]["val_documents"]
        cfg.out_dir = cfg.out_dir or str(Path(cfg.run_dir) / "eval")
    if not cfg.model or not cfg.data:
        raise ConfigError("give --run_dir, or --model and --data")
    cfg.out_dir = cfg.out_dir or "runs/eval"
    bad = sorted(set(cfg.tasks) - set(TASKS))
    if bad:
        raise ConfigError(f"unknown tasks {bad}; choose from {TASKS}")
    check_local(cfg.model, "--model", " (expected a saved model folder or a Hub id org/name)")
    check_local(cfg.data, "--data", " (fetch the corpus with `python scripts/fetch_corpus.py`)")
    check_local(cfg.tokenizer, "--tokenizer")
    return cfg


@dataclass
class Held:
    """The held-out documents of a job: ``docs`` (a ``Dataset``), ``tokens`` per document, the tokenizer."""

    docs: Any
    tokens: list[list[int]]
    tokenizer: Any


def task_perplexity(cfg: EvalConfig, model: torch.nn.Module, held: Held) -> dict[str, Any]:
    packed = PackedDataset(pack_documents(held.tokens, cfg.seq_len, pad_token_id=held.tokenizer.pad_token_id or 0))
    res = ev.perplexity(model, packed, batch_size=cfg.batch_size, max_batches=cfg.eval_batches)
    bpb = bits_per_byte(res["loss"], bytes_per_token(held.docs, held.tokens))
    return {**res, "seq_len": cfg.seq_len, "bits_per_byte": bpb}


def task_positions(cfg: EvalConfig, model: torch.nn.Module, held: Held) -> dict[str, Any]:
    return ev.position_bucket_perplexity(
        model,
        held.tokens,
        cfg.position_context,
        num_buckets=cfg.position_buckets,
        max_segments=cfg.position_segments,
        batch_size=max(1, cfg.batch_size // 4),
        chunk_size=cfg.stream_chunk,
    )


def task_streaming(cfg: EvalConfig, model: torch.nn.Module, held: Held) -> dict[str, Any]:
    names = list(held.docs["name"])
    if cfg.stream_document:
        index = names.index(cfg.stream_document)
    else:
        index = max(range(len(names)), key=lambda i: len(held.tokens[i]))
    res = ev.streaming_perplexity(model, held.tokens[index], cfg.stream_chunk, cfg.stream_max_tokens)
    return {"document": names[index], "document_tokens": len(held.tokens[index]), **res}


def task_passkey(cfg: EvalConfig, model: torch.nn.Module, held: Held) -> dict[str, Any]:
    return ev.passkey_retrieval(
        model, held.tokenizer, cfg.passkey_lengths, cfg.passkey_depths, cfg.passkey_trials, seed=cfg.seed
    )


def task_samples(cfg: EvalConfig, model: torch.nn.Module, held: Held) -> list[dict[str, str]]:
    return ev.generation_samples(model, held.tokenizer, cfg.prompts, cfg.max_new_tokens, seed=cfg.seed)


# task -> (key in results.json, function, plot function and file)
TASK_RUNNERS = {
    "perplexity": ("perplexity", task_perplexity, None),
    "positions": ("position_buckets", task_positions, (ev.plot_position_buckets, "positions.png")),
    "streaming": ("streaming", task_streaming, (ev.plot_streaming, "streaming.png")),
    "passkey": ("passkey", task_passkey, (ev.plot_passkey, "passkey.png")),
    "samples": ("samples", task_samples, None),
}


def evaluate_model(cfg: EvalConfig, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Run the chosen tasks; write ``results.json`` and plots to ``cfg.out_dir``; return the results."""
    cfg = resolve(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        except OSError as err:  # not a model folder, not on the Hub: the first line says which
            raise ConfigError(f"cannot load a model from {cfg.model!r}: {str(err).splitlines()[0]}") from err
    try:
        tokenizer = get_tokenizer(cfg.tokenizer or cfg.model)
    except OSError as err:
        raise ConfigError(f"no tokenizer in {cfg.tokenizer or cfg.model!r} (give --tokenizer): {err}") from err
    model.eval()
    docs = load_documents(cfg.data)
    _, val_docs = split_documents(
        docs, val_documents=cfg.val_documents or None, val_fraction=cfg.val_fraction, seed=cfg.seed
    )
    held = Held(val_docs, tokenize_documents(val_docs, tokenizer), tokenizer)
    results: dict[str, Any] = {
        "model": cfg.model,
        "data": cfg.data,
        "val_documents": list(val_docs["name"]),
        "config": asdict(cfg),
        "timings_s": {},
    }
    label = Path(cfg.run_dir).name if cfg.run_dir else Path(cfg.model).name
    for task in (t for t in TASKS if t in cfg.tasks):
        key, run, plot = TASK_RUNNERS[task]
        start = time.time()
        results[key] = run(cfg, model, held)
        results["timings_s"][key] = round(time.time() - start, 2)
        print(f"[eval] {key}: {time.time() - start:.1f}s", flush=True)
        if plot is not None:
            plot[0]({label: results[key]}, out / plot[1])
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    print(f"[eval] results: {out / 'results.json'}", flush=True)
    return results
