"Shared settings for the test suite: quiet progress bars, a headless plotting backend, the repository root."
import os
from pathlib import Path

import pytest

os.environ.setdefault("LOWRANK_TALES_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    "The repository root."
    return ROOT
