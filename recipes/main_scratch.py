#!/usr/bin/env python3
"""The from-scratch comparison (``make main-scratch``): a tiny byte-level VKT model vs a same-size
softmax baseline on a book corpus, end to end, on CPU. (The main job, ``recipes/main.py``, converts
and distills a pretrained model instead.)

    python recipes/main_scratch.py         # ~15 minutes on 2 CPU cores, results in runs/main_scratch/

1. obtains the offline corpus (``scripts/fetch_corpus.py``: six Austen novels, the KJV Bible,
   Shakespeare; cached after the first run);
2. times a few training steps of both models and picks one step count that fits the time
   budget, so both get equal steps (``recipes/configs/main_scratch_{vkt,softmax}.yaml``, byte-level);
3. trains both (:mod:`vkt_hf.training`), evaluates both on held-out books
   (:mod:`vkt_hf.eval_job`: validation loss / perplexity / bits per byte, perplexity by position
   at 8x the training length, streaming perplexity through the cache, passkey retrieval,
   samples);
4. writes ``runs/main_scratch/report.md`` (table + plots), ``report.json`` and a model card per
   model (``runs/main_scratch/<model>/README.md``, and ``cards/``), and prints where they are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vkt_hf import evaluation as ev
from vkt_hf.cards import write_model_card
from vkt_hf.config_loading import run_recipe
from vkt_hf.data import get_tokenizer
from vkt_hf.eval_job import EvalConfig, evaluate_model
from vkt_hf.training import TrainConfig, build_pretrain_model, load_config, train

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("vkt", "softmax")
QUICK_MODEL = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "main_scratch"), help="output folder")
    parser.add_argument("--budget_minutes", type=float, default=15.0, help="wall-time budget of the whole job")
    parser.add_argument("--max_steps", type=int, default=600, help="upper bound on training steps per model")
    parser.add_argument("--min_steps", type=int, default=60, help="lower bound on training steps per model")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="a smoke test: fixture texts, a tiny model, seconds")
    parser.add_argument("--cards_dir", default=None, help="where the cards' copies go (default: OUT/cards)")
    return parser.parse_args(argv)


def get_corpus(quick: bool) -> tuple[Path, list[str] | None]:
    """The corpus folder and its held-out documents (``None``: the configs' own)."""
    if quick:
        return ROOT / "tests" / "fixtures" / "books", ["sonnets"]
    sys.path.insert(0, str(ROOT / "scripts"))  # the fetch scripts are plain scripts, not a package
    from _fetch_utils import default_cache_dir
    from fetch_corpus import fetch_corpus

    return fetch_corpus(default_cache_dir()), None


def model_configs(args: argparse.Namespace, corpus: Path, val_docs: list[str] | None) -> dict[str, TrainConfig]:
    """``recipes/configs/main_scratch_{vkt,softmax}.yaml`` pointed at the corpus and the output folder."""
    cfgs = {}
    for name in MODELS:
        flags = ["--config", str(ROOT / "recipes" / "configs" / f"main_scratch_{name}.yaml")]
        flags += [
            "--data",
            str(corpus),
            "--output_dir",
            str(Path(args.out) / name),
            "--num_threads",
            str(args.threads),
        ]
        flags += ["--resume", "false"]
        if val_docs:
            flags += ["--val_documents", json.dumps(val_docs)]
        if args.quick:
            flags += ["--seq_len", "64", "--batch_size", "4", "--eval_every", "0", "--save_every", "0"]
            flags += ["--model_config", QUICK_MODEL]
        cfgs[name] = load_config(flags)
    return cfgs


def time_steps(cfg: TrainConfig, tokenizer: Any, steps: int = 3) -> float:
    """Seconds per training step of ``cfg``'s model (forward, backward, AdamW) on random bytes."""
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(3, len(tokenizer), (cfg.batch_size, cfg.seq_len))
    times = []
    for _ in range(steps + 1):
        start = time.time()
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.time() - start)
    return sorted(times[1:])[len(times[1:]) // 2]  # median, without the warm-up step


def plan_steps(args: argparse.Namespace, cfgs: dict[str, TrainConfig], start: float) -> tuple[int, float]:
    """One step count for both models that fits the budget, and each model's training budget (s)."""
    step_s = max(time_steps(cfg, get_tokenizer("byte")) for cfg in cfgs.values())
    eval_reserve = 0.25 * args.budget_minutes * 60  # evaluation, saving, report
    train_budget = (args.budget_minutes * 60 - (time.time() - start) - eval_reserve) / len(MODELS)
    steps = int(min(args.max_steps, max(args.min_steps, 0.9 * train_budget / step_s)))
    if args.quick:
        steps = 10
    print(f"[main] {step_s:.2f}s/step (slower model) -> {steps} steps per model", flush=True)
    return steps, train_budget


def train_and_evaluate(args: argparse.Namespace, name: str, cfg: TrainConfig, steps: int, budget_s: float) -> dict:
    """Train one model for ``steps`` steps, then evaluate it on the held-out books."""
    cfg.max_steps = steps
    cfg.warmup_steps = min(cfg.warmup_steps, steps // 10)
    cfg.eval_every = cfg.save_every = 0 if args.quick else max(1, steps // 4)
    cfg.time_limit_minutes = 1.3 * budget_s / 60  # a safety net; the step count normally ends first
    print(f"[main] training {name} ({steps} steps)", flush=True)
    run = train(cfg)
    eval_cfg = EvalConfig(
        run_dir=cfg.output_dir,
        seq_len=cfg.seq_len,
        eval_batches=16,
        position_context=8 * cfg.seq_len,
        position_buckets=8,
        position_segments=4,
        stream_chunk=2048,
        stream_max_tokens=16384,
        passkey_lengths=[256, 512, 1024] if not args.quick else [128],
        passkey_depths=[0.0, 0.5, 1.0],
        passkey_trials=2,
        max_new_tokens=80,
        num_threads=args.threads,
    )
    print(f"[main] evaluating {name}", flush=True)
    return {"run": run, "eval": evaluate_model(eval_cfg)}


def report_table(results: dict[str, dict[str, Any]]) -> str:
    """The markdown comparison table."""
    cols = [
        ("parameters", lambda r: f"{r['run']['model']['parameters']:,}"),
        ("steps", lambda r: r["run"]["final"]["step"]),
        ("train tokens", lambda r: f"{r['run']['final']['tokens']:,}"),
        ("train time (s)", lambda r: r["run"]["final"]["train_time_s"]),
        ("val loss", lambda r: f"{r['eval']['perplexity']['loss']:.4f}"),
        ("val ppl", lambda r: f"{r['eval']['perplexity']['ppl']:.3f}"),
        ("bits/byte", lambda r: f"{r['eval']['perplexity']['bits_per_byte']:.4f}"),
        (
            "ppl first / last position bucket",
            lambda r: (
                f"{r['eval']['position_buckets']['buckets'][0]['ppl']:.3f} / "
                f"{r['eval']['position_buckets']['buckets'][-1]['ppl']:.3f}"
            ),
        ),
        ("streaming ppl", lambda r: f"{r['eval']['streaming']['ppl']:.3f}"),
        ("cache at end (bytes)", lambda r: f"{r['eval']['streaming']['max_cache_bytes']:,}"),
        ("passkey acc.", lambda r: f"{r['eval']['passkey']['accuracy']:.2f}"),
    ]
    lines = ["| model | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, res in results.items():
        lines.append(f"| {name} | " + " | ".join(str(fn(res)) for _, fn in cols) + " |")
    return "\n".join(lines)


def write_plots(out: Path, results: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """Training curves, perplexity by position, streaming and passkey plots of both models."""
    curves = {}
    for name in MODELS:
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    return {
        "loss": ev.plot_curves(curves, out / "loss.png", "step", "training loss (nats/byte)", "Training loss"),
        "positions": ev.plot_position_buckets(
            {n: r["eval"]["position_buckets"] for n, r in results.items()}, out / "positions.png"
        ),
        "streaming": ev.plot_streaming({n: r["eval"]["streaming"] for n, r in results.items()}, out / "streaming.png"),
        "passkey": ev.plot_passkey({n: r["eval"]["passkey"] for n, r in results.items()}, out / "passkey.png"),
    }


def write_cards(out: Path, cards_dir: str | None) -> dict[str, Path]:
    """A model card per model in its run folder, and the published copies in ``cards_dir``."""
    ablation = ROOT / "docs" / "ablation.json"  # the ablation table goes into the cards when it exists
    ablation = ablation if ablation.is_file() else None
    cards = {name: write_model_card(out / name, ablation=ablation) for name in MODELS}
    for name in MODELS:
        write_model_card(
            out / name, out=cards_dir or out / "cards", name=f"vkt-hf-main-scratch-{name}", ablation=ablation
        )
    return cards


def report_text(
    args: argparse.Namespace,
    results: dict[str, dict[str, Any]],
    cfgs: dict[str, TrainConfig],
    steps: int,
    fetch_s: float,
    wall: float,
    plots: dict[str, Path],
    cards: dict[str, Path],
) -> str:
    """``report.md``: what was run, the table, the plots, links to the cards and one sample per model."""
    out = Path(args.out)
    first = results[MODELS[0]]
    stream = first["eval"]["streaming"]
    text = [
        "# VKT vs softmax attention on the book corpus",
        "",
        f"Wall time {wall / 60:.1f} min on {args.threads} CPU threads (corpus {fetch_s:.0f}s). "
        f"Byte-level models, {cfgs['vkt'].seq_len}-byte training sequences that never cross a book boundary, "
        f"{steps} steps x {cfgs['vkt'].batch_size} sequences each. Held-out books: "
        f"{', '.join(first['eval']['val_documents'])}. Position buckets over "
        f"{first['eval']['position_buckets']['context_length']}-byte segments (8x the training length); "
        f"streaming: the first {stream['tokens']:,} bytes of {stream['document']} in chunks of {stream['chunk_size']} "
        "through the cache.",
        "",
        report_table(results),
        "",
        *(f"![{k}]({Path(p).name})" for k, p in plots.items()),
        "",
        "Model cards: " + ", ".join(f"[{n}]({Path(c).relative_to(out)})" for n, c in cards.items()),
        "",
        "## Samples",
        "",
    ]
    for name, res in results.items():
        sample = res["eval"]["samples"][0]
        text += [f"**{name}**:", "", "```text", sample["prompt"] + sample["completion"], "```", ""]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus, val_docs = get_corpus(args.quick)
    fetch_s = time.time() - start
    print(f"[main] corpus: {corpus} ({fetch_s:.0f}s)", flush=True)
    cfgs = model_configs(args, corpus, val_docs)
    steps, budget_s = plan_steps(args, cfgs, start)  # equal steps for both models, within the budget
    results = {name: train_and_evaluate(args, name, cfg, steps, budget_s) for name, cfg in cfgs.items()}
    plots, cards = write_plots(out, results), write_cards(out, args.cards_dir)
    wall = time.time() - start
    (out / "report.md").write_text(report_text(args, results, cfgs, steps, fetch_s, wall, plots, cards))
    summary = {"wall_time_s": round(wall, 1), "steps": steps, "fetch_s": round(fetch_s, 1), "models": results}
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\n" + report_table(results) + "\n", flush=True)
    print(f"[main] done in {wall / 60:.1f} min", flush=True)
    print(f"[main] report:      {out / 'report.md'}", flush=True)
    print(f"[main] plots:       {', '.join(str(p) for p in plots.values())}", flush=True)
    print(f"[main] model cards: {', '.join(str(c) for c in cards.values())}", flush=True)
    print(f"[main] models:      {', '.join(str(out / n / 'model') for n in MODELS)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe("main_scratch.py", main))
