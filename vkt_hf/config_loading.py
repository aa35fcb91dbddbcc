"""Run configs for the recipes: the fields of a dataclass <- a YAML file <- command-line flags.

``load_dataclass(TrainConfig, argv)`` reads ``--config FILE.yaml`` then one ``--<field>`` flag per
field; an unknown key in the YAML (a misspelled field) is an error, not silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


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
    values: dict[str, Any] = dict(yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    values.update(args)
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown config fields {unknown}")
    return cls(**values)
