"""Build the documentation site from the notebooks without Quarto.

nbdev processes the notebooks (front matter, `show_doc` output, doc links) into `_proc/`; smalldocs renders that
Quarto project to HTML; this script fills the gaps between the two (see ../shared/design/toolchain.md):

1. pages are named after nbdev's `output-file` (`00_core.ipynb` -> `core.html`), as nbdev's doc links expect;
2. KaTeX is served from the site itself (from the npm package, cached in `.cache/`), so maths renders offline;
3. `show_doc` source links point at highlighted copies of the library's source inside the site;
4. README.md is regenerated from `index.ipynb`;
5. every local link and anchor of the finished site is checked.

Usage: `python tools/build_docs.py [--out _docs]`. Exits non-zero on any broken link.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROC = ROOT / "_proc"
KATEX_VERSION = "0.16.11"
KATEX_CDN = f"https://cdn.jsdelivr.net/npm/katex@{KATEX_VERSION}/dist"


def process_notebooks() -> None:
    "Run nbdev's doc processing into `_proc/`, skipping its attempt to install Quarto."
    import nbdev.quarto as quarto

    quarto._ensure_quarto = lambda: None  # Quarto cannot be installed here; smalldocs renders instead
    shutil.rmtree(PROC, ignore_errors=True)
    quarto._pre_docs(n_workers=0)


def front_matter(nb: dict) -> dict:
    "The YAML front matter nbdev wrote into the first raw cell of a processed notebook."
    cell = nb["cells"][0]
    if cell["cell_type"] != "raw": return {}
    text = "".join(cell["source"]).strip()
    return yaml.safe_load(text.strip("-")) or {}


def rename_after_output_file() -> dict[str, str]:
    "Rename each processed notebook after its `output-file`; return the map old name -> new name."
    renames = {}
    for path in sorted(PROC.rglob("*.ipynb")):
        nb = json.loads(path.read_text())
        target = front_matter(nb).get("output-file")
        if not target: continue
        new = path.with_name(Path(target).stem + ".ipynb")
        drop_output_file_key(nb)
        path.unlink()
        new.write_text(json.dumps(nb, indent=1))
        renames[path.name] = new.name
    return renames


def drop_output_file_key(nb: dict) -> None:
    "Remove `output-file` from the front matter (smalldocs names pages after their file instead)."
    cell = nb["cells"][0]
    cell["source"] = [line for line in "".join(cell["source"]).splitlines(keepends=True)
                      if not line.startswith("output-file:")]


def rewrite_notebook_links(renames: dict[str, str]) -> None:
    "Point links between chapters (`01_als.ipynb`) and the sidebar at the renamed pages."
    sidebar = PROC / "sidebar.yml"
    text = sidebar.read_text()
    for old, new in renames.items(): text = text.replace(old, new)
    sidebar.write_text(text)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b") if renames else None
    for path in PROC.glob("*.ipynb"):
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] != "markdown" or pattern is None: continue
            src = "".join(cell["source"])
            cell["source"] = pattern.sub(lambda m: Path(renames[m.group(1)]).stem + ".html", src)
        path.write_text(json.dumps(nb, indent=1))


def html_only_quarto_yml() -> None:
    "Keep only what an HTML build reads in the scratch copy of `_quarto.yml` (the committed one stays as nbdev made it)."
    path = PROC / "_quarto.yml"
    cfg = yaml.safe_load(path.read_text())
    cfg["format"] = {"html": {k: v for k, v in cfg["format"]["html"].items() if k != "keep-md"}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def smalldocs(*args: str) -> None:
    "Run the smalldocs command line in `_proc/`, failing loudly."
    exe = Path(sys.executable).with_name("smalldocs")
    subprocess.run([str(exe), *args], cwd=PROC, check=True)


def katex_dist() -> Path:
    "The `dist/` folder of the KaTeX npm package, fetched once with `npm pack` and cached in `.cache/`."
    cache = ROOT / ".cache" / f"katex-{KATEX_VERSION}"
    if not (cache / "package" / "dist" / "katex.min.js").exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", f"katex@{KATEX_VERSION}", "--pack-destination", str(cache), "--silent"],
                       check=True, cwd=cache, stdout=subprocess.DEVNULL)
        with tarfile.open(next(cache.glob("katex-*.tgz"))) as tar: tar.extractall(cache, filter="data")
    return cache / "package" / "dist"


def serve_katex_locally(site: Path) -> None:
    "Copy KaTeX into the site and point every page at that copy instead of the CDN."
    dest = site / "site_libs" / "katex"
    shutil.copytree(katex_dist(), dest, dirs_exist_ok=True)
    for page in site.rglob("*.html"):
        rel = "../" * (len(page.relative_to(site).parts) - 1) + "site_libs/katex"
        page.write_text(page.read_text().replace(KATEX_CDN, rel))


def relative_doc_links(site: Path, site_url: str) -> None:
    "Make nbdev's doc links (absolute URLs of the published site) relative, so the site reads offline anywhere."
    for page in site.rglob("*.html"):
        up = "../" * (len(page.relative_to(site).parts) - 1)
        page.write_text(re.sub(r'href="' + re.escape(site_url.rstrip("/")) + "/", f'href="{up}', page.read_text()))


def source_pages(site: Path, repo_blob: str) -> None:
    "Write highlighted source pages for the library and point `show_doc` source links at them."
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer

    out = site / "source"
    out.mkdir(exist_ok=True)
    fmt = HtmlFormatter(linenos="inline", lineanchors="L", anchorlinenos=True)
    for py in sorted((ROOT / "lowrank_tales").glob("*.py")):
        body = highlight(py.read_text(), PythonLexer(), fmt)
        title = f"lowrank_tales/{py.name}"
        (out / f"{py.name}.html").write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{fmt.get_style_defs('.highlight')} :target {{background:#ffef9e}}</style></head>"
            f"<body><h1 style='font-family:sans-serif'>{html.escape(title)}</h1>{body}</body></html>")
    link = re.compile(re.escape(repo_blob) + r"/lowrank_tales/([\w.]+\.py)#L(\d+)")
    for page in site.glob("*.html"):
        page.write_text(link.sub(lambda m: f"source/{m.group(1)}.html#L-{m.group(2)}", page.read_text()))


def broken_links(site: Path) -> list[str]:
    "Every local `href`/`src` of the site whose file or `#anchor` does not exist."
    ids: dict[Path, set[str]] = {}
    def anchors(path: Path) -> set[str]:
        if path not in ids: ids[path] = set(re.findall(r'\b(?:id|name)="([^"]+)"', path.read_text(errors="ignore")))
        return ids[path]
    problems = []
    for page in sorted(site.rglob("*.html")):
        text = page.read_text()
        for url in re.findall(r'\b(?:href|src)="([^"]+)"', text):
            if re.match(r"^(?:[a-z]+:|//|data:|javascript:)", url) or url.startswith("#") and not url[1:]: continue
            file, _, anchor = html.unescape(url).partition("#")
            target = (page.parent / file.split("?")[0]).resolve() if file else page
            if target.is_dir(): target = target / "index.html"
            if not target.exists(): problems.append(f"{page.relative_to(site)}: missing {url}")
            elif anchor and target.suffix == ".html" and anchor not in anchors(target):
                problems.append(f"{page.relative_to(site)}: no anchor {url}")
    return problems


def write_readme(renames: dict[str, str], site_url: str, check_only: bool = False) -> bool:
    "Regenerate README.md from the processed `index.ipynb` (or, with `check_only`, only compare); return whether it differs."
    import nbformat
    from nbconvert import MarkdownExporter

    nb_path = PROC / renames.get("index.ipynb", "index.ipynb")
    nb = json.loads(nb_path.read_text())
    meta = front_matter(nb)
    nb["cells"] = [c for c in nb["cells"][1:] if "AUTOGENERATED" not in "".join(c["source"])]
    nb["metadata"]["language_info"] = {"name": "python"}  # fences code as ```python
    body, _ = MarkdownExporter(exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(
        nbformat.reads(json.dumps(nb), as_version=4))
    body = re.sub(r"\n{3,}", "\n\n", body).strip()
    body = re.sub(r"\]\((?![a-z]+:)([\w-]+\.html)", lambda m: f"]({site_url}/{m.group(1)}", body)  # absolute links
    head = f"# {meta.get('title', 'lowrank_tales')}\n\n> {meta.get('description', '')}\n\n"
    text = head + body + "\n"
    readme = ROOT / "README.md"
    changed = not readme.exists() or readme.read_text() != text
    if changed and not check_only: readme.write_text(text)
    return changed


def build(out: Path, check_readme: bool = False) -> int:
    "Build the whole site into `out`; return the number of problems found."
    process_notebooks()
    renames = rename_after_output_file()
    rewrite_notebook_links(renames)
    html_only_quarto_yml()
    smalldocs("check")
    smalldocs("render")
    built = PROC / "_docs"
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(str(built), str(out))
    serve_katex_locally(out)
    settings = yaml.safe_load((PROC / "nbdev.yml").read_text())["website"]
    source_pages(out, f"{settings['repo-url']}/blob/{settings['repo-branch']}")
    relative_doc_links(out, settings["site-url"])
    changed = write_readme(renames, settings["site-url"], check_only=check_readme)
    problems = broken_links(out)
    if changed and check_readme: problems.append("README.md is not what index.ipynb renders to: run `make site` and commit it")
    for p in problems: print("problem:", p)
    print(f"built {len(list(out.glob('*.html')))} pages into {out}; README.md {'updated' if changed else 'unchanged'}; "
          f"{len(problems)} problem(s)")
    return len(problems)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "_docs"), help="where to write the site")
    parser.add_argument("--check-readme", action="store_true", help="fail if README.md is stale instead of rewriting it")
    args = parser.parse_args()
    sys.exit(1 if build(Path(args.out).resolve(), args.check_readme) else 0)
