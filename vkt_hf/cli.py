"""The ``vkt-hf`` command line.

Each subcommand is one ``add_<name>_parser(subparsers)`` function that adds its parser and sets
``func`` (the function run with the parsed arguments, returning an exit code). To add a
subcommand, write such a function and append it to :data:`SUBCOMMANDS`.

Example::

    vkt-hf convert .cache/vkt-hf/smollm2-135m-instruct .cache/vkt-hf/smollm2-vkt-half --layers even
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .cards import write_model_card
from .convert import ConversionError, family_for, resolve_layers
from .models.vkt_hybrid import convert_to_vkt

DTYPES = ("auto", "float32", "bfloat16", "float16")


class CLIError(Exception):
    """A user-facing error: printed as ``vkt-hf <command>: error: <message>``, exit code 2."""


def _progress(message: str) -> None:
    """Print a step of a long command to stderr."""
    print(f"> {message}", file=sys.stderr, flush=True)


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` -> ``(key, value)``; the value is read as JSON when it parses (``16``, ``true``, ``1e-6``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


# ----------------------------------------------------------------------------------------------- convert


def resolve_source(src: str, gguf_file: str | None) -> str:
    """Check ``src`` (a local directory or a Hub id) before anything is loaded.

    A local directory must hold ``config.json`` (or the GGUF file given). Anything that looks like
    a path (``./x``, ``/x``, ``~/x``, ``x/y/z``) but does not exist is an error; ``org/name`` that is
    not a local directory is treated as a Hub id and resolved by transformers (real Hub path).
    """
    path = Path(src).expanduser()
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise CLIError(f"GGUF file {gguf_file!r} not found in {path}")
        elif not (path / "config.json").is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise CLIError(f"{path} has no config.json (found: {found}); give --gguf-file for a GGUF checkpoint")
        return str(path)
    if path.exists():
        raise CLIError(f"{src} is a file; SRC must be a checkpoint directory or a Hub id")
    if src.startswith((".", "/", "~")) or src.count("/") > 1:  # a path, not a Hub id
        raise CLIError(f"source {src!r} does not exist (expected a local checkpoint directory or a Hub id org/name)")
    return src  # a Hub id


def run_convert(args: argparse.Namespace) -> int:
    """``vkt-hf convert``: load SRC, convert the chosen layers, save the hybrid and the tokenizer to OUT."""
    src = resolve_source(args.src, args.gguf_file)
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"output directory {out} is not empty (use --overwrite)")
    load_kwargs: dict[str, Any] = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    vkt_options = dict(args.vkt_option or [])

    _progress(f"reading the config of {src}")
    try:
        config = AutoConfig.from_pretrained(src, **load_kwargs)
    except (OSError, ValueError) as err:
        kind = "directory" if Path(src).expanduser().is_dir() else "Hub id (no local directory of that name)"
        raise CLIError(f"cannot read a config from {kind} {src!r}: {err}") from err
    check_weights_match_config(src, config)  # before anything the size of the config is allocated
    try:
        family = family_for(config)
        layers = resolve_layers(args.layers, getattr(config, "num_hidden_layers", None) or config.n_layer)
    except ConversionError as err:
        raise CLIError(str(err)) from err
    _progress(f"{family.name}: converting layers {layers or 'none'} with preset {args.preset!r}")

    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    _progress(f"loading weights (dtype {args.dtype})")
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **load_kwargs)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load the model from {src}: {err}") from err
    try:
        hybrid = convert_to_vkt(model, layers, preset=args.preset, progress=True, **vkt_options)
    except ConversionError as err:
        raise CLIError(str(err)) from err

    _progress(f"saving to {out}")
    hybrid.save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(src, **load_kwargs).save_pretrained(out)
    except (OSError, ValueError) as err:
        _progress(f"warning: no tokenizer saved ({err})")
    new = sum(p.numel() for name, p in hybrid.named_parameters() if _is_new_parameter(name))
    _progress(f"done: {len(layers)}/{len(family.layers(model))} layers VKT, {new:,} new parameters -> {out}")
    return 0


def checkpoint_shapes(src: str) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes of the tensors in a local checkpoint's ``*.safetensors`` files, read from their
    headers (no weights loaded); ``None`` for a Hub id or a checkpoint in another format."""
    path = Path(src).expanduser()
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            shapes.update({name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()})
    return shapes


def check_weights_match_config(src: str, config: Any) -> None:
    """Refuse a checkpoint whose weights its config does not describe (a wrong ``model_type``, a config
    from another model), before a model of the config's size is built: the model is laid out on the
    ``meta`` device (no memory) and its tensors compared with the checkpoint's, by name and shape."""
    shapes = checkpoint_shapes(src)
    if not shapes:
        return
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise CLIError(f"the config of {src} does not describe a causal LM transformers can build: {err}") from err
    prefix = f"{model.base_model_prefix}."
    have = {name.removeprefix(prefix): shape for name, shape in shapes.items()}
    expected = {name.removeprefix(prefix): tuple(p.shape) for name, p in model.named_parameters()}
    matching = sum(have.get(name) == shape for name, shape in expected.items())
    want = sum(p.numel() for p in model.parameters())
    held = sum(math.prod(shape) for shape in shapes.values())
    if matching >= len(expected) / 2 and want <= 1.5 * held:
        return
    example = next(iter(sorted(set(have) - set(expected))), "?")
    raise CLIError(
        f"the weights in {src} do not match its config (model_type {config.model_type!r}): {matching} of "
        f"{len(expected)} tensors the config describes are there with the right shape, and it describes "
        f"{want:,} parameters where the weights hold {held:,} (e.g. the checkpoint has {example!r}); "
        "is config.json's model_type right?"
    )


