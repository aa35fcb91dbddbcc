#!/usr/bin/env python3
"""The main job: a real model converted to VKT, distilled on this machine, compared with the original.

    python recipes/main.py             # at most ~15 minutes on 2 CPU cores; writes only under runs/main/
    python recipes/main.py --publish   # copies the report and the card into docs/main/ and model_cards/,
                                       # and regenerates the README's main-job table from them

1. fetches SmolLM2-135M-Instruct and the book corpus, offline (``scripts/fetch_smollm2.py``,
   ``scripts/fetch_corpus.py``; skipped when present);
2. converts all 30 layers with the default conversion (exact 64-token softmax window + sink, plus
   the VKT global part, which starts near zero) and distills it with the staged recipe
   (``recipes/configs/main_stage{1,2}.yaml``: attention transfer, then end to end with the KL to the
   original's logits, LoRA r=16) on the Austen novels except *Persuasion*, each stage's
   ``time_limit_minutes`` set so that the whole job fits ``--budget_minutes``;
3. evaluates the original and the distilled model side by side on held-out text (*Persuasion*, and
   the King James Bible, never trained on): perplexity at 512 and 2,048 tokens, perplexity by
   position (beyond the distillation length), a continuation of the same prompt, decode memory and
   ms/token at growing context; and, for the converted model, where its attention mass goes
   (window, sink, VKT global slot) and its importance map;
4. writes ``runs/main/report.json``, ``report.md``, the plots and the model card (``model_card.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from vkt_hf import evaluation as ev
from vkt_hf.cards import same_budget_table, write_model_card
from vkt_hf.config_loading import run_recipe
from vkt_hf.data import PackedDataset, encode, get_tokenizer, pack_documents
from vkt_hf.explain import attention_shares, importance_map, render_html, render_png, render_shares_png
from vkt_hf.layers import vkt_layers
from vkt_hf.ops import cpu_kernels
from vkt_hf.training import load_causal_lm, load_config, train

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # the fetch scripts are plain scripts, not a package
from _fetch_utils import default_cache_dir  # noqa: E402
from conversion_quality import TEXTS  # noqa: E402  (the held-out texts the quality numbers use)
from fetch_corpus import fetch_corpus  # noqa: E402
from fetch_smollm2 import fetch_smollm2  # noqa: E402

CARD_NAME = "vkt-hf-smollm2-135m-vkt-distilled"
MODELS = ("original", "vkt")
QUICK_TEXTS = {"genesis": ("genesis.txt", 0), "sonnets": ("sonnets.txt", 0)}  # the trainer's order (by name)
TEXT_NAMES = {"persuasion": "Persuasion", "kjv": "King James Bible", "sonnets": "Sonnets", "genesis": "Genesis"}
PROMPT = (
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, never took "
    "up any book but the Baronetage; there he found occupation for an idle hour, and consolation in a "
    "distressed one; there his faculties were roused into admiration and respect, by contemplating the "
    "limited remnant of the earliest patents; there any unwelcome sensations, arising from domestic affairs "
    "changed naturally into pity and contempt as he turned over the almost endless creations of the last century;"
)
#: greedy continuations with this penalty (HF's repetition_penalty): without it both models loop
REPETITION_PENALTY = 1.3
#: eval seconds per token of training (measured on this project's 2-core machine), see estimate_eval_s
EVAL_PER_TRAIN_TOKEN = 0.65  # measured 0.35, 0.41 (busy machine) and 0.59 (quiet): eval_s over the estimate at
# factor 1, in three reports' timing; the largest plus a margin, as an evaluation that overruns overruns the budget
#: minutes kept free at the end (saving, the report, the card, noise in the estimate)
MARGIN_MINUTES = 0.5
TABLE_MARKERS = ("<!-- main-table -->", "<!-- /main-table -->")
#: the baselines trained with this recipe for the same steps (scripts/same_budget.py); the card quotes them
SAME_BUDGET = ROOT / "docs" / "quality" / "same_budget.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "main", help="output folder (default: runs/main)")
    parser.add_argument("--budget_minutes", type=float, default=15.0, help="wall-time budget of the whole job")
    parser.add_argument("--eval_minutes", type=float, default=5.0, help="first guess of the evaluation's time")
    parser.add_argument("--stage1_share", type=float, default=1 / 3, help="stage 1's share of the training time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--src", type=Path, default=None, help="the original model (default: fetched SmolLM2)")
    parser.add_argument("--name", default="SmolLM2-135M-Instruct", help="the original model's name in the report")
    parser.add_argument("--hub_id", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="its Hub id, for the card")
    parser.add_argument("--corpus", type=Path, default=None, help="the corpus folder (default: fetched)")
    parser.add_argument("--eval_tokens", type=int, default=4096, help="tokens scored per text (as docs/quality)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="perplexity segment lengths")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048, 4096], help="decode contexts")
    parser.add_argument("--decode_steps", type=int, default=8, help="greedy steps timed per context")
    parser.add_argument("--new_tokens", type=int, default=32, help="tokens of the continuation")
    parser.add_argument("--quick", action="store_true", help="a smoke test (tiny model via --src, fixture texts)")
    parser.add_argument("--publish", action="store_true", help="publish the finished run (no training)")
    parser.add_argument("--record_curve", action="store_true", help="add the finished run to --curve (no training)")
    parser.add_argument("--curve", type=Path, default=ROOT / "docs" / "quality" / "curve.json", help="the curve")
    parser.add_argument("--docs_dir", type=Path, default=ROOT / "docs" / "main", help="--publish: report copy")
    parser.add_argument("--cards_dir", type=Path, default=ROOT / "model_cards", help="--publish: card copy")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="--publish: README to update")
    return parser.parse_args(argv)


# --- fetch and distill ---------------------------------------------------------------------------


def fetch(args: argparse.Namespace) -> tuple[Path, Path]:
    """The original model's folder and the corpus folder: fetched once, offline, then cached."""
    if args.quick:
        return args.src, args.corpus or ROOT / "tests" / "fixtures" / "books"
    cache = default_cache_dir()
    return args.src or fetch_smollm2(cache), args.corpus or fetch_corpus(cache)


