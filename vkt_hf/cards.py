"""Model cards written only from a run's own JSON (``run.json`` from ``recipes/train.py`` and,
when present, ``eval/results.json`` from ``recipes/eval.py``).

The YAML header is built with ``huggingface_hub.ModelCardData`` (license, base_model,
datasets, tags, ``model-index`` with the measured metrics), so the Hub reads it as it reads
any card; nothing is fetched. Plots found in the run are embedded by relative path.

    vkt-hf card RUN_DIR                      # writes RUN_DIR/README.md
    vkt-hf card RUN_DIR --out model_cards/   # writes model_cards/<name>.md (plots copied beside it)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

DEFAULT_TAGS = ["vkt", "vkt-attention", "linear-attention", "text-generation", "transformers"]


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run, with ``eval/results.json`` under ``"eval"`` when it exists."""
    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a model card is written from a finished run's run.json")
    run = json.loads(path.read_text())
    results = run_dir / "eval" / "results.json"
    if results.exists():
        run["eval"] = json.loads(results.read_text())
    return run


def _metrics(run: dict[str, Any]) -> list[tuple[str, str, float]]:
    """``(metric type, readable name, value)`` of every measured number worth indexing."""
    final, ev = run.get("final", {}), run.get("eval", {})
    rows: list[tuple[str, str, float]] = []
    if "val_loss" in final:
        rows += [
            ("loss", "validation loss (nats/token)", final["val_loss"]),
            ("perplexity", "validation perplexity", final["val_ppl"]),
            ("bits_per_byte", "validation bits per byte", final["val_bpb"]),
        ]
    if "perplexity" in ev:
        rows.append(("perplexity", f"perplexity ({ev['perplexity']['tokens']} tokens)", ev["perplexity"]["ppl"]))
    if "streaming" in ev:
        s = ev["streaming"]
        rows.append(
            ("perplexity", f"streaming perplexity ({s['tokens']} tokens, chunks of {s['chunk_size']})", s["ppl"])
        )
    if "position_buckets" in ev:
        p = ev["position_buckets"]
        rows.append(("perplexity", f"perplexity over {p['context_length']}-token segments", p["ppl"]))
    if "passkey" in ev:
        rows.append(("accuracy", "passkey retrieval exact match", ev["passkey"]["accuracy"]))
    for text, by_length in ev.get("perplexity_at", {}).items():  # {text: {length: ppl}} (recipes/main.py)
        rows += [("perplexity", f"perplexity at {length} tokens ({text})", ppl) for length, ppl in by_length.items()]
    return [(kind, name, round(float(value), 4)) for kind, name, value in rows]


def uses_vkt(run: dict[str, Any]) -> bool:
    """Whether the run's model has VKT layers (baselines trained by the same recipe have none)."""
    mixers = run.get("model", {}).get("mixer_types")
    return not mixers or "vkt" in mixers


def _display_path(path: Any) -> Any:
    """A local path shown relative to the working directory (no machine-specific prefixes)."""
    if not isinstance(path, str) or not Path(path).is_absolute():
        return path
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return Path(path).name


