"Every notebook of the book executes top to bottom, as nbdev_test runs it (cells flagged `slow`, `cuda` or `notest` are skipped)."
from pathlib import Path

import pytest
import nbdev.test as nbt
from nbdev.config import get_config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").rglob("*.ipynb") if not p.name.startswith(("_", ".")) and ".ipynb_checkpoints" not in p.parts)
SKIP_FLAGS = get_config(path=ROOT).get("tst_flags", "").split()


def test_the_book_has_chapters():
    assert len(NOTEBOOKS) >= 2, NOTEBOOKS


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(notebook):
    ok, seconds = nbt.test_nb(notebook, skip_flags=SKIP_FLAGS)
    assert ok, f"{notebook.name} failed after {seconds:.1f} s (traceback above)"
