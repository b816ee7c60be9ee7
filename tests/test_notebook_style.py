"""House rules for the notebooks that tools rely on.

nbdev's doc build executes every cell that contains an import (so that `show_doc` can see the names), so a cell that
mixes imports with other code runs out of context there and breaks or slows the build: imports stay in their own
cells. Each chapter starts with a title and a one-line subtitle (the module docstring) and declares its module."""
import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith("_"))


def cells(nb_path: Path, kind: str) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == kind]


def is_directive_export(src: str) -> bool:
    return any(line.strip().startswith(("#| export", "#|export", "#| exporti", "#| exports")) for line in src.splitlines()[:3])


def parsed(src: str) -> ast.Module | None:
    "A code cell's syntax tree (magics and shell lines left out; directive lines are comments), or None."
    try: return ast.parse("\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!"))))
    except SyntaxError: return None


def mixes_imports(src: str) -> bool:
    if (tree := parsed(src)) is None: return False
    nodes = list(ast.walk(tree))
    has_import = any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in nodes)
    return has_import and any(isinstance(n, (ast.Expr, ast.Assign)) for n in nodes)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_imports_stay_in_their_own_cells(nb):
    offenders = [src.splitlines()[0] for src in cells(nb, "code") if not is_directive_export(src) and mixes_imports(src)]
    assert not offenders, f"{nb.name}: cells mixing imports with other code (move the imports up): {offenders}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_opens_with_title_and_subtitle(nb):
    first = cells(nb, "markdown")[0].splitlines()
    assert first[0].startswith("# ") and any(line.startswith("> ") for line in first[1:4]), f"{nb.name}: {first[:3]}"


MAX_LINE = 120


def nbdev_all_line(line: str) -> bool:
    "The first line of the `__all__` nbdev writes itself: it wraps the names at 120, then prefixes `__all__ = `."
    return line.startswith("__all__ = [")


def test_exported_lines_fit_120_characters():
    "Every line of the library (what `nbdev_export` writes, `_modidx.py` and nbdev's own `__all__` line excepted) fits."
    long = [f"{py.name}:{i}: {len(line)} chars" for py in sorted((ROOT / "lowrank_tales").glob("*.py"))
            if py.name != "_modidx.py"
            for i, line in enumerate(py.read_text().splitlines(), 1) if len(line) > MAX_LINE and not nbdev_all_line(line)]
    assert not long, f"{len(long)} exported line(s) longer than {MAX_LINE} characters:\n" + "\n".join(long[:60])


def definitions(src: str) -> list[str]:
    "Names of the top-level functions and classes a cell defines."
    body = getattr(parsed(src), "body", [])
    return [n.name for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_one_definition_per_export_cell(nb):
    "fastcore's and nbdev's own rhythm: each exported function or class has its cell, its prose and its tests."
    crowded = [d for src in cells(nb, "code") if is_directive_export(src) and len(d := definitions(src)) > 1]
    assert not crowded, f"{nb.name}: export cells defining more than one name (split them): {crowded[:3]}"


MAX_PROSE_WORDS = 300


def prose_runs(nb_path: Path) -> list[tuple[int, list[str]]]:
    "Words in each run of consecutive prose cells a reader meets (hidden code cells do not break a run), with their ids."
    runs, words, ids = [], 0, []
    for c in json.loads(nb_path.read_text())["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] == "markdown": words, ids = words + len(src.split()), ids + [c.get("id")]
        elif not any(line.strip() in ("#| hide", "#|hide") for line in src.splitlines()[:3]):
            if ids: runs.append((words, ids))
            words, ids = 0, []
    return runs + ([(words, ids)] if ids else [])


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_prose_comes_in_short_runs(nb):
    """d2l's rhythm: a derivation step, then the code that implements or checks it. No prose cell, and (the front
    page's table of contents aside) no run of prose cells without code between, is longer than about 300 words."""
    runs = prose_runs(nb)
    long = [(w, ids) for w, ids in runs if w > MAX_PROSE_WORDS and (nb.name != "index.ipynb" or len(ids) == 1)]
    assert not long, f"{nb.name}: prose runs over {MAX_PROSE_WORDS} words (words, cell ids): {long}"


def only_imports(src: str) -> bool:
    tree = parsed(src)
    return tree is not None and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_slow_cells_carry_their_saved_outputs(nb):
    "No target of the test suite runs `#| slow` cells, so `make slow-save` saves their results: every one shows them."
    code = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
    slow = [c for c in code if "#| slow" in [line.strip() for line in "".join(c["source"]).splitlines()[:3]]]
    missing = [c.get("id") for c in slow if not c.get("outputs") and not only_imports("".join(c["source"]))]
    assert not missing, f"{nb.name}: slow cells without saved outputs (run `make slow-save`): {missing}"
