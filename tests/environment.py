"""Tests that need a system tool `make venv` installs (chromium, sshd, pdsh)."""

from __future__ import annotations

import os

import pytest


def missing(reason: str) -> None:
    """The tool is absent: a skip naming it on a developer's machine, a failure on CI (CI=true),
    where `make venv` installs it and a skip would hide a test that no longer runs."""
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason)
