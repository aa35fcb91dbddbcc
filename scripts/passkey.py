#!/usr/bin/env python3
"""Passkey retrieval: can a model recall a 5-digit key it read far beyond its attention window?

Each trial hides ``The pass key is 12345. Remember it. 12345 is the pass key.`` at a random depth of
repetitive filler (between 5 % and 60 % of the way in, so the key lies at least ~0.4 x the length before
the question, far beyond a 64-token window) and ends with ``What is the pass key? The pass key is``. A
trial counts when the model's greedy prediction of every token of the key is right (teacher forced: one
forward pass, the same as greedy decoding the key). Keys and depths are seeded, so every model sees the
same prompts.

It differs from ``vkt_hf.evaluation.passkey_retrieval`` (the ``passkey`` task of ``recipes/eval.py``) on
purpose: that one generates an answer for a grid of depths that includes 1.0 (the key just before the
question, inside any window), while this one places every key beyond the window and scores it with one
forward pass, which keeps 30-layer models on a CPU affordable.

    python scripts/passkey.py --variant original all all-window half --lengths 256 1024 2048 --trials 10
    python scripts/passkey.py --model distilled=runs/main/stage2/model
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from conversion_quality import add_model_arguments, load_variant
from transformers import AutoModelForCausalLM, AutoTokenizer

INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"


def passkey_prompts(tokenizer, length: int, trials: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """``trials`` (prompt ids, key ids) pairs whose prompt has about ``length`` tokens."""
    rng = random.Random(seed * 100_003 + length)
    fill = tokenizer(FILLER, add_special_tokens=False).input_ids
    fixed = len(tokenizer(INTRO + NEEDLE.format(key=12345) + QUESTION, add_special_tokens=False).input_ids)
    repeats = max(1, (length - fixed) // len(fill))
    out = []
    for _ in range(trials):
        key = str(rng.randint(10_000, 99_999))
        before = round(repeats * rng.uniform(0.05, 0.6))
        text = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (repeats - before) + QUESTION
        out.append((tokenizer(text).input_ids, tokenizer(" " + key, add_special_tokens=False).input_ids))
    return out


@torch.no_grad()
def passkey_accuracy(model: torch.nn.Module, tokenizer, lengths: list[int], trials: int = 10) -> dict[int, float]:
    """Fraction of trials retrieved at each prompt length (see module docstring)."""
    device = next(model.parameters()).device
    accuracy = {}
    for length in lengths:
        hits = 0
        for prompt, key in passkey_prompts(tokenizer, length, trials):
            ids = torch.tensor([prompt + key], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # (len(key), V): predicts each key token
            hits += int(logits.argmax(-1).tolist() == key)
        accuracy[length] = hits / trials
    return accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 1024, 2048])
    parser.add_argument("--trials", type=int, default=10, help="passkeys per length")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not (args.src / "config.json").is_file():
        parser.error(f"{args.src} has no checkpoint; run `python scripts/fetch_smollm2.py` first")
    models: list[tuple[str, Path | None]] = [(name, None) for name in args.variant]
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path, "config.json").is_file():
            parser.error(f"--model takes NAME=DIR of a saved model, got {spec!r}")
        models.append((name, Path(path)))
    if not models:
        parser.error("give at least one --variant or --model")
    tokenizer = AutoTokenizer.from_pretrained(args.src)
    results = {}
    print("| model | " + " | ".join(f"passkey @{n}" for n in args.lengths) + " |")
    print("|---|" + "---|" * len(args.lengths))
    for name, path in models:
        model = load_variant(args.src, name) if path is None else AutoModelForCausalLM.from_pretrained(path).eval()
        results[name] = passkey_accuracy(model, tokenizer, args.lengths, args.trials)
        print(f"| {name} | " + " | ".join(f"{v:.0%}" for v in results[name].values()) + " |", flush=True)
        if args.json:
            record = {
                "trials": args.trials,
                "results": {k: {str(n): v for n, v in r.items()} for k, r in results.items()},
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
