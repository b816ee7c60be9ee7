"""Metadata a reader or a tool relies on: every notebook opens in JupyterLab straight into its kernel, no saved output
shows a warning or a temporary path, and the package metadata stated in `settings.ini` (nbdev) and `pyproject.toml`
(pip) agree, and the package holds library modules only: no test catalogue or fixtures, no test tools, no change to the
process environment."""
import ast
import configparser
import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
# `nbdev_clean` rewrites `display_name` to the kernel's `name` (nbdev/clean.py), so that is what a clean notebook keeps.
KERNELSPEC = {"display_name": "python3", "language": "python", "name": "python3"}


def test_every_notebook_carries_its_kernelspec():
    "JupyterLab asks 'Select Kernel' for a notebook without a kernelspec; with one it starts the kernel at once."
    missing = [nb.name for nb in NOTEBOOKS if json.loads(nb.read_text())["metadata"].get("kernelspec") != KERNELSPEC]
    assert not missing, f"notebooks without the kernelspec {KERNELSPEC}: {missing}"


TEMP_PATH = re.compile(r"/tmp/|/var/folders/|\\AppData\\Local\\Temp|ipykernel_\d+")
WARNING = re.compile(r"\b\w*Warning\b:")


def test_no_saved_output_shows_a_warning_or_a_temporary_path():
    "Saved outputs are what the site shows: a warning with `/tmp/ipykernel_…` in it is noise from one machine."
    found = []
    for nb in NOTEBOOKS:
        for cell in json.loads(nb.read_text())["cells"]:
            for out in cell.get("outputs", []):
                text = "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
                text += "".join(out.get("traceback", []))
                if WARNING.search(text) or TEMP_PATH.search(text):
                    line = next((l for l in text.splitlines() if WARNING.search(l) or TEMP_PATH.search(l)), "")
                    found.append(f"{nb.name} cell {cell.get('id')}: {line.strip()[:160]}")
    assert not found, "\n".join(found)


def settings() -> dict:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    return dict(cfg["DEFAULT"])


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


LICENSES = {"apache2": "Apache-2.0", "mit": "MIT", "bsd3": "BSD-3-Clause", "gpl3": "GPL-3.0"}


@pytest.mark.parametrize("field", ["name", "version", "description", "requirements", "python", "license", "keywords"])
def test_settings_and_pyproject_agree(field):
    "nbdev reads settings.ini, pip reads pyproject.toml: the package metadata they both state is the same."
    s, p = settings(), project()
    init = (ROOT / s["lib_name"] / "__init__.py").read_text()
    ours = {"name": (s["lib_name"], p["name"]),
            "version": (s["version"], re.search(r'__version__ = "([^"]+)"', init).group(1)),  # pyproject reads it there
            "description": (s["description"], p["description"]),
            "requirements": (sorted(s["requirements"].split()), sorted(d.replace(" ", "") for d in p["dependencies"])),
            "python": (f">={s['min_python']}", p["requires-python"]),
            "license": (LICENSES.get(s["license"], s["license"]), p["license"]["text"]),
            "keywords": (sorted(s["keywords"].split()), sorted(p["keywords"]))}
    assert "version" in p.get("dynamic", []) or field != "version", "pyproject.toml states a version of its own"
    left, right = ours[field]
    assert left == right, f"{field}: settings.ini says {left!r}, pyproject.toml says {right!r}"


def test_nbdev_clean_keeps_the_kernelspec(tmp_path):
    "`nbdev_clean` (run by `make clean-nbs` and checked by CI) leaves the kernelspec a notebook carries as it is."
    import shutil
    import subprocess
    import sys
    nb = json.loads((ROOT / "nbs" / "index.ipynb").read_text())
    nb["metadata"]["kernelspec"] = dict(KERNELSPEC)
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    shutil.copy(ROOT / "settings.ini", tmp_path / "settings.ini")
    subprocess.run([str(Path(sys.executable).with_name("nbdev_clean")), "--fname", str(path)], cwd=tmp_path, check=True)
    assert json.loads(path.read_text())["metadata"]["kernelspec"] == KERNELSPEC