def stage_config(args: argparse.Namespace, stage: int, src: Path, corpus: Path, minutes: float):
    """``recipes/configs/main_stage<stage>.yaml`` pointed at the model, the corpus and ``args.out``."""
    flags = ["--config", str(ROOT / "recipes" / "configs" / f"main_stage{stage}.yaml")]
    start = src if stage == 1 else args.out / "stage1" / "model"
    flags += ["--model_name_or_path", str(start), "--teacher_name_or_path", str(src)]
    flags += ["--output_dir", str(args.out / f"stage{stage}"), "--num_threads", str(args.threads)]
    flags += ["--time_limit_minutes", f"{max(minutes, 0.05):.3f}", "--progress", "false"]
    if args.quick:
        flags += ["--data", str(corpus), "--val_documents", '["sonnets", "genesis"]', "--seq_len", "64"]
        flags += ["--max_steps", "2", "--log_every", "1"]
    else:
        flags += ["--data", str(corpus / "austen_*.txt")]
    return load_config(flags)


def estimate_eval_s(args: argparse.Namespace, train_s_per_token: float) -> float:
    """Seconds the evaluation will take, from the measured speed of stage 1: both scale with the
    converted model's forward pass. Counted in prefill tokens of both models: the texts (each 2,048-token
    segment and three more 512-token ones), the decode prefill past them, the attention shares, three
    validation rows, and each decoded token as ~40 prefill tokens; the factor was measured here (see
    the report's ``timing``)."""
    decoded = 2 * (args.decode_steps * len(args.contexts) + args.new_tokens)
    tokens = len(TEXTS) * args.eval_tokens * 1.75 + max(0, max(args.contexts) - 2048) + 384 + 3 * 512 + 40 * decoded
    return tokens * EVAL_PER_TRAIN_TOKEN * train_s_per_token + 60


