#!/usr/bin/env python3
"""The ablation of the paper's open choices: same-size models, same data, steps and seeds.

Every variant is a ``pretrain`` run of :mod:`vkt_hf.training` on the book corpus (byte-level,
so no tokenizer download). The table reports validation bits per byte at two budgets (both
read from the same run's periodic evals), mean and spread over seeds, the rank at each
budget, and the fraction of the no-mixing -> softmax gap each variant closes::

    python recipes/ablate.py --steps 300 900 --seeds 0 1 --output_dir runs/ablation --doc docs/ablation.md

Runs that finished are reused (each variant/seed has its own ``output_dir``, and
training resumes), so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from vkt_hf.config_loading import run_recipe
from vkt_hf.training import TrainConfig, train

# name -> (mixer of every layer or a per-layer list, VKTConfig overrides). One open choice at a time,
# starting from the word-for-word `paper` preset, then the `default` preset and hybrids.
PAPER = {"preset": "paper"}
DEFAULT = {"preset": "default"}
VARIANTS: dict[str, tuple[Any, dict[str, Any]]] = {
    "no mixing": ("none", {}),
    "softmax attention": ("softmax", {}),
    "paper": ("vkt", PAPER),
    "paper + normalization=softsign": ("vkt", {**PAPER, "normalization": "softsign"}),
    "paper + normalization=sigmoid": ("vkt", {**PAPER, "normalization": "sigmoid"}),
    "paper + normalization=tanh": ("vkt", {**PAPER, "normalization": "tanh"}),
    "paper + normalization=none": ("vkt", {**PAPER, "normalization": "none"}),
    "paper + importance=projection": ("vkt", {**PAPER, "importance": "projection"}),
    "paper + context_source=key": ("vkt", {**PAPER, "context_source": "key"}),
    "paper + gated_value=value": ("vkt", {**PAPER, "gated_value": "value"}),
    "paper + context_weights=uniform": ("vkt", {**PAPER, "context_weights": "uniform"}),
    "paper + distance_decay": ("vkt", {**PAPER, "distance_decay": True}),
    "paper + local_window=4": ("vkt", {**PAPER, "local_window": 4}),
    "paper + local_window=64": ("vkt", {**PAPER, "local_window": 64}),
    "paper + readout": ("vkt", {**PAPER, "readout": True}),
    "default (readout + decay + key/value + softsign)": ("vkt", DEFAULT),
    "default - distance_decay": ("vkt", {**DEFAULT, "distance_decay": False}),
    "default - readout": ("vkt", {**DEFAULT, "readout": False}),
    "default, 1/4 softmax layers": (["vkt", "vkt", "vkt", "softmax"], DEFAULT),
    "default, 1/2 softmax layers": (["vkt", "softmax", "vkt", "softmax"], DEFAULT),
}


def window_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """The exact local softmax window (docs/method.md): ``w`` tokens, alone (``vkt_terms=False``) or with the
    default preset's VKT terms, without a sink, with the kept first token, or (w = 64) with a learned sink."""
    window = {**DEFAULT, "local_attention": True}
    no_sink, sink, learned = {"sink_tokens": 0}, {"sink_tokens": 1}, {"sink_tokens": 0, "learned_sink": True}
    grid = [(16, "", no_sink), (16, " + sink", sink), (64, "", no_sink), (64, " + sink", sink)]
    variants = {}
    for w, label, sink_options in [*grid, (64, " + learned sink", learned)]:
        options = {**window, "local_attention_window": w, **sink_options}
        variants[f"default + window {w}{label}"] = ("vkt", options)
        variants[f"window {w}{label} alone"] = ("vkt", {**options, "vkt_terms": False})
    # the default preset's gated global read-out kept as it is without the window (not a slot of its softmax)
    variants["default + window 64 + sink, global_readout=add"] = (
        "vkt",
        {**variants["default + window 64 + sink"][1], "global_readout": "add"},
    )
    return variants