# The package is library code only. A new module is added here on purpose; test catalogues, fixtures and a chapter's
# own experiments live in tests/ or in the chapter's plain cells instead.
LIBRARY_MODULES = {"__init__", "_modidx", "core", "kernels", "products", "alternating", "completion", "hadamard",
                   "kronecker", "khatri_rao_decomposition", "adapters", "injection", "adapter_files", "peft_interop",
                   "peft_layers", "extraction", "compression", "planning", "finetune",
                   "distributed", "widgets"}
TEST_TOOLS = {"pytest", "hypothesis", "fastcore.test", "unittest"}
# Where a library module may write os.environ, and why: the worker of `launch` is a fresh process that `launch` spawns,
# and it sets the variables torchrun would (its parent's environment is never touched).
ENVIRONMENT_WRITERS = {("distributed", "_worker")}


def library_modules() -> list[Path]:
    return sorted((ROOT / "lowrank_tales").glob("*.py"))


def test_the_package_holds_exactly_the_library_modules():
    found = {py.stem for py in library_modules()}
    assert found == LIBRARY_MODULES, f"not in the allow-list: {sorted(found - LIBRARY_MODULES)}; " \
                                     f"missing: {sorted(LIBRARY_MODULES - found)}"


def environment_writes(tree) -> list[tuple[str, int]]:
    "(enclosing function, line) of every write to `os.environ` or call of `os.putenv`/`os.unsetenv` in `tree`."
    def is_environ(node): return isinstance(node, ast.Attribute) and node.attr == "environ"
    found = []
    def visit(node, where):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)): where = node.name
        hit = isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)) and any(
            isinstance(t, ast.Subscript) and is_environ(t.value)
            for t in (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]))
        hit |= isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
            (is_environ(node.func.value) and node.func.attr in {"update", "setdefault", "pop", "popitem", "clear"})
            or node.func.attr in {"putenv", "unsetenv"})
        if hit: found.append((where, node.lineno))
        for child in ast.iter_child_nodes(node): visit(child, where)
    visit(tree, "<module>")
    return found


def test_environment_writes_are_found():
    "The scan below would see each way of changing the environment (and not mere reads)."
    src = ("import os\nos.environ['A'] = '1'\ndef f():\n    os.environ.update(B='2')\n    os.putenv('C', '3')\n"
           "def g():\n    del os.environ['A']\n    os.environ.setdefault('D', '4')\n    return os.environ.get('E')\n")
    assert environment_writes(ast.parse(src)) == [("<module>", 2), ("f", 4), ("f", 5), ("g", 7), ("g", 8)]


def test_no_library_module_imports_test_tools_or_sets_the_environment():
    problems = []
    for py in library_modules():
        tree = ast.parse(py.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        problems += [f"{py.name} imports {m}" for m in sorted(imported)
                     if m in TEST_TOOLS or m.split(".")[0] in {"pytest", "hypothesis"}]
        problems += [f"{py.name}:{line} ({where}) changes os.environ" for where, line in environment_writes(tree)
                     if (py.stem, where) not in ENVIRONMENT_WRITERS]
    assert not problems, "\n".join(problems)


def test_importing_the_package_leaves_the_environment_unchanged():
    "`import lowrank_tales` and every module of it, in a fresh interpreter: os.environ is the same before and after."
    import subprocess
    import sys
    modules = sorted(LIBRARY_MODULES - {"__init__"})
    code = ("import json, os, importlib; before = dict(os.environ); import lowrank_tales\n"
            f"for m in {modules!r}: importlib.import_module('lowrank_tales.' + m)\n"
            "after = dict(os.environ)\n"
            "print(json.dumps({k: [before.get(k), after.get(k)] for k in before.keys() | after.keys() "
            "if before.get(k) != after.get(k)}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {}