def distill(args: argparse.Namespace, src: Path, corpus: Path, started: float) -> dict[str, Any]:
    """Both stages, their time limits shared out of what the budget leaves after the evaluation."""
    left = args.budget_minutes - (time.time() - started) / 60 - args.eval_minutes - 1.5  # 1.5: loads and saves
    limits = {1: max(0.1, args.stage1_share * left)}
    timing: dict[str, Any] = {"stage1_limit_min": round(limits[1], 2)}
    began = time.time()
    runs = {1: train(stage_config(args, 1, src, corpus, limits[1]))}
    final = runs[1]["final"]
    timing["stage1_s"] = round(time.time() - began, 1)
    timing["eval_estimate_s"] = round(estimate_eval_s(args, final["train_time_s"] / max(1, final["tokens"])), 1)
    overhead = (timing["stage1_s"] - final["train_time_s"]) / 60  # loading, tokenizing, final eval, saving
    left = args.budget_minutes - (time.time() - started) / 60 - timing["eval_estimate_s"] / 60 - overhead
    left -= MARGIN_MINUTES
    timing["stage2_limit_min"] = limits[2] = round(max(0.1, left), 2)
    began = time.time()
    runs[2] = train(stage_config(args, 2, src, corpus, limits[2]))
    timing["stage2_s"] = round(time.time() - began, 1)
    return {"runs": runs, "timing": timing}


def stage_summary(run: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Steps, tokens, time and the training loss of one stage: the mean over its first and its last tenth
    of steps (one batch of two sequences per step is noisy)."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    tenth = max(1, len(losses) // 10)
    cfg = run["config"]
    return {
        "mode": run["mode"],
        "steps": run["final"]["step"],
        "tokens": run["final"]["tokens"],
        "train_time_s": run["final"]["train_time_s"],
        "time_limit_minutes": cfg["time_limit_minutes"],
        "batch": f"{cfg['batch_size']} x {cfg['seq_len']} tokens",
        "lr": cfg["lr"],
        "first_loss": sum(losses[:tenth]) / tenth if losses else None,
        "last_loss": sum(losses[-tenth:]) / tenth if losses else None,
        "val_loss": run["final"].get("val_loss"),
        "trainable_parameters": run["model"]["trainable_parameters"],
    }


# --- evaluation --------------------------------------------------------------------------------


def held_out_ids(args: argparse.Namespace, tokenizer: Any, corpus: Path) -> dict[str, torch.Tensor]:
    """The first ``eval_tokens`` tokens of each held-out text ``(1, N)`` (from its character offset)."""
    texts = QUICK_TEXTS if args.quick else TEXTS
    ids = {}
    for name, (file, offset) in texts.items():
        text = (corpus / file).read_text(encoding="utf-8")[offset : offset + 8 * args.eval_tokens]
        tokens = encode(tokenizer, text)[: args.eval_tokens]
        if len(tokens) < args.eval_tokens:
            raise SystemExit(f"error: {file} has only {len(tokens)} tokens after offset {offset}")
        ids[name] = torch.tensor([tokens])
    return ids


def val_loss(model: torch.nn.Module, tokenizer: Any, text_ids: torch.Tensor, cfg: dict[str, Any]) -> float:
    """Loss on the rows the trainer validates on (``cfg``: a stage's config): the first
    ``batch_size x eval_batches`` rows of ``seq_len`` tokens of the first held-out text."""
    rows = pack_documents([text_ids[0].tolist()], cfg["seq_len"], pad_token_id=tokenizer.pad_token_id or 0)
    return ev.perplexity(model, PackedDataset(rows), cfg["batch_size"], cfg["eval_batches"])["loss"]


def evaluate(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any, ids: dict[str, torch.Tensor]) -> dict:
    """One model's side of the comparison (the first text also feeds the decode benchmark)."""
    began, first = time.time(), next(iter(ids))
    decode = ev.decode_benchmark(
        model, ids[first], [c for c in args.contexts if c <= args.eval_tokens], args.decode_steps
    )
    perplexity, positions = {}, {}
    for name, text in ids.items():
        rows = {0: decode["nll"]} if name == first else {}
        perplexity[name] = {str(k): v for k, v in sorted(ev.perplexity_at(model, text, args.lengths, rows).items())}
        positions[name] = ev.bucket_perplexity(rows[0][: max(args.lengths) - 1], num_buckets=8)
    samples = ev.generation_samples(
        model, tokenizer, [PROMPT], args.new_tokens, do_sample=False, repetition_penalty=REPETITION_PENALTY
    )
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "perplexity": perplexity,
        "positions": positions,
        "decode": {"steps": decode["steps"], "rows": decode["rows"]},
        "continuation": samples[0],
        "seconds": round(time.time() - began, 1),
    }


