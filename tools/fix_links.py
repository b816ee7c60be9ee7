"""Point links between chapters at the notebooks (`01_als.ipynb`), so that they work in JupyterLab as well as on the site.

A link written as the site's page (`[ALS](als.html)`) is dead in JupyterLab, where the chapter is `01_als.ipynb`. A
link to the notebook works in both: JupyterLab opens the notebook, and the docs build (`tools/build_docs.py`,
`rewrite_notebook_links`) turns `01_als.ipynb` into the page `als.html`, anchors kept (`#dense_als`).

This script rewrites, in the Markdown cells of the notebooks it is given, every relative link to a page of the book
(`page.html` or `page.html#anchor`, as `[text](...)` or `href="..."`) into the link to its notebook. Code cells, outputs,
links to other hosts and links to pages that are no chapter are left alone; cell ids and formatting are kept (the
file is written as `nbdev_clean` writes it). Running it again changes nothing.

Usage: `python tools/fix_links.py nbs/index.ipynb nbs/01_als.ipynb ...` (no argument: every notebook in nbs/);
`--check` only lists the links it would change and exits 1 if there are any.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE_LINK = re.compile(r"(\]\(|href=[\"'])([\w-]+\.html)(#[^)\s\"']*)?(?=[)\s\"'])")


def page_name(notebook: str) -> str:
    "The page nbdev names a notebook after: its file name without the chapter number (`01_als.ipynb` -> `als.html`)."
    return re.sub(r"^\d+[a-z]?_", "", Path(notebook).stem) + ".html"


def notebook_pages(nbs: Path = ROOT / "nbs") -> dict[str, str]:
    "Every page of the book and the notebook it comes from: `{'als.html': '01_als.ipynb', ...}`."
    pages = {}
    for nb in sorted(nbs.glob("*.ipynb")):
        if nb.name.startswith(("_", ".")): continue
        page = page_name(nb.name)
        if page in pages: raise ValueError(f"{nb.name} and {pages[page]} would both be the page {page}")
        pages[page] = nb.name
    return pages


def fix_text(text: str, pages: dict[str, str]) -> str:
    "`text` with every link to a page in `pages` pointing at its notebook instead."
    def swap(m):
        target = pages.get(m.group(2))
        return m.group(0) if target is None else m.group(1) + target + (m.group(3) or "")
    return PAGE_LINK.sub(swap, text)


def fix_notebook(nb: dict, pages: dict[str, str]) -> list[tuple[str, str]]:
    "Rewrite the links of `nb`'s Markdown cells in place, line by line; return the `(before, after)` lines changed."
    changed = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "markdown": continue
        lines = [cell["source"]] if isinstance(cell["source"], str) else cell["source"]
        fixed = [fix_text(line, pages) for line in lines]
        changed += [(a, b) for a, b in zip(lines, fixed) if a != b]
        cell["source"] = fixed[0] if isinstance(cell["source"], str) else fixed
    return changed


def write_notebook(nb: dict, path: Path) -> None:
    "Write `nb` as nbdev writes notebooks (sorted keys, one-space indent, UTF-8, final newline)."
    path.write_text(json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="notebooks to fix (default: every notebook in nbs/)")
    parser.add_argument("--check", action="store_true", help="only list the links that would change; exit 1 if any")
    args = parser.parse_args(argv)
    pages = notebook_pages()
    paths = [Path(p) for p in args.notebooks] or sorted(p for p in (ROOT / "nbs").glob("*.ipynb")
                                                        if not p.name.startswith(("_", ".")))
    total = 0
    for path in paths:
        nb = json.loads(path.read_text(encoding="utf-8"))
        changed = fix_notebook(nb, pages)
        total += len(changed)
        for before, after in changed: print(f"{path}: {before.strip()[:100]}  ->  {after.strip()[:100]}")
        if changed and not args.check: write_notebook(nb, path)
    print(f"{total} line(s) with links to pages {'to fix' if args.check else 'fixed'} in {len(paths)} notebook(s)")
    return 1 if args.check and total else 0


if __name__ == "__main__":
    sys.exit(main())