VARIANTS.update(window_variants())
BASE_MODEL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4)
GENERATED_END = "<!-- end of the generated part: hand-written notes below are kept on reruns -->"
O_N = ("no mixing", "softmax attention", "default, 1/4 softmax layers", "default, 1/2 softmax layers")


def run_variant(name: str, seed: int, args: argparse.Namespace) -> dict[int, float]:
    """Train one variant with one seed; return ``{step: val_bpb}`` at every eval."""
    mixer, overrides = VARIANTS[name]
    model_config = {**BASE_MODEL, **overrides}
    if isinstance(mixer, list):
        model_config["mixer_types"] = mixer
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    out = Path(args.output_dir) / f"{slug}__seed{seed}"
    cfg = TrainConfig(
        output_dir=str(out),
        run_name=f"{name} (seed {seed})",
        seed=seed,
        data=args.data,
        tokenizer="byte",
        seq_len=args.seq_len,
        model_config=model_config,
        mixer=None if isinstance(mixer, list) else mixer,
        max_steps=max(args.steps),
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=max(1, max(args.steps) // 20),
        eval_every=min(args.steps),
        eval_batches=args.eval_batches,
        save_every=min(args.steps),
        log_every=50,
        progress=False,
        max_chars=args.max_chars,
        val_documents=list(args.val_documents),  # the same held-out books for every variant and seed
    )
    if not (out / "run.json").exists():
        train(cfg)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_bpb" in line]
    evals = [e for e in evals if int(e["step"]) in args.steps]
    params = json.loads((out / "run.json").read_text())["model"]["parameters"]
    return {"params": params, **{int(e["step"]): float(e["val_bpb"]) for e in evals}}


def summarise(results: dict[str, list[dict]], budgets: list[int]) -> list[dict[str, Any]]:
    """Mean/spread per variant and budget, rank, and the fraction of the none -> softmax gap closed."""
    rows = []
    for name, runs in results.items():
        row: dict[str, Any] = {"variant": name, "params": runs[0]["params"], "seeds": len(runs)}
        for b in budgets:
            values = [r[b] for r in runs]
            row[f"bpb@{b}"] = statistics.mean(values)
            row[f"spread@{b}"] = (max(values) - min(values)) / 2
        rows.append(row)
    for b in budgets:
        ranked = sorted(rows, key=lambda r: r[f"bpb@{b}"])
        for rank, row in enumerate(ranked, 1):
            row[f"rank@{b}"] = rank
        lo = next(r for r in rows if r["variant"] == "no mixing")[f"bpb@{b}"]
        hi = next(r for r in rows if r["variant"] == "softmax attention")[f"bpb@{b}"]
        for row in rows:
            row[f"gap@{b}"] = (lo - row[f"bpb@{b}"]) / (lo - hi) if lo != hi else float("nan")
    return sorted(rows, key=lambda r: r[f"bpb@{budgets[-1]}"])


def write_report(rows: list[dict], budgets: list[int], args: argparse.Namespace, doc: Path) -> None:
    """``doc`` (the table, kept hand-written notes below the marker), its plot and its JSON."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    b1, b2 = budgets[0], budgets[-1]
    best = next(r for r in rows if r["variant"] not in O_N)
    lines = [
        "# Ablation of the paper's open choices",
        "",
        "Generated by `python recipes/ablate.py "
        + " ".join(
            f"--{k} {shlex.join(map(str, v)) if isinstance(v, list) else shlex.quote(str(v))}"
            for k, v in vars(args).items()
            if v is not None and not (k == "variants" and v == list(VARIANTS))
        )
        + "`. Everything above the closing marker is generated; what follows it is kept on reruns.",
        "",
        f"Byte-level language models ({BASE_MODEL['num_hidden_layers']} layers, width {BASE_MODEL['hidden_size']}, "
        f"{BASE_MODEL['num_attention_heads']} heads, {args.seq_len}-byte sequences, batch {args.batch_size}) "
        f"trained on the book corpus (`scripts/fetch_corpus.py`, validation by whole documents) for the same steps "
        f"and seeds ({', '.join(map(str, args.seeds))}). Validation **bits per byte** (lower is better), mean ± half "
        f"the range over seeds, at {b1} and {b2} steps; *gap* is the fraction of the no-mixing → softmax gap closed.",
        "",
        f"| variant | params | bpb @ {b1} | rank | gap | bpb @ {b2} | rank | gap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['params']:,} | {r[f'bpb@{b1}']:.3f} ± {r[f'spread@{b1}']:.3f} | {r[f'rank@{b1}']} "
            f"| {r[f'gap@{b1}']:.2f} | {r[f'bpb@{b2}']:.3f} ± {r[f'spread@{b2}']:.3f} | {r[f'rank@{b2}']} "
            f"| {r[f'gap@{b2}']:.2f} |"
        )
    lines += [
        "",
        f"Best O(N) variant at {b2} steps: **{best['variant']}** ({best[f'bpb@{b2}']:.3f} bpb, "
        f"{best[f'gap@{b2}']:.0%} of the gap).",
        "",
        "![ablation](ablation.png)",
        "",
        GENERATED_END,
    ]
    kept = doc.read_text().split(GENERATED_END, 1)[1] if doc.exists() and GENERATED_END in doc.read_text() else "\n"
    doc.write_text("\n".join(lines) + kept)
    plot_rows(rows, budgets, doc.with_suffix(".png"))
    (doc.with_suffix(".json")).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


def plot_rows(rows: list[dict], budgets: list[int], path: Path) -> None:
    """Validation bits per byte of every variant at both budgets, with the seed spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b1, b2 = budgets[0], budgets[-1]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    names = [r["variant"] for r in rows][::-1]
    for b, color in ((b1, "tab:gray"), (b2, "tab:blue")):
        ax.errorbar(
            [r[f"bpb@{b}"] for r in rows][::-1],
            range(len(rows)),
            xerr=[r[f"spread@{b}"] for r in rows][::-1],
            fmt="o",
            color=color,
            label=f"{b} steps",
        )
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.set_xlabel("validation bits per byte (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs=2, default=[300, 900], help="the two budgets (steps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="subset of variant names")
    parser.add_argument("--data", default=".cache/vkt-hf/corpus")
    parser.add_argument("--max_chars", type=int, default=None, help="cap the characters read per document")
    parser.add_argument(
        "--val_documents",
        nargs="+",
        default=["austen_persuasion", "shakespeare_hamlet"],
        help="held-out documents (names in the corpus manifest), fixed across variants and seeds",
    )
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval_batches", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (processes)")
    parser.add_argument("--output_dir", default="runs/ablation")
    parser.add_argument("--doc", default="docs/ablation.md")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not {"no mixing", "softmax attention"} <= set(args.variants):
        parser.error(
            f"unknown variants {unknown}; 'no mixing' and 'softmax attention' are required ({list(VARIANTS)})"
        )
    budgets = sorted(args.steps)
    jobs = [(name, seed) for name in args.variants for seed in args.seeds]
    partial = Path(args.output_dir) / "runs.json"  # finished runs so far (the doc is written at the end)
    partial.parent.mkdir(parents=True, exist_ok=True)
    done: dict[tuple[str, int], dict] = {}
    # runs are independent processes (spawned: safe with CUDA); each finished one is recorded at once
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_variant, name, seed, args): (name, seed) for name, seed in jobs}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            partial.write_text(json.dumps([{"variant": n, "seed": s, **r} for (n, s), r in done.items()], indent=1))
            print(f"[ablate] {len(done)}/{len(jobs)} runs done: {futures[future]}", flush=True)
    results = {name: [done[(name, seed)] for seed in args.seeds] for name in args.variants}
    rows = summarise(results, budgets)
    write_report(rows, budgets, args, Path(args.doc))
    print(Path(args.doc).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe("ablate.py", main))