def _is_new_parameter(name: str) -> bool:
    return any(k in name for k in ("importance", "null_context", "null_value", "decay_logit", "readout_gate"))


def add_convert_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a GPT-2 / Llama-family checkpoint to VKT (whole or hybrid)",
        description="Convert a pretrained checkpoint to VKT-Attention and save it in a format that "
        "AutoModelForCausalLM.from_pretrained reloads (after `import vkt_hf`). See docs/conversion.md.",
    )
    parser.add_argument("src", help="local checkpoint directory or Hugging Face Hub id")
    parser.add_argument("out", help="output directory")
    parser.add_argument(
        "--layers",
        default="all",
        help="layers to convert: 'all' (default), 'none', 'even', 'odd', or indices like '0,2,4' / '0-5'",
    )
    parser.add_argument(
        "--preset", default="default", choices=("default", "paper"), help="VKT preset (default: %(default)s)"
    )
    parser.add_argument(
        "--gguf-file", default=None, help="load SRC/GGUF_FILE (a GGUF checkpoint) instead of safetensors"
    )
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (default: that of SRC)")
    parser.add_argument(
        "--vkt-option",
        action="append",
        type=parse_option,
        metavar="KEY=VALUE",
        help="override a VKT option, e.g. --vkt-option local_window=32 (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    parser.set_defaults(func=run_convert)


# ----------------------------------------------------------------------------------------------- card


def run_card(args: argparse.Namespace) -> int:
    """``vkt-hf card``: write the model card of a training run from its own JSON."""
    try:
        path = write_model_card(args.run_dir, out=args.out, name=args.name, ablation=args.ablation)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from err
    _progress(f"model card: {path}")
    return 0


def add_card_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "card",
        help="write a model card (YAML metadata, measured metrics, plots) from a training run",
        description="Write RUN_DIR/README.md (or OUT/<name>.md) from RUN_DIR/run.json and RUN_DIR/eval/results.json.",
    )
    parser.add_argument("run_dir", help="a run folder written by recipes/train.py")
    parser.add_argument("--out", default=None, help="a folder (writes <name>.md there) or a .md path")
    parser.add_argument("--name", default=None, help="card / model name (default: the run's name)")
    parser.add_argument(
        "--ablation", default=None, help="include this ablation JSON (docs/ablation.json) and its plot"
    )
    parser.set_defaults(func=run_card)


# ----------------------------------------------------------------------------------------------- explain


def run_explain(args: argparse.Namespace) -> int:
    """``vkt-hf explain``: draw each token shaded by its scalar attention ``a``."""
    # imported here, not at the top: they need the `plots` / `train` extras, which `convert` does not
    from .data import get_tokenizer
    from .explain import importance_map, render_html, render_png

    if not Path(args.model).expanduser().exists() and args.model.count("/") != 1:
        raise CLIError(f"{args.model!r} is neither a local model folder nor a Hub id")
    if args.text_file and not Path(args.text_file).is_file():
        raise CLIError(f"--text-file {args.text_file}: no such file")
    text = Path(args.text_file).read_text() if args.text_file else args.text
    if not text:
        raise CLIError("give the text to explain (TEXT or --text-file)")
    _progress(f"loading {args.model}")
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load a model from {args.model!r}: {err}") from err
    try:
        tokenizer = get_tokenizer(args.tokenizer or args.model)
    except (OSError, ValueError) as err:
        raise CLIError(f"no tokenizer in {args.model}: pass --tokenizer (a folder, a Hub id or 'byte')") from err
    try:
        imap = importance_map(model, tokenizer, text, max_tokens=args.max_tokens)
    except ValueError as err:
        raise CLIError(str(err)) from err
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(imap, title=f"VKT importance map: {args.model}"))
    png = render_png(imap, out.with_suffix(".png"))
    for note in imap.notes:
        _progress(f"note: {note}")
    _progress(f"wrote {out} and {png}")
    return 0


def add_explain_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="importance map: each token shaded by its scalar attention, per layer and head (HTML + PNG)",
        description="Run TEXT through MODEL (a VKT model or a converted hybrid) and draw the scalar attentions.",
    )
    parser.add_argument("model", help="a saved VKT / converted model folder, or a Hub id")
    parser.add_argument("text", nargs="?", default=None, help="the text to explain")
    parser.add_argument("--text-file", default=None, help="read the text from this file instead")
    parser.add_argument(
        "--out",
        default="runs/explain/importance.html",
        help="the HTML page (the PNG goes beside it; default: %(default)s)",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder / Hub id / 'byte' (default: the model's)")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.set_defaults(func=run_explain)


# ----------------------------------------------------------------------------------------------- main

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_convert_parser,
    add_card_parser,
    add_explain_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vkt-hf", description="VKT-Attention for Hugging Face Transformers")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vkt-hf``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as err:
        print(f"vkt-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
