"""Run configs for the recipes: the fields of a dataclass <- a YAML file <- command-line flags.

``load_dataclass(TrainConfig, argv)`` reads ``--config FILE.yaml`` then one ``--<field>`` flag per
field; an unknown key in the YAML (a misspelled field) is an error, not silently ignored.

Errors a user can fix (a misspelled key, a missing file or folder, a bad value) are
:class:`ConfigError`; :func:`run_recipe` prints them as one line and exits with code 2, as the
``vkt-hf`` command does, and turns Ctrl-C into a line that says where the run stopped.
:func:`write_text_atomic` writes the small JSON files a run resumes from.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A mistake in a run's configuration or inputs: printed as one line, exit code 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a message that says where the run stopped and how to resume it."""


def run_recipe(name: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a recipe's ``main``: a :class:`ConfigError` (or a missing file) is one line on stderr and exit
    code 2, Ctrl-C one line (what :class:`Interrupted` says) and exit code 130; anything else is a bug
    and keeps its traceback."""
    try:
        return main(argv)
    except (ConfigError, FileNotFoundError) as err:
        print(f"{name}: error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as err:
        print(f"{name}: {err if str(err) else 'interrupted'}", file=sys.stderr, flush=True)
        return 130


def unknown_keys_error(what: str, unknown: Iterable[str], known: Iterable[str]) -> ConfigError:
    """``unknown <what> ['hiden_size'] (did you mean 'hidden_size'?)``."""
    unknown, known = sorted(unknown), sorted(known)
    hints = [f"{key!r} -> {match[0]!r}" for key in unknown if (match := difflib.get_close_matches(key, known, 1))]
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return ConfigError(f"unknown {what} {unknown}{hint}")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a kill at any moment leaves either the old file or the new one,
    never an empty or partial one: a temporary file beside it, flushed to disk, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def looks_like_path(text: str) -> bool:
    """Whether ``text`` names a local file or folder rather than a Hub id (``org/name``) or a glob."""
    if any(c in text for c in "*?["):
        return False
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or Path(text).suffix in (".txt", ".json", ".yaml")


def check_local(text: str | None, what: str, hint: str = "") -> None:
    """Raise :class:`ConfigError` when ``text`` looks like a local path (not a Hub id) and does not exist."""
    if text and looks_like_path(text) and not os.path.exists(os.path.expanduser(text)):
        raise ConfigError(f"{what} {text!r} does not exist{hint}")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def parser_for(kind: str):
    """A flag parser for a field annotated ``kind`` (``"int | None"``, ``"float"``, ``"list[str]"``, ...).

    Scalars are parsed by type (YAML would read ``2e-4`` as a string); lists and dicts as YAML.
    """
    base = kind.split("|")[0].strip()
    scalar = {"bool": parse_bool, "int": int, "float": float, "str": str}.get(base)
    if scalar is None:
        return yaml.safe_load
    if "None" not in kind:
        return scalar
    return lambda text: None if text.lower() in ("none", "null", "") else scalar(text)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def dataclass_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """``--config FILE.yaml`` plus one ``--<field>`` flag per field of the dataclass ``cls``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of fields (flags override it)")
    for f in dataclasses.fields(cls):
        parser.add_argument(
            f"--{f.name}", type=parser_for(str(f.type)), default=argparse.SUPPRESS, help=f"(default: {_default(f)})"
        )
    return parser


def load_dataclass(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """An instance of ``cls`` from ``--config`` YAML, then flags; unknown YAML keys are an error."""
    args = vars(dataclass_parser(cls, description).parse_args(argv))
    path = args.pop("config", None)
    values: dict[str, Any] = read_yaml(path) if path else {}
    values.update(args)
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise unknown_keys_error(
            f"config fields{f' in {path}' if path else ''}", unknown, (f.name for f in dataclasses.fields(cls))
        )
    return cls(**values)


def read_yaml(path: str) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (:class:`ConfigError` when missing or not a mapping)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must be a mapping of config fields, got {type(values).__name__}")
    return values
