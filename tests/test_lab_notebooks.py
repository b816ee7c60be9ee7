"""Notebooks open in JupyterLab unmodified and save as `nbdev_clean` leaves them (`tools/lab_contents.py`, `make lab`)."""
import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith("_"))


def test_open_and_save_leaves_every_notebook_byte_identical(tmp_path):
    "Opened, a notebook carries the kernel's metadata (nothing for Lab to change); saved, it is the committed file again."
    from lab_contents import BookContentsManager, kernel_metadata
    for nb in NOTEBOOKS: shutil.copy(nb, tmp_path / nb.name)
    cm, expected = BookContentsManager(root_dir=str(tmp_path)), kernel_metadata()

    async def round_trip(name):
        model = await cm.get(name)
        meta = model["content"]["metadata"]
        assert {k: meta[k] for k in expected} == expected, name
        await cm.save({"type": "notebook", "format": "json", "content": model["content"]}, name)

    for nb in NOTEBOOKS:
        asyncio.run(round_trip(nb.name))
        assert (tmp_path / nb.name).read_bytes() == nb.read_bytes(), f"{nb.name} changed by opening and saving"


def test_saving_cleans_what_lab_adds(tmp_path):
    "Execution counts, the kernel's metadata and cell metadata Lab adds are cleaned away on save, as nbdev_clean does."
    from lab_contents import BookContentsManager, kernel_metadata
    nb = json.loads((ROOT / "nbs" / "index.ipynb").read_text())
    dirty = json.loads(json.dumps(nb))
    dirty["metadata"].update(kernel_metadata())
    code = next(c for c in dirty["cells"] if c["cell_type"] == "code")
    code["execution_count"], code["metadata"] = 7, {"scrolled": True}
    cm = BookContentsManager(root_dir=str(tmp_path))
    asyncio.run(cm.save({"type": "notebook", "format": "json", "content": dirty}, "index.ipynb"))
    assert (tmp_path / "index.ipynb").read_bytes() == (ROOT / "nbs" / "index.ipynb").read_bytes()
    assert "language_info" in dirty["metadata"], "the model handed in was modified"


def test_jupyterlab_opens_notebooks_unmodified(tmp_path):
    "In a real JupyterLab with the book's contents manager, no tab shows 'modified' once the kernel is idle."
    lab = pytest.importorskip("test_widgets_lab")  # its Lab and browser helpers (skips where Chromium is missing)
    from playwright.sync_api import sync_playwright
    repo, conf = lab.copy_repo(tmp_path / "repo"), tmp_path / "conf"
    shutil.copy(ROOT / "tools" / "lab_contents.py", repo / "lab_contents.py")  # PYTHONPATH is the copy's root
    (conf / "config").mkdir(parents=True)
    (conf / "config" / "jupyter_server_config.json").write_text(
        json.dumps({"ServerApp": {"contents_manager_class": "lab_contents.BookContentsManager"}}))
    port = lab.free_port()
    proc = lab.start_lab(repo, conf, port)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=lab.CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            for name in ("index.ipynb", "01_als.ipynb"):
                page.goto(f"http://127.0.0.1:{port}/lab/tree/nbs/{name}")
                page.wait_for_selector(".jp-Notebook:visible", timeout=60000)
                page.wait_for_function("() => (document.querySelector('#jp-main-statusbar')?.innerText || '')"
                                       ".includes('Idle')", timeout=60000)
                page.wait_for_timeout(1500)  # Lab writes the kernel's metadata right after the kernel is ready
                dirty = page.evaluate("() => [...document.querySelectorAll('.lm-TabBar-tab.jp-mod-dirty')]"
                                      ".map(t => t.innerText)")
                assert not dirty, f"tabs marked modified after opening {name}: {dirty}"
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
