"""The README's usage example runs exactly as printed; its main-job table is the committed report."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_usage_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- usage-example -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README.md lost its usage example"
    assert len(block.group(1).strip().splitlines()) <= 12
    result = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "tokens" in result.stdout


def test_readme_main_job_table_is_the_committed_report():
    """The README's main-job block is generated from ``docs/main/report.json`` (``make publish-main``)."""
    main = runpy.run_path(str(ROOT / "recipes" / "main.py"), run_name="recipe_main")
    report = json.loads((ROOT / "docs" / "main" / "report.json").read_text())
    block = main["readme_block"](report)
    assert block in (ROOT / "README.md").read_text(), "README's main-job table differs from docs/main/report.json"
    assert "| perplexity, Persuasion, 512 / 2,048 tokens |" in block