def card_metadata(run: dict[str, Any], license: str = "apache-2.0") -> ModelCardData:
    """The card's YAML metadata (``ModelCardData``) for a run."""
    name = run.get("name", "vkt-model")
    base = run.get("model", {}).get("base_model")
    dataset = run.get("data", {}).get("source", "text")
    dataset_name = run.get("data", {}).get("name") or (Path(dataset).name if Path(dataset).exists() else dataset)
    results = [
        EvalResult(
            task_type="text-generation",
            task_name="Causal language modeling",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split="validation (held-out documents)",
            metric_type=kind,
            metric_name=metric_name,
            metric_value=value,
        )
        for kind, metric_name, value in _metrics(run)
    ]
    return ModelCardData(
        license=run.get("license", license),
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base if base and not Path(base).exists() else None,
        datasets=None if Path(dataset).exists() else [dataset],
        tags=[t for t in DEFAULT_TAGS if uses_vkt(run) or not t.startswith(("vkt-", "linear"))]
        + [run.get("mode", "pretrain")],
        model_name=name,
        eval_results=results or None,
    )


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def same_budget_table(record: dict[str, Any], reference: str = "original") -> str:
    """The rows of a same-budget comparison (``scripts/same_budget.py``, e.g. ``docs/quality/same_budget.json``)
    as a markdown table: perplexities, also as a ratio to ``reference``'s, and passkey accuracies."""
    rows = record["results"]
    first = list(next(iter(rows.values())))  # "text@length" keys; passkey accuracies last
    texts = list(dict.fromkeys(c.split("@")[0] for c in first))
    columns = sorted(
        first, key=lambda c: (c.startswith("passkey"), texts.index(c.split("@")[0]), int(c.split("@")[1]))
    )
    ref = rows.get(reference, {})
    lines = ["| model | " + " | ".join(c.replace("@", " @") for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in rows.items():
        cells = []
        for column in columns:
            value = row.get(column)
            if value is None:
                cells.append("")
            elif column.startswith("passkey"):
                cells.append(f"{value:.0%}")
            elif name != reference and column in ref:
                cells.append(f"{value:.2f} ({value / ref[column]:.2f}x)")
            else:
                cells.append(f"{value:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_section(ablation: dict[str, Any], plot: str | None) -> list[str]:
    """Markdown lines summarising an ablation JSON written by ``recipes/ablate.py``."""
    budget = max(ablation["args"]["steps"])
    lines = [
        "",
        "## The ablation behind the default preset",
        "",
        f"From `recipes/ablate.py` (see `docs/ablation.md`): validation bits per byte after {budget} steps, "
        f"mean ± half the range over seeds {ablation['args']['seeds']}, and the fraction of the "
        "no-mixing → softmax gap each variant closes.",
        "",
        "| variant | bits/byte | gap closed |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['variant']} | {r[f'bpb@{budget}']:.3f} ± {r[f'spread@{budget}']:.3f} | {r[f'gap@{budget}']:.2f} |"
        for r in ablation["rows"]
    ]
    return lines + (["", f"![ablation]({plot})"] if plot else [])


def card_body(
    run: dict[str, Any], plots: list[str], ablation: dict[str, Any] | None = None, sections: list[str] | None = None
) -> str:
    """The markdown body: what the model is, how it was trained, what was measured (``sections``:
    markdown lines a job adds after the results)."""
    model, data, cfg, final = run.get("model", {}), run.get("data", {}), run.get("config", {}), run.get("final", {})
    mixers = model.get("mixer_types") or []
    kinds = ", ".join(f"{m} x{mixers.count(m)}" for m in dict.fromkeys(mixers)) or "see config.json"
    lines = [
        f"# {run.get('name', 'vkt-model')}",
        "",
        (
            "A causal language model using VKT-Attention (scalar, O(n) attention) through the "
            "vkt-hf integration for transformers."
            if uses_vkt(run)
            else f"A baseline without VKT layers ({kinds}), trained by vkt-hf's recipes for comparison."
        )
        + " Load it with `import vkt_hf` then `AutoModelForCausalLM.from_pretrained(path)`.",
        "",
        "## Training",
        "",
        _table(
            [
                ("mode", run.get("mode")),
                ("model class", model.get("class")),
                ("mixers per layer", kinds),
                ("parameters", f"{model.get('parameters', 0):,}"),
                ("trainable parameters", f"{model.get('trainable_parameters', 0):,}"),
                ("base model", _display_path(model.get("base_model")) or "none (trained from scratch)"),
                ("data", _display_path(data.get("source"))),
                ("tokenizer", _display_path(data.get("tokenizer"))),
                ("sequence length", data.get("seq_len")),
                ("validation documents", ", ".join(data.get("val_documents", [])[:8])),
                (
                    "steps x batch x accumulation",
                    f"{final.get('step')} x {cfg.get('batch_size')} x {cfg.get('grad_accum')}",
                ),
                ("tokens seen", f"{final.get('tokens', 0):,}"),
                ("learning rate (cosine, warmup)", f"{cfg.get('lr')} ({cfg.get('warmup_steps')} warmup steps)"),
                ("training time", f"{final.get('train_time_s')} s on {run.get('world_size', 1)} process(es)"),
            ]
        ),
        "",
        "## Results",
        "",
        "Measured by the run itself on held-out documents (none of their text was trained on).",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for _, name, value in _metrics(run)),
    ]
    ev = run.get("eval", {})
    if "position_buckets" in ev:
        lines += ["", "Perplexity by token position:", "", "| positions | perplexity |", "|---|---|"]
        lines += [f"| {b['start']}-{b['end']} | {b['ppl']:.3f} |" for b in ev["position_buckets"]["buckets"]]
    if "passkey" in ev:
        lines += ["", "Passkey retrieval (exact match):", "", "| context | depth | accuracy |", "|---|---|---|"]
        lines += [f"| {r['context_length']} | {r['depth']} | {r['accuracy']:.2f} |" for r in ev["passkey"]["results"]]
    lines += ["", *sections] if sections else []
    ablation_plot = next((p for p in plots if Path(p).stem == "ablation"), None)
    plots = [p for p in plots if p != ablation_plot]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    if ablation:
        lines += ablation_section(ablation, ablation_plot)
    if ev.get("samples"):
        lines += ["", "## Samples", ""]
        for s in ev["samples"]:
            lines += [f"**Prompt:** {s['prompt']!r}", "", "```text", s["prompt"] + s["completion"], "```", ""]
    lines += [
        "",
        "## Limitations",
        "",
        "A research model trained on a small budget; its numbers describe this run only. "
        "Generated text is not reliable.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    run_dir: str | Path,
    out: str | Path | None = None,
    name: str | None = None,
    ablation: str | Path | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the card of the run in ``run_dir``.

    Args:
        run_dir: a training run (``run.json``; optional ``eval/results.json`` and ``*.png`` plots).
        out: ``None`` -> ``RUN_DIR/README.md`` (also ``RUN_DIR/model/README.md`` when the model
            folder exists, so a pushed model carries its card); a directory -> ``<out>/<name>.md``
            with the plots copied to ``<out>/<name>_assets/``; a ``.md`` path -> that file.
        name: card name (default: the run's name).
        ablation: an ablation JSON (``docs/ablation.json``, from ``recipes/ablate.py``) whose table
            and plot (the ``.png`` beside it) go into the card. The plot is linked where it is
            (by relative path), not copied: the repository keeps one copy of it.
        extra: what a job adds to the run's own JSON (``recipes/main.py``): ``"eval"`` (results, in
            place of ``eval/results.json``), ``"plots"`` (more PNG files, linked or copied like the
            run's), ``"sections"`` (markdown lines after the results) and ``"run"`` (entries of
            ``run.json`` to override, e.g. ``{"model": {"base_model": ...}}``).

    Returns:
        The path of the card written.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    if name:
        run["name"] = name
    extra = extra or {}
    run["eval"] = extra.get("eval", run.get("eval", {}))
    for key, value in extra.get("run", {}).items():  # e.g. {"model": {"base_model": hub id}}
        run[key] = {**run.get(key, {}), **value} if isinstance(value, dict) else value
    plot_files = sorted(run_dir.glob("*.png")) + sorted(run_dir.glob("eval/*.png"))
    plot_files += [Path(p) for p in extra.get("plots", [])]
    ablation_data, ablation_plot = None, None
    if ablation is not None:
        ablation = Path(ablation)
        if not ablation.is_file():
            raise FileNotFoundError(f"{ablation}: no ablation JSON there (run recipes/ablate.py first)")
        ablation_data = json.loads(ablation.read_text())
        if ablation.with_suffix(".png").is_file():
            ablation_plot = ablation.with_suffix(".png").resolve()
    if out is None:
        target = run_dir / "README.md"
    else:
        out = Path(out)
        target = out if out.suffix == ".md" else out / f"{run['name']}.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    # plots already beside the card are linked; the others are copied to <card>_assets/
    assets = target.parent / f"{target.stem}_assets"
    plots = []
    for p in plot_files:
        if p.resolve().is_relative_to(target.parent.resolve()):
            plots.append(str(p.resolve().relative_to(target.parent.resolve())))
        else:
            assets.mkdir(exist_ok=True)
            shutil.copy2(p, assets / p.name)
            plots.append(f"{assets.name}/{p.name}")
    if ablation_plot is not None:
        plots.append(Path(os.path.relpath(ablation_plot, target.parent.resolve())).as_posix())
    text = f"---\n{card_metadata(run).to_yaml()}\n---\n\n{card_body(run, plots, ablation_data, extra.get('sections'))}"
    target.write_text(text, encoding="utf-8")
    if out is None and (run_dir / "model").is_dir():
        model_plots = [f"../{p}" for p in plots]
        (run_dir / "model" / "README.md").write_text(
            f"---\n{card_metadata(run).to_yaml()}\n---\n\n"
            f"{card_body(run, model_plots, ablation_data, extra.get('sections'))}",
            encoding="utf-8",
        )
    return target
