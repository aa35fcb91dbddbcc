"""The README's usage example runs exactly as printed."""

from __future__ import annotations

import re
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
