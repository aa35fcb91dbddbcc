#!/usr/bin/env python3
"""SmolLM2-135M-Instruct perplexity on a held-out passage: original vs. VKT conversions (no training).

Loads the checkpoint made by ``scripts/fetch_smollm2.py``, converts it in memory (all layers,
then the even layers = half of them) and prints the perplexity of each on the same text
(``tests/fixtures/passage.txt``: the opening of chapter 34 of *Pride and Prejudice*). Saved
conversions (``vkt-hf convert ...``) can be added with ``--saved DIR``.

Example:
    python scripts/smollm2_perplexity.py
    python scripts/smollm2_perplexity.py --no-window    # also the conversion without the local window
    python scripts/smollm2_perplexity.py --saved .cache/vkt-hf/smollm2-vkt-half
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import vkt_hf

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SRC = REPO / ".cache/vkt-hf/smollm2-135m-instruct"
DEFAULT_TEXT = REPO / "tests/fixtures/passage.txt"


@torch.no_grad()
def perplexity(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """``exp`` of the mean next-token loss of ``model`` on ``input_ids`` ``(1, N)``."""
    return math.exp(model(input_ids, labels=input_ids).loss.item())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="SmolLM2 checkpoint (default: %(default)s)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="held-out text (default: %(default)s)")
    parser.add_argument("--saved", type=Path, action="append", default=[], help="also evaluate a saved conversion")
    parser.add_argument(
        "--no-window", action="store_true", help="also convert without the local attention window (the old conversion)"
    )
    args = parser.parse_args(argv)
    if not (args.src / "config.json").is_file():
        parser.error(f"{args.src} has no checkpoint; run `python scripts/fetch_smollm2.py` first")

    tokenizer = AutoTokenizer.from_pretrained(args.src)
    input_ids = tokenizer(args.text.read_text(), return_tensors="pt").input_ids
    print(f"text: {args.text.name}, {input_ids.shape[1]} tokens")

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32).eval()

    rows = [("original", perplexity(load(), input_ids))]
    variants = [("all layers VKT", "all", {}), ("half the layers VKT (even)", "even", {})]
    if args.no_window:
        variants += [(f"{name}, no window", layers, {"local_attention": False}) for name, layers, _ in variants]
    for name, layers, options in variants:
        rows.append((name, perplexity(vkt_hf.convert_to_vkt(load(), layers=layers, **options).eval(), input_ids)))
    for path in args.saved:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        vkt_count = f"{len(model.config.vkt_layers)}/{model.config.num_hidden_layers} layers VKT"
        rows.append((f"saved {path.name} ({vkt_count})", perplexity(model, input_ids)))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  perplexity {value:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
