#!/usr/bin/env python3
"""Perplexity of SmolLM2-135M-Instruct conversions on held-out text, at 512 and 2,048 tokens.

Every model is scored on the same token segments of each text: perplexity at ``L`` tokens is
the mean next-token loss over non-overlapping ``L``-token segments of the first ``--tokens``
tokens of the text, each segment read from its start (so at 2,048 tokens most positions see
far more context than the 64-token window).

Models are either built here from the original checkpoint, untrained (``--variant``), loaded from
saved directories (``--model NAME=DIR``, e.g. the output of a distillation stage), or rebuilt from a
training checkpoint (``--checkpoint "NAME=CKPT_DIR TRAIN FLAGS"``: the model the flags of
``recipes/train.py`` describe, with the checkpoint's full state loaded and LoRA merged):

* ``original`` -- the checkpoint as shipped;
* ``all`` / ``half`` -- the default conversion (window + sink + VKT) of all 30 layers / the even 15;
* ``all-window`` / ``half-window`` -- window + sink alone (``vkt_terms=False``), the baseline;
* ``all-mean`` / ``half-mean`` -- the previous conversion (no window: VKT means and read-out only).

The texts default to *Persuasion* (Austen, held out of every training config) and the Book of
2 Kings 17 onward in the King James Bible (another kind of text, with long-range repetition, never
trained on).

    python scripts/conversion_quality.py --variant original all half all-mean half-mean \\
        --json docs/quality/untrained.json

    python scripts/conversion_quality.py --checkpoint "window=runs/quality/window/stage2/checkpoints/step_000020 \\
        --config recipes/configs/smollm2_stage2_all.yaml --model_name_or_path .cache/vkt-hf/smollm2-135m-instruct \\
        --convert_layers all --vkt_options '{vkt_terms: false}'"

``--switch-off`` also scores each saved model with one branch switched off at evaluation time
(``-window``: the VKT terms alone; ``-vkt``: the window + sink alone), to show what each costs.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import vkt_hf
from vkt_hf import training
from vkt_hf.evaluation import perplexity_at  # the mean loss over L-token segments, each read from its start

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SRC = REPO / ".cache/vkt-hf/smollm2-135m-instruct"
CORPUS = REPO / ".cache/vkt-hf/corpus"
#: name -> (file in the corpus, character offset where the scored text starts)
TEXTS = {"persuasion": ("austen_persuasion.txt", 0), "kjv": ("bible_kjv.txt", 1_500_000)}
VARIANTS = {
    "original": None,
    "all": ("all", {}),
    "half": ("even", {}),
    "all-window": ("all", {"vkt_terms": False}),
    "half-window": ("even", {"vkt_terms": False}),
    "all-mean": ("all", {"local_attention": False}),
    "half-mean": ("even", {"local_attention": False}),
}


def load_variant(src: Path, name: str) -> torch.nn.Module:
    """The original model, or one of its untrained conversions (see module docstring)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if VARIANTS[name] is not None:
        layers, options = VARIANTS[name]
        model = vkt_hf.convert_to_vkt(model, layers=layers, **options)
    return model.eval()


def load_checkpoint(spec: str) -> torch.nn.Module:
    """``"CKPT_DIR TRAIN FLAGS"``: the model those flags train, with ``CKPT_DIR/model.safetensors`` loaded, LoRA merged."""
    checkpoint, *flags = shlex.split(spec)
    cfg = training.load_config([*flags, "--kd_weight", "0"])  # the model only: no teacher
    model = training.SETUPS[cfg.mode](cfg, None, torch.device("cpu")).model
    missing, unexpected = model.load_state_dict(load_file(str(Path(checkpoint, "model.safetensors"))), strict=False)
    if unexpected or any(not key.endswith("lm_head.weight") for key in missing):  # the head is tied, not saved
        raise SystemExit(f"error: {checkpoint} does not match the model its flags describe: {missing or unexpected}")
    return (model.merge_and_unload() if hasattr(model, "merge_and_unload") else model).eval()


