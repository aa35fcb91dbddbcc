"""Shared fixtures. Builders live in ``tests/helpers.py`` (import them from there, not from here)."""

from __future__ import annotations

import pytest

from tests.helpers import TINY_VARIANTS


@pytest.fixture(params=list(TINY_VARIANTS))
def variant(request) -> str:
    """Each native tiny-model variant in turn (see :data:`tests.helpers.TINY_VARIANTS`)."""
    return request.param
