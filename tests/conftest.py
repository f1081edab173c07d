"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data directory ($PMET_DATA_DIR, default ../../shared/data); skips the test if missing."""
    path = Path(os.environ.get("PMET_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"benchmark data not found at {path} (set PMET_DATA_DIR)")
    return path
