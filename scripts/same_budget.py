#!/usr/bin/env python3
"""Same-budget comparison of SmolLM2-135M-Instruct conversions: does the VKT global part earn its place?

Every variant is trained with the main job's two stages (``recipes/configs/main_stage1.yaml``: attention
transfer of the whole attention layers; ``main_stage2.yaml``: KL + next-token loss, LoRA r=16) for the same
number of steps, on the same batches (same seed), then scored on the same held-out tokens as
``scripts/conversion_quality.py`` (*Persuasion* and the King James Bible, 512 and 2,048 tokens) and on
passkey retrieval beyond the window (``scripts/passkey.py``):

* ``original`` -- the original model, stage 2 only (same recipe, tokens and LoRA rank): the reference;
* ``window`` -- all 30 layers converted to window + sink alone (``vkt_terms=False``), both stages;
* ``vkt`` -- all 30 layers, the default conversion (window + sink + VKT), both stages (the main job's model);
* ``half`` -- the even 15 layers, the default conversion, both stages (the hybrid);
* ``half-window`` -- the even 15 layers, window + sink alone, both stages.

Runs go under ``--out`` (default ``runs/same_budget``; ignored by git); a finished stage is not trained
again, an interrupted one resumes from its last checkpoint. The results (and the command) are written to
``--json`` after every model::

    python scripts/same_budget.py --steps1 40 --steps2 80 --json docs/quality/same_budget.json

``--switch-off`` also scores the trained ``vkt`` and ``half`` models with their VKT terms switched off.
Variants may run in separate processes at the same time (``--threads 1`` each): every run merges its rows
into ``--json``. ``--table`` prints that JSON as a markdown table, perplexities also as ratios to the
original fine-tuned the same way::

    python scripts/same_budget.py --table --json docs/quality/same_budget.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from conversion_quality import DEFAULT_SRC, TEXTS, switch_off, text_tokens
from passkey import passkey_accuracy
from transformers import AutoModelForCausalLM, AutoTokenizer

from vkt_hf import training
from vkt_hf.cards import same_budget_table
from vkt_hf.evaluation import perplexity_at

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "recipes" / "configs"
#: variant -> (layers converted in stage 1, conversion options); ``None``: no conversion, no stage 1
VARIANTS: dict[str, tuple[str, dict] | None] = {
    "original": None,
    "window": ("all", {"vkt_terms": False}),
    "vkt": ("all", {}),
    "half": ("even", {}),
    "half-window": ("even", {"vkt_terms": False}),
}


def stage_flags(args: argparse.Namespace, variant: str, stage: int) -> list[str]:
    """``recipes/train.py`` flags of one variant's stage: the main job's config, fixed steps, no time limit."""
    out = args.out / variant / f"stage{stage}"
    flags = ["--config", str(CONFIGS / f"main_stage{stage}.yaml"), "--output_dir", str(out)]
    flags += ["--teacher_name_or_path", str(args.src), "--data", str(args.corpus / "austen_*.txt")]
    flags += ["--max_steps", str(args.steps1 if stage == 1 else args.steps2), "--time_limit_minutes", "0"]
    flags += ["--num_threads", str(args.threads), "--save_every", "20", "--resume", "true"]
    flags += ["--progress", str(args.progress).lower()]
    if stage == 1:
        layers, options = VARIANTS[variant]
        flags += ["--model_name_or_path", str(args.src), "--convert_layers", layers]
        flags += ["--vkt_options", json.dumps(options)]
    else:
        start = args.src if VARIANTS[variant] is None else args.out / variant / "stage1" / "model"
        flags += ["--model_name_or_path", str(start)]
    return flags


def trained_model(args: argparse.Namespace, variant: str) -> tuple[Path, list[dict]]:
    """Train the variant's stages that are not finished yet; its final model folder and each stage's summary."""
    stages = [2] if VARIANTS[variant] is None else [1, 2]
    summaries = []
    for stage in stages:
        flags = stage_flags(args, variant, stage)
        out = args.out / variant / f"stage{stage}"
        if not (out / "model" / "config.json").is_file():
            print(f"[same_budget] {variant} stage {stage}: python recipes/train.py {shlex.join(flags)}", flush=True)
            training.train(training.load_config(flags))
        final = json.loads((out / "run.json").read_text())["final"]
        summaries.append(
            {"stage": stage, "steps": final["step"], "tokens": final["tokens"], "train_time_s": final["train_time_s"]}
        )
    return args.out / variant / "stage2" / "model", summaries


def score(args: argparse.Namespace, model: torch.nn.Module, tokenizer, texts: dict[str, torch.Tensor]) -> dict:
    """Perplexities on the held-out texts and passkey accuracy of one model."""
    row = {}
    for name, ids in texts.items():
        ppl = perplexity_at(model, ids, args.lengths)
        row.update({f"{name}@{length}": ppl[length] for length in args.lengths})
    if args.passkey_trials:
        passkey = passkey_accuracy(model, tokenizer, args.passkey_lengths, args.passkey_trials)
        row.update({f"passkey@{n}": acc for n, acc in passkey.items()})
    return row


def write_record(path: Path, record: dict) -> None:
    """Merge ``record`` into the JSON at ``path``: rows of variants measured by other (or concurrent) runs of
    this script stay, this run's rows replace theirs; each run's command is kept under ``commands``."""
    merged = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("training", "results"):
        merged[key] = {**merged.get(key, {}), **record[key]}
    merged["commands"] = sorted({*merged.get("commands", []), record["command"]})
    merged.update({k: v for k, v in record.items() if k not in ("training", "results", "command")})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="SmolLM2 checkpoint (default: %(default)s)")
    parser.add_argument("--corpus", type=Path, default=REPO / ".cache/vkt-hf/corpus", help="the corpus folder")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps1", type=int, default=40, help="stage-1 steps (2 x 256 tokens each)")
    parser.add_argument("--steps2", type=int, default=80, help="stage-2 steps (2 x 256 tokens each)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens scored per text")
    parser.add_argument("--passkey_lengths", nargs="+", type=int, default=[256, 1024, 2048])
    parser.add_argument("--passkey_trials", type=int, default=10, help="passkeys per length (0: skip)")
    parser.add_argument("--switch-off", action="store_true", help="also score trained models without VKT terms")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "same_budget", help="training runs")
    parser.add_argument("--json", type=Path, help="write the results here (after every model)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    parser.add_argument("--table", action="store_true", help="print --json as a markdown table (no training)")
    args = parser.parse_args(argv)
    if args.table:
        if not (args.json and args.json.is_file()):
            parser.error("--table reads --json: give the JSON of a finished comparison")
        print(same_budget_table(json.loads(args.json.read_text())))
        return 0
    if not (args.src / "config.json").is_file():
        parser.error(f"{args.src} has no checkpoint; run `python scripts/fetch_smollm2.py` first")
    if not args.corpus.is_dir():
        parser.error(f"{args.corpus} is missing; run `python scripts/fetch_corpus.py` first")
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.src)
    texts = {name: text_tokens(tokenizer, name, args.tokens) for name in TEXTS}
    record: dict = {
        "command": "python scripts/same_budget.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "tokens_per_text": args.tokens,
        "texts": {t: TEXTS[t][0] for t in texts},
        "training": {},
        "results": {},
    }
    for variant in args.variants:
        path, stages = trained_model(args, variant)
        began = time.time()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        rows = {variant: score(args, model, tokenizer, texts)}
        if args.switch_off and VARIANTS[variant] and VARIANTS[variant][1].get("vkt_terms", True):
            rows[f"{variant}, VKT terms off"] = score(args, switch_off(model, "vkt"), tokenizer, texts)
        record["training"][variant] = {"stages": stages, "eval_s": round(time.time() - began, 1)}
        record["results"].update(rows)
        print(same_budget_table(record), flush=True)  # the rows measured so far by this run
        if args.json:
            write_record(args.json, record)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
