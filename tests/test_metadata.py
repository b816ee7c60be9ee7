"""Metadata a reader or a tool relies on: every notebook opens in JupyterLab straight into its kernel, no saved output
shows a warning or a temporary path, and the package metadata stated in `settings.ini` (nbdev) and `pyproject.toml`
(pip) agree."""
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