def explain_converted(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any, ids: torch.Tensor) -> dict:
    """Where the converted model's attention goes (window / sink / global slot), and its importance map."""
    shares = attention_shares(model, ids[:, :384])
    render_shares_png(shares, args.out / "attention_shares.png", "Converted model: attention mass off the window")
    imap = importance_map(model, tokenizer, PROMPT, max_tokens=120)
    (args.out / "importance.html").write_text(render_html(imap, "Importance map of the distilled model"))
    render_png(imap, args.out / "importance.png")
    mean = shares["shares"].mean(dim=(0, 1))
    layers = vkt_layers(model)
    return {
        "shares_mean": {part: float(v) for part, v in zip(shares["parts"], mean)},
        "slot_share_max": float(shares["shares"][..., 2].max()),
        "shares_tokens": shares["tokens"],
        "importance_max_abs_a": float(imap.scalars.abs().max()),
        "importance_notes": imap.notes,
        "window": layers[0].config.local_attention_window,
        "sink_tokens": layers[0].config.sink_tokens,
        "vkt_layers": len(layers),
    }


# --- report ------------------------------------------------------------------------------------


def longer_run(path: Path) -> dict[str, Any] | None:
    """The longest distillation measured so far (``docs/quality/curve.json``, written by ``--record_curve``):
    its point of the curve (tokens, perplexities, budget, command) and the curve's ``source``; ``None`` until
    one is recorded."""
    if not path.is_file():
        return None
    points = json.loads(path.read_text()).get("points", [])
    if not points:
        return None
    return {"source": _rel(path), **max(points, key=lambda p: p["tokens"])}


def curve_point(report: dict[str, Any]) -> dict[str, Any]:
    """One point of the distillation curve: a finished run's tokens and held-out perplexities (both models)."""
    d, longest = report["distillation"], str(max(report["eval"]["lengths"]))
    return {
        "tokens": d["stage1"]["tokens"] + d["stage2"]["tokens"],
        "stage_tokens": [d["stage1"]["tokens"], d["stage2"]["tokens"]],
        "budget_minutes": report["budget_minutes"],
        "length": int(longest),
        "ppl": {t: report["models"]["vkt"]["perplexity"][t][longest] for t in report["eval"]["texts"]},
        "original_ppl": {t: report["models"]["original"]["perplexity"][t][longest] for t in report["eval"]["texts"]},
        "command": f"python recipes/main.py --budget_minutes {report['budget_minutes']:g} --out <dir> && "
        "python recipes/main.py --record_curve --out <dir>",
    }


def record_curve(args: argparse.Namespace) -> int:
    """Add the finished run in ``args.out`` to ``docs/quality/curve.json`` (a run of the same budget is replaced)."""
    source = args.out / "report.json"
    if not source.is_file():
        raise SystemExit(f"error: {source} not found: run `python recipes/main.py --out {args.out}` first")
    point = curve_point(json.loads(source.read_text()))
    curve = json.loads(args.curve.read_text()) if args.curve.is_file() else {"points": []}
    points = [p for p in curve["points"] if p["budget_minutes"] != point["budget_minutes"]] + [point]
    curve = {
        "what": "SmolLM2-135M-Instruct converted in all layers and distilled by recipes/main.py with the budget given: "
        f"perplexity at {point['length']:,} tokens on the held-out texts, and the original's",
        "points": sorted(points, key=lambda p: p["tokens"]),
    }
    args.curve.parent.mkdir(parents=True, exist_ok=True)
    args.curve.write_text(json.dumps(curve, indent=2) + "\n")
    print(f"[main] recorded {point['tokens']:,} tokens in {args.curve}", flush=True)
    return 0


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def labels(report: dict[str, Any]) -> dict[str, str]:
    """The two models' names in tables and plots."""
    layers = report["converted"]["vkt_layers"]
    return {"original": f"{report['source_name']} (original)", "vkt": f"VKT in all {layers} layers, distilled here"}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _by_context(rows: list[dict], contexts: list[int], key: str, fmt) -> str:
    picked = [r for r in rows if r["context"] in (contexts[0], contexts[-1])]
    return " / ".join(fmt(r[key]) for r in picked)


