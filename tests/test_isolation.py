"""The suite's own hygiene: it never reads or fills the user's ptune cache, and its property tests draw the same
examples on every run (conftest.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import settings

from ptune.backbone import cache_base

from .conftest import SESSION_CACHE
from .test_cli import ENV


def test_the_session_uses_its_own_ptune_cache():
    assert cache_base() == SESSION_CACHE
    assert ENV["PTUNE_CACHE"] == str(SESSION_CACHE)  # subprocesses (ptune train/eval/...) too
    if not os.environ.get("PTUNE_TEST_CACHE"):
        user = Path.home() / ".cache" / "ptune"
        assert not SESSION_CACHE.resolve().is_relative_to(user.resolve())
        assert SESSION_CACHE.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())


def test_property_tests_are_derandomized():
    if os.environ.get("HYPOTHESIS_PROFILE", "ptune") == "ptune":
        assert settings.default.derandomize and settings.default.database is None
