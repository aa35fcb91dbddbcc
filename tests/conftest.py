"""Shared fixtures. Builders live in ``tests/helpers.py`` (import them from there, not from here)."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import TINY_VARIANTS


@pytest.fixture(params=list(TINY_VARIANTS))
def variant(request) -> str:
    """Each native tiny-model variant in turn (see :data:`tests.helpers.TINY_VARIANTS`)."""
    return request.param


def pytest_configure(config) -> None:
    # marks used inside transformers' own test files, which `tests/test_transformers_common.py` runs
    marks = ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "is_training_test")
    for mark in (*marks, "torch_compile_test"):
        config.addinivalue_line("markers", f"{mark}: a mark of transformers' own tests")


def pytest_terminal_summary(terminalreporter) -> None:
    """After a run of ``tests/test_fuzz.py``: how many cases ran, and how many properties failed."""
    fuzz = sys.modules.get("tests.test_fuzz") or sys.modules.get("test_fuzz")
    if fuzz is None or not getattr(fuzz, "CASES", None):
        return
    failed = [r for r in terminalreporter.stats.get("failed", []) if "test_fuzz.py" in r.nodeid]
    counts = ", ".join(f"{name} {n}" for name, n in fuzz.CASES.items())
    terminalreporter.write_line(f"fuzz: {sum(fuzz.CASES.values())} cases ({counts}); {len(failed)} failing properties")
