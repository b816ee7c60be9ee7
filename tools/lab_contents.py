"""A Jupyter contents manager for the book: notebooks open in JupyterLab without a 'modified' mark and save nbdev-clean.

Why the mark: `nbdev_clean` (which the book's notebooks pass through before every commit) keeps a kernelspec whose
`display_name` is its `name` (`python3`) and drops `language_info`. When the kernel starts, JupyterLab writes the
kernel's own values (`Python 3 (ipykernel)`, the `language_info` of this Python) into the notebook's metadata, and
any change of metadata marks the notebook modified -- every tab, before the reader has typed anything. The notebook
files cannot carry the kernel's values: `nbdev_clean` removes them again, and `language_info` names the Python
version of whoever ran the notebook last.

So `make lab` runs the server with `BookContentsManager`: on opening, a notebook's metadata gets the values this
kernel will report (nothing left for JupyterLab to change); on saving, the notebook is cleaned exactly as
`nbdev_clean` cleans it, with the project's settings, so what lands on disk is what would be committed.

Use: `jupyter lab --ServerApp.contents_manager_class=lab_contents.BookContentsManager` with `tools/` on PYTHONPATH.
"""
from __future__ import annotations

import copy
from pathlib import Path

from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager

ROOT = Path(__file__).resolve().parents[1]


def kernel_metadata(kernel_name: str = "python3") -> dict:
    "The `kernelspec` and `language_info` JupyterLab writes into a notebook once kernel `kernel_name` is running."
    from ipykernel.ipkernel import IPythonKernel
    from jupyter_client.kernelspec import KernelSpecManager
    spec = KernelSpecManager().get_kernel_spec(kernel_name)
    return {"kernelspec": {"display_name": spec.display_name, "language": spec.language, "name": kernel_name},
            "language_info": copy.deepcopy(IPythonKernel.language_info)}


def stamp(nb: dict) -> dict:
    "`nb` with the running kernel's metadata, if it names a Python kernel (other kernels are left as they are)."
    spec = nb.setdefault("metadata", {}).get("kernelspec") or {"name": "python3"}
    if spec.get("name") == "python3": nb["metadata"].update(kernel_metadata(spec["name"]))
    return nb


def nbdev_clean(nb: dict, root: Path = ROOT) -> dict:
    "`nb` cleaned in place as `nbdev_clean` cleans a notebook of the project at `root` (its settings.ini)."
    from nbdev.clean import clean_nb
    from nbdev.config import get_config
    cfg = get_config(path=root)
    clean_nb(nb, cfg.clear_all, cfg.get("allowed_metadata_keys").split(), cfg.get("allowed_cell_metadata_keys").split(),
             cfg.clean_ids)
    return nb


class BookContentsManager(AsyncLargeFileManager):
    "Notebooks open with the kernel's metadata (no 'modified' mark) and are saved as `nbdev_clean` leaves them."

    async def get(self, path, content=True, type=None, format=None, **kwargs):
        model = await super().get(path, content=content, type=type, format=format, **kwargs)
        if model.get("type") == "notebook" and model.get("content") is not None: stamp(model["content"])
        return model

    async def save(self, model, path=""):
        if model.get("type") == "notebook" and model.get("content") is not None:
            model = dict(model, content=nbdev_clean(copy.deepcopy(model["content"])))
        return await super().save(model, path)