def comparison_table(report: dict[str, Any]) -> list[str]:
    """The side-by-side markdown table (README and report)."""
    models, lengths = report["models"], report["eval"]["lengths"]
    contexts = [r["context"] for r in models["original"]["decode"]["rows"]]
    span = f"{contexts[0]:,} / {contexts[-1]:,} tokens"
    lines = ["| | " + " | ".join(labels(report).values()) + " |", "|---|---|---|"]
    for text in report["eval"]["texts"]:
        label = f"perplexity, {TEXT_NAMES.get(text, text)}, " + " / ".join(f"{int(n):,}" for n in lengths) + " tokens"
        cells = [" / ".join(f"{models[m]['perplexity'][text][str(n)]:.2f}" for n in lengths) for m in MODELS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    first = next(iter(report["eval"]["texts"]))
    last = models["vkt"]["positions"][first]["buckets"][-1]
    ratio = last["end"] / report["distillation"]["seq_len"]
    lines.append(
        f"| perplexity at positions {last['start']:,}-{last['end']:,} of {TEXT_NAMES.get(first, first)} "
        f"({ratio:.0f}x the distillation length) | "
        + " | ".join(f"{models[m]['positions'][first]['buckets'][-1]['ppl']:.2f}" for m in MODELS)
        + " |"
    )
    cache = [_by_context(models[m]["decode"]["rows"], contexts, "cache_bytes", _mib) for m in MODELS]
    speed = [_by_context(models[m]["decode"]["rows"], contexts, "ms_per_token", lambda v: f"{v:.0f}") for m in MODELS]
    lines.append(f"| decoding cache / state at {span} | " + " | ".join(cache) + " |")
    lines.append(f"| greedy decode, ms per token at {span} | " + " | ".join(speed) + " |")
    return lines


def budget_lines(report: dict[str, Any]) -> list[str]:
    """What the run cost, and what a longer run reaches (the quality issue's curve)."""
    d, t = report["distillation"], report["timing"]
    s1, s2 = d["stage1"], d["stage2"]
    load, cores = report["load_average"], report["cpu_count"]
    busy = "other jobs shared the machine" if max(load.values()) > cores else "no other job competed for the cores"
    lines = [
        f"Budget: `make main` took {t['wall_s'] / 60:.1f} min on {report['threads']} CPU threads "
        f"(budget {report['budget_minutes']:.0f} min; load average {load['start']:.1f} at the start, "
        f"{load['end']:.1f} at the end, on {cores} cores: {busy}). Distillation: stage 1 {s1['steps']} steps ({s1['tokens']:,} tokens, "
        f"{s1['train_time_s'] / 60:.1f} min), stage 2 {s2['steps']} steps ({s2['tokens']:,} tokens, "
        f"{s2['train_time_s'] / 60:.1f} min) of {d['seq_len']}-token sequences.",
    ]
    longer = report.get("longer_run")
    if longer:
        ppl = ", ".join(f"{TEXT_NAMES.get(t, t)} {v:.2f}" for t, v in longer["ppl"].items())
        lines += [
            "",
            f"A longer run (`{longer['source']}`, budget {longer['budget_minutes']:g} min): after "
            f"{longer['tokens']:,} distillation tokens, perplexity at {longer['length']:,} tokens: {ppl}.",
        ]
    else:
        lines += [
            "",
            "A longer run: none measured yet; this is the longest distillation of the converted model so far (the "
            "quality issue's runs used 20,480 tokens, `docs/conversion.md`, section Quality; LoLCATs "
            "needed about 40M tokens on Llama-3-8B). A longer run is recorded with "
            "`python recipes/main.py --budget_minutes 60 --out runs/main_long && "
            "python recipes/main.py --record_curve --out runs/main_long`, and this line then quotes it.",
        ]
    return lines


def readme_block(report: dict[str, Any]) -> str:
    """The README's main-job block: generated from the committed ``docs/main/report.json`` (a test checks it)."""
    return "\n".join([TABLE_MARKERS[0], *comparison_table(report), "", *budget_lines(report), TABLE_MARKERS[1]])


def write_plots(args: argparse.Namespace, report: dict[str, Any]) -> list[Path]:
    """Perplexity by position and decode cost, both models (the shares and importance plots come from
    :func:`explain_converted`)."""
    models = report["models"]
    positions = {
        f"{'original' if name == 'original' else 'VKT'}, {TEXT_NAMES.get(text, text)}": models[name]["positions"][text]
        for text in report["eval"]["texts"]
        for name in MODELS
    }
    marks = {
        f"window ({report['converted']['window']} tokens)": report["converted"]["window"],
        f"distillation length ({report['distillation']['seq_len']})": report["distillation"]["seq_len"],
    }
    title = "Perplexity by position (held-out text, one segment read from its start)"
    return [
        ev.plot_position_buckets(positions, args.out / "positions.png", marks, title),
        ev.plot_decode({labels(report)[m]: models[m]["decode"] for m in MODELS}, args.out / "decode.png"),
        args.out / "attention_shares.png",
    ]


def findings(report: dict[str, Any]) -> list[str]:
    """The sections shared by the report and the card: budget, distillation, continuations, attention."""
    d, conv, models = report["distillation"], report["converted"], report["models"]
    first = next(iter(report["eval"]["texts"]))
    stages = [
        "| stage | steps | tokens | minutes (limit) | loss, first -> last tenth of steps | trainable parameters |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("stage1", "stage2"):
        s = d[key]
        stages.append(
            f"| {key[-1]}: {s['mode']} | {s['steps']} | {s['tokens']:,} | {s['train_time_s'] / 60:.1f} "
            f"({s['time_limit_minutes']:.1f}) | {s['first_loss']:.4g} -> {s['last_loss']:.4g} | {s['trainable_parameters']:,} |"
        )
    val = d["val_loss"]
    shares = conv["shares_mean"]
    lines = [
        *budget_lines(report),
        "",
        "## Distillation",
        "",
        f"Converted: {conv['vkt_layers']} layers (exact softmax over the last {conv['window']} tokens and "
        f"{conv['sink_tokens']} sink token(s), plus the VKT global slot for everything older). Trained on "
        f"{d['train_text']}; stage 1 transfers each layer's attention output (MSE), stage 2 trains end to end on "
        "(next-token loss + KL to the original) / 2 with LoRA r=16. `importance` and `readout_gate` stay frozen.",
        "",
        *stages,
        "",
        f"Loss on the trainer's held-out rows ({d['val_rows']}): original {val['original']:.4f}, converted "
        f"untrained {val['untrained']:.4f}, after stage 1 {val['stage1']:.4f}, after stage 2 {val['stage2']:.4f}. "
        "Stage 2's next-token loss is on Austen's other novels, so on *Persuasion* it also adapts the model to the "
        "author, which the original never was: the King James Bible, never trained on, is the fairer comparison.",
        "",
        f"## Continuations (greedy, repetition penalty {REPETITION_PENALTY}, same prompt)",
        "",
        f"Prompt (the opening of *Persuasion*, held out): {PROMPT!r}",
        "",
    ]
    for name, label in labels(report).items():
        lines += [f"**{label}**:", "", "```text", "..." + models[name]["continuation"]["completion"], "```", ""]
    lines += [
        "## What the converted model attends to",
        "",
        f"Over {conv['shares_tokens']} tokens of {TEXT_NAMES.get(first, first)}, averaged over layers and heads, "
        f"{100 * shares['window']:.1f} % of the attention mass is on the window, {100 * shares['sink']:.1f} % on "
        f"the sink and {100 * shares['global slot']:.2f} % on the VKT global slot (at most "
        f"{100 * conv['slot_share_max']:.2f} % in one head). The importance map of the scalar attentions "
        f"`a` (`importance.png`, `importance.html`) is blank: max |a| = {conv['importance_max_abs_a']:.3g}, "
        "because the importance vector `V` starts at 0 and is frozen in both stages (its updates destabilised "
        "training in probes), so `a = softsign(Q . V / ...) = 0`; the shares above show what the model uses instead.",
    ]
    return lines


def report_text(report: dict[str, Any], plots: list[Path], card_link: str) -> str:
    """``report.md`` (``card_link``: the card, relative to the report)."""
    names = [p.name for p in plots]
    return "\n".join(
        [
            "# SmolLM2-135M-Instruct converted to VKT, distilled here, compared with the original",
            "",
            "Generated by `make main` (`recipes/main.py`); every number below is in `report.json`.",
            f"Held-out text: {', '.join(TEXT_NAMES.get(t, t) for t in report['eval']['texts'])} "
            f"({report['eval']['tokens']:,} tokens of each; perplexity at L tokens = mean loss over the "
            "L-token segments, each read from its start).",
            "",
            *comparison_table(report),
            "",
            *findings(report),
            "",
            "## Plots",
            "",
            *(f"![{Path(n).stem}]({n})" for n in names),
            "",
            f"Model card: [{Path(card_link).name}]({card_link})",
            "",
        ]
    )


def card_extra(report: dict[str, Any], plots: list[Path]) -> dict[str, Any]:
    """What the card adds to stage 2's own ``run.json`` (see :func:`vkt_hf.cards.write_model_card`)."""
    vkt = report["models"]["vkt"]
    sections = [
        "## Compared with the original (measured by `make main`)",
        "",
        *comparison_table(report),
        "",
        *findings(report),
    ]
    if SAME_BUDGET.is_file():  # the baselines trained the same way, measured by scripts/same_budget.py
        sections += [
            "",
            "## Against baselines trained the same way (`scripts/same_budget.py`)",
            "",
            "Each variant trained with this recipe's two stages for the same steps (40 + 80 steps of 2 x 256 "
            "tokens), perplexity on the held-out texts (ratio to the original fine-tuned the same way) and "
            f"passkey retrieval beyond the window; from `{_rel(SAME_BUDGET)}` of the vkt-hf repository, read in "
            "its `docs/conversion.md` (Quality):",
            "",
            same_budget_table(json.loads(SAME_BUDGET.read_text())),
        ]
    return {
        "eval": {"perplexity_at": vkt["perplexity"]},
        "plots": plots,
        "sections": sections,
        "run": {"model": {"base_model": report["hub_id"]}},
    }


def evaluate_both(args, src: Path, corpus: Path, distilled: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The comparison: the original and the distilled model on the same tokens, plus the loss of the
    untrained conversion on the trainer's held-out rows."""
    tokenizer = get_tokenizer(str(src))
    ids = held_out_ids(args, tokenizer, corpus)
    first = next(iter(ids))
    out: dict[str, Any] = {"models": {}, "val_loss": {}}
    for name, path in (("original", src), ("vkt", distilled)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        print(f"[main] evaluating {name}", flush=True)
        out["models"][name] = evaluate(args, model, tokenizer, ids)
        out["val_loss"][name] = val_loss(model, tokenizer, ids[first], cfg)
        if name == "vkt":
            out["converted"] = explain_converted(args, model, tokenizer, ids[first])
        del model
    untrained = load_causal_lm(str(src), "all").eval()
    out["val_loss"]["untrained"] = val_loss(untrained, tokenizer, ids[first], cfg)
    out["texts"] = {n: {"tokens": args.eval_tokens} for n in ids}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole job; returns the report (also written to ``report.json``)."""
    cpu_kernels.kernel()  # built once per machine (about a minute): before the clock, not inside the budget
    started, load_start = time.time(), os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    src, corpus = fetch(args)
    fetch_s = time.time() - started
    print(f"[main] model {src}, corpus {corpus} ({fetch_s:.0f}s)", flush=True)
    distilled = distill(args, src, corpus, started)
    runs, timing = distilled["runs"], {"fetch_s": round(fetch_s, 1), **distilled["timing"]}
    began = time.time()
    seq_len = runs[2]["config"]["seq_len"]
    results = evaluate_both(args, src, corpus, args.out / "stage2" / "model", runs[2]["config"])
    timing["eval_s"] = round(time.time() - began, 1)
    report = {
        "budget_minutes": args.budget_minutes,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "source_name": args.name,
        "source_model": _rel(src),
        "hub_id": args.hub_id,
        "converted": results["converted"],
        "distillation": {
            "seq_len": seq_len,
            "train_text": ", ".join(runs[1]["data"]["train_documents"]),
            "val_rows": f"the first {runs[2]['config']['batch_size'] * runs[2]['config']['eval_batches']} x "
            f"{seq_len} tokens of {runs[1]['data']['val_documents'][0]}",
            "stage1": stage_summary(runs[1], args.out / "stage1"),
            "stage2": stage_summary(runs[2], args.out / "stage2"),
            "val_loss": {
                **results["val_loss"],
                "stage1": runs[1]["final"]["val_loss"],
                "stage2": runs[2]["final"]["val_loss"],
            },
        },
        "eval": {"texts": results["texts"], "tokens": args.eval_tokens, "lengths": args.lengths},
        "models": results["models"],
        "longer_run": longer_run(args.curve),
        "card": _rel(args.out / "model_card.md"),
    }
    plots = write_plots(args, report)
    timing["wall_s"] = round(time.time() - started, 1)
    report["timing"] = timing
    report["load_average"] = {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}
    card = write_model_card(
        args.out / "stage2", out=args.out / "model_card.md", name=CARD_NAME, extra=card_extra(report, plots)
    )
    (args.out / "report.md").write_text(report_text(report, plots, card.name))
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def publish(args: argparse.Namespace) -> int:
    """Copy the finished run's report (JSON, markdown, plots) into ``docs_dir``, its card into ``cards_dir``,
    and regenerate the README's main-job block between its markers."""
    source = args.out / "report.json"
    if not source.is_file():
        raise SystemExit(f"error: {source} not found: run `make main` first")
    report = json.loads(source.read_text())
    report["longer_run"] = longer_run(args.curve) or report.get("longer_run")
    args.docs_dir.mkdir(parents=True, exist_ok=True)
    plots = [args.out / n for n in ("positions.png", "decode.png", "attention_shares.png")]
    for path in [*plots, args.out / "importance.png", args.out / "importance.html"]:  # the report names all five
        shutil.copy2(path, args.docs_dir / path.name)
    card = write_model_card(args.out / "stage2", out=args.cards_dir, name=CARD_NAME, extra=card_extra(report, plots))
    report["card"] = _rel(card)
    (args.docs_dir / "report.md").write_text(report_text(report, plots, os.path.relpath(card, args.docs_dir)))
    (args.docs_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    readme = args.readme.read_text()
    head, sep, rest = readme.partition(TABLE_MARKERS[0])
    _, sep2, tail = rest.partition(TABLE_MARKERS[1])
    if not (sep and sep2):
        raise SystemExit(f"error: {args.readme} has no {TABLE_MARKERS[0]} ... {TABLE_MARKERS[1]} block")
    args.readme.write_text(head + readme_block(report) + tail)
    print(f"[main] published {args.docs_dir / 'report.json'}, {card}, and the table in {args.readme}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.publish:
        return publish(args)
    if args.record_curve:
        return record_curve(args)
    report = run(args)
    print("\n" + "\n".join(comparison_table(report)) + "\n", flush=True)
    print("\n".join(budget_lines(report)) + "\n", flush=True)
    print(f"[main] report: {args.out / 'report.md'}  card: {report['card']}", flush=True)
    print("[main] publish it with: python recipes/main.py --publish  (or make publish-main)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe("main.py", main))
