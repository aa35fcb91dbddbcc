#!/usr/bin/env python3
"""Evaluate a causal LM on long documents: perplexity, perplexity by position, streaming
perplexity of a whole book, passkey retrieval and generation samples.

    python recipes/eval.py --run_dir runs/main/vkt                  # a training run: its model + held-out docs
    python recipes/eval.py --model path/to/model --data .cache/vkt-hf/corpus \\
        --val_documents '[austen_persuasion]' --out_dir runs/eval/x

Writes ``<out_dir>/results.json`` (``<run_dir>/eval/`` by default) and PNG plots
(``positions.png``, ``streaming.png``, ``passkey.png``). All computations are in
:mod:`vkt_hf.evaluation`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

import vkt_hf  # noqa: F401  (registers the VKT model classes with the Auto* factories)
from vkt_hf import evaluation as ev
from vkt_hf.data import (
    PackedDataset,
    bits_per_byte,
    bytes_per_token,
    get_tokenizer,
    load_documents,
    pack_documents,
    split_documents,
    tokenize_documents,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _config import load_dataclass  # noqa: E402

TASKS = ("perplexity", "positions", "streaming", "passkey", "samples")
DEFAULT_PROMPTS = ["It is a truth universally acknowledged", "To be, or not to be", "In the beginning"]


@dataclass
class EvalConfig:
    """What to evaluate and how (every field is a flag)."""

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
        run = json.loads((Path(cfg.run_dir) / "run.json").read_text())
        cfg.model = cfg.model or str(Path(cfg.run_dir) / "model")
        cfg.data = cfg.data or run["data"]["source"]
        cfg.val_documents = cfg.val_documents or run["data"]["val_documents"]
        cfg.out_dir = cfg.out_dir or str(Path(cfg.run_dir) / "eval")
    if not cfg.model or not cfg.data:
        raise ValueError("give --run_dir, or --model and --data")
    cfg.out_dir = cfg.out_dir or "runs/eval"
    bad = sorted(set(cfg.tasks) - set(TASKS))
    if bad:
        raise ValueError(f"unknown tasks {bad}; choose from {TASKS}")
    return cfg


def evaluate_model(cfg: EvalConfig, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Run the chosen tasks; write ``results.json`` and plots to ``cfg.out_dir``; return the results."""
    cfg = resolve(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = get_tokenizer(cfg.tokenizer or cfg.model)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    model.eval()
    docs = load_documents(cfg.data)
    _, val_docs = split_documents(
        docs, val_documents=cfg.val_documents or None, val_fraction=cfg.val_fraction, seed=cfg.seed
    )
    val_tokens = tokenize_documents(val_docs, tokenizer)
    results: dict[str, Any] = {
        "model": cfg.model,
        "data": cfg.data,
        "val_documents": list(val_docs["name"]),
        "config": asdict(cfg),
        "timings_s": {},
    }

    def timed(name: str, fn):
        start = time.time()
        results[name] = fn()
        results["timings_s"][name] = round(time.time() - start, 2)
        print(f"[eval] {name}: {time.time() - start:.1f}s", flush=True)

    if "perplexity" in cfg.tasks:
        packed = PackedDataset(pack_documents(val_tokens, cfg.seq_len, pad_token_id=tokenizer.pad_token_id or 0))
        bpt = bytes_per_token(val_docs, val_tokens)

        def ppl() -> dict[str, Any]:
            res = ev.perplexity(model, packed, batch_size=cfg.batch_size, max_batches=cfg.eval_batches)
            return {**res, "seq_len": cfg.seq_len, "bits_per_byte": bits_per_byte(res["loss"], bpt)}

        timed("perplexity", ppl)
    if "positions" in cfg.tasks:
        timed(
            "position_buckets",
            lambda: ev.position_bucket_perplexity(
                model,
                val_tokens,
                cfg.position_context,
                num_buckets=cfg.position_buckets,
                max_segments=cfg.position_segments,
                batch_size=max(1, cfg.batch_size // 4),
                chunk_size=cfg.stream_chunk,
            ),
        )
    if "streaming" in cfg.tasks:
        names = list(val_docs["name"])
        index = (
            names.index(cfg.stream_document)
            if cfg.stream_document
            else max(range(len(names)), key=lambda i: len(val_tokens[i]))
        )

        def stream() -> dict[str, Any]:
            res = ev.streaming_perplexity(model, val_tokens[index], cfg.stream_chunk, cfg.stream_max_tokens)
            return {"document": names[index], "document_tokens": len(val_tokens[index]), **res}

        timed("streaming", stream)
    if "passkey" in cfg.tasks:
        timed(
            "passkey",
            lambda: ev.passkey_retrieval(
                model, tokenizer, cfg.passkey_lengths, cfg.passkey_depths, cfg.passkey_trials, seed=cfg.seed
            ),
        )
    if "samples" in cfg.tasks:
        timed(
            "samples", lambda: ev.generation_samples(model, tokenizer, cfg.prompts, cfg.max_new_tokens, seed=cfg.seed)
        )

    label = Path(cfg.run_dir).name if cfg.run_dir else Path(cfg.model).name
    if "position_buckets" in results:
        ev.plot_position_buckets({label: results["position_buckets"]}, out / "positions.png")
    if "streaming" in results:
        ev.plot_streaming({label: results["streaming"]}, out / "streaming.png")
    if "passkey" in results:
        ev.plot_passkey({label: results["passkey"]}, out / "passkey.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"[eval] results: {out / 'results.json'}", flush=True)
    return results


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    """``EvalConfig`` from ``--config`` YAML, then flags."""
    return load_dataclass(EvalConfig, argv, __doc__)


def main(argv: list[str] | None = None) -> int:
    evaluate_model(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
