"""The shape of the package: one-way imports, plain-data configs, light ``import vkt_hf``, short functions.

The import checks read the source (``ast``): a module's imports are those of its top level
(inside ``if`` / ``try`` too), since an import inside a function is how a cycle gets hidden.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vkt_hf"

# the layers of the package, lowest first: a unit may import only from units before it
LAYERS = [
    ["vkt_hf.constants", "vkt_hf.utils"],
    ["vkt_hf.ops"],
    ["vkt_hf.cache"],
    ["vkt_hf.layers"],
    ["vkt_hf.models.vkt"],
    ["vkt_hf.convert"],
    ["vkt_hf.models.vkt_hybrid"],
    ["vkt_hf"],  # the package root, the public API: the rest (training, evaluation, CLI, ...) may use it
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
# dependencies that `import vkt_hf` (inference) must not need: they come with the extras
OPTIONAL = ["accelerate", "datasets", "peft", "matplotlib", "rich", "evaluate"]
MAX_FUNCTION_LINES = 100


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The unit a module belongs to: a package of :data:`LAYERS`, or the module itself."""
    for name in sorted(RANK, key=len, reverse=True):
        if module == name or (name != "vkt_hf" and module.startswith(name + ".")):
            return name
    return module


def imported_modules(path: Path, top_level_only: bool = True) -> set[str]:
    """The ``vkt_hf`` modules ``path`` imports (at its top level, or anywhere)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    nodes = _top_level(tree.body) if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("vkt_hf")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.startswith("vkt_hf"):
                found |= {
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
                }
    return found


def _top_level(body: list[ast.stmt]):
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            for block in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                yield from _top_level(block)
            for handler in getattr(node, "handlers", []):
                yield from _top_level(handler.body)


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(path) for path in FILES}


def test_units_import_each_other_one_way():
    edges: dict[str, set[str]] = {}
    for path in FILES:
        source = unit(module_name(path))
        for target in imported_modules(path):
            if unit(target) != source:
                edges.setdefault(source, set()).add(unit(target))
    for source, targets in edges.items():  # the layers of the core, in order
        for target in targets:
            if source in RANK and target in RANK:
                assert RANK[target] < RANK[source], f"{source} imports {target}, which sits above it"
            assert not (source in RANK and target not in RANK), f"{source} imports {target}, outside the core"

    def visit(node: str, stack: list[str]) -> None:
        assert node not in stack, f"import cycle: {' -> '.join([*stack[stack.index(node) :], node])}"
        for target in edges.get(node, ()):
            visit(target, [*stack, node])

    for node in edges:
        visit(node, [])


def test_no_imports_inside_functions_hide_a_dependency():
    """Only the CLI imports package modules inside functions (the commands that need extras)."""
    for path in FILES:
        if path.name == "cli.py":
            continue
        hidden = imported_modules(path, top_level_only=False) - imported_modules(path)
        assert not hidden, f"{path.relative_to(ROOT)} imports {sorted(hidden)} inside a function"


@pytest.mark.parametrize(
    "config", ["models/vkt/configuration_vkt.py", "models/vkt_hybrid/configuration_vkt_hybrid.py"]
)
def test_configs_are_plain_data(config):
    """Like transformers' configs, ours import the config base class and plain data, no math."""
    imports = imported_modules(PACKAGE / config, top_level_only=False)
    assert {unit(m) for m in imports} <= {"vkt_hf.constants", "vkt_hf.models.vkt"}, imports


def test_import_vkt_hf_needs_no_optional_dependency():
    code = (
        "import sys\n"
        f"for name in {OPTIONAL!r}:\n"
        "    sys.modules[name] = None  # as if not installed\n"
        "import torch, vkt_hf, vkt_hf.cli\n"
        "from tests.helpers import tiny_hybrid, tiny_model\n"
        "out = tiny_model().generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)\n"
        "tiny_hybrid('llama')(torch.tensor([[1, 2, 3]]))\n"
        "print('light-ok', out.shape[1])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "light-ok 6" in result.stdout, result.stderr[-3000:]


def test_no_function_is_longer_than_a_screenful():
    long = []
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