def switch_off(model: torch.nn.Module, branch: str) -> torch.nn.Module:
    """Turn off one branch of every VKT layer in place: ``"window"`` (local attention) or ``"vkt"`` (VKT terms)."""
    for layer in vkt_hf.layers.vkt_layers(model):
        layer.config = copy.copy(layer.config)
        if branch == "window":
            layer.config.local_attention = False
        else:
            layer.config.vkt_terms = False
    return model


def text_tokens(tokenizer, name: str, tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of a held-out text ``(1, tokens)``."""
    file, offset = TEXTS[name]
    path = CORPUS / file
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; run `python scripts/fetch_corpus.py` first")
    text = path.read_text(encoding="utf-8")[offset : offset + tokens * 8]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"error: {name} has only {ids.shape[1]} tokens after offset {offset}")
    return ids


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--src`` (the original checkpoint), ``--variant`` (its untrained conversions) and ``--model NAME=DIR``."""
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="SmolLM2 checkpoint (default: %(default)s)")
    parser.add_argument("--variant", nargs="*", default=[], choices=sorted(VARIANTS), help="untrained models")
    parser.add_argument("--model", action="append", default=[], help="NAME=DIR of a saved model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--checkpoint", action="append", default=[], help='"NAME=CKPT_DIR TRAIN FLAGS"')
    parser.add_argument("--texts", nargs="*", default=list(TEXTS), choices=sorted(TEXTS))
    parser.add_argument("--lengths", nargs="*", type=int, default=[512, 2048])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens scored per text (default: %(default)s)")
    parser.add_argument("--switch-off", action="store_true", help="also score saved models without each branch")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not (args.src / "config.json").is_file():
        parser.error(f"{args.src} has no checkpoint; run `python scripts/fetch_smollm2.py` first")
    models: list[tuple[str, Path | str | None]] = [(name, None) for name in args.variant]
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path, "config.json").is_file():
            parser.error(f"--model takes NAME=DIR of a saved model, got {spec!r}")
        models.append((name, Path(path)))
        if args.switch_off:
            models += [(f"{name}-window", Path(path)), (f"{name}-vkt", Path(path))]
    for spec in args.checkpoint:
        name, sep, rest = spec.partition("=")
        if not sep or not Path(shlex.split(rest)[0], "model.safetensors").is_file():
            parser.error(f"--checkpoint takes 'NAME=CKPT_DIR TRAIN FLAGS' of a training checkpoint, got {spec!r}")
        models.append((name, rest))
        if args.switch_off:
            models += [(f"{name}-window", rest), (f"{name}-vkt", rest)]
    if not models:
        parser.error("give at least one --variant or --model")

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.src)
    texts = {name: text_tokens(tokenizer, name, args.tokens) for name in args.texts}
    results: dict[str, dict[str, float]] = {}
    print("| model | " + " | ".join(f"{t} @{n}" for t in texts for n in args.lengths) + " |")
    print("|---|" + "---|" * (len(texts) * len(args.lengths)))
    for name, path in models:
        if path is None:
            model = load_variant(args.src, name)
        else:
            model = (
                load_checkpoint(path) if isinstance(path, str) else AutoModelForCausalLM.from_pretrained(path).eval()
            )
            for branch in ("window", "vkt"):
                if args.switch_off and name.endswith(f"-{branch}"):
                    switch_off(model, branch)
        by_text = {t: perplexity_at(model, ids, args.lengths) for t, ids in texts.items()}
        results[name] = {f"{t}@{n}": by_text[t][n] for t in texts for n in args.lengths}
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in results[name].values()) + " |", flush=True)
        if args.json:  # after every model, so an interrupted run keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            record = {"tokens_per_text": args.tokens, "texts": {t: TEXTS[t][0] for t in texts}, "results": results}
            args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
