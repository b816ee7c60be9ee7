"""The library is exactly what `nbdev_export` makes from the notebooks, the notebooks are clean, and README.md is what
`index.ipynb` renders to. Checked on a scratch copy of the working tree, so a developer's checkout is never touched."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    "A git repository holding the working tree's tracked and untracked (not ignored) files, committed."
    dest = tmp_path_factory.mktemp("sync") / "repo"
    files = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git("init", "-q", cwd=dest)
    git("add", "-A", cwd=dest)
    git("-c", "user.name=ci", "-c", "user.email=ci@localhost", "commit", "-qm", "snapshot", cwd=dest)
    return dest


def changed_after(cmd, cwd):
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return git("status", "--porcelain", cwd=cwd)


def test_notebooks_are_clean(scratch):
    assert changed_after([str(BIN / "nbdev_clean")], scratch) == "", "run `make clean-nbs` and commit"


def test_library_matches_notebooks(scratch):
    assert changed_after([str(BIN / "nbdev_export")], scratch) == "", "run `make export` and commit"
