"""Build the documentation site from the notebooks without Quarto.

nbdev processes the notebooks (front matter, `show_doc` output, doc links) into `_proc/`; smalldocs renders that
Quarto project to HTML; this script fills the gaps between the two (see ../shared/design/toolchain.md):

1. pages are named after nbdev's `output-file` (`95_core.ipynb` -> `core.html`), as nbdev's doc links expect;
2. KaTeX is served from the site itself (from the npm package, cached in `.cache/`), so maths renders offline;
3. `show_doc` source links point at highlighted copies of the library's source inside the site;
4. README.md is regenerated from `index.ipynb`;
5. every local link and anchor of the finished site is checked, and no page or stylesheet loads from another host;
6. `show_doc` shows a compact signature and a parameter table (docments) instead of comments inside the code;
7. chapters are numbered in the sidebar's order (the Appendix's lettered A, B, ...), figures with a `fig-cap` are
   numbered per chapter, and the code of a cell whose only output is a figure is folded;
8. the theme's web font is dropped (system fonts instead) and the search index carries no TeX;
9. an identifier in prose (inline code) may fold only after a `.`, `_`, `/` or `,` (`<wbr>`), never inside a word or number.

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
    compact_show_doc()
    shutil.rmtree(PROC, ignore_errors=True)
    quarto._pre_docs(n_workers=0)


def _anno(a) -> str:
    "An annotation as a reader writes it: `Module`, not `torch.nn.modules.module.Module`; `int | None`."
    import inspect
    if isinstance(a, str): return a
    if isinstance(a, type) and not getattr(a, "__args__", None): return a.__qualname__
    return re.sub(r"\b(?:[a-z_][\w]*\.)+([A-Z]\w*)", r"\1", inspect.formatannotation(a)).replace("typing.", "")


def _param(p) -> str:
    "One parameter: `*args`, `name:type=default`."
    stars = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
    out = stars + p.name + ("" if p.annotation is p.empty else f":{_anno(p.annotation)}")
    if p.default is not p.empty:
        d = p.default
        out += "=" + (d.__name__ if callable(d) and hasattr(d, "__name__") else repr(d))
    return out


SIGNATURE_WIDTH = 76  # what a 1280 px window shows of a code block without scrolling (the text column at its narrowest)


def _signature(sym, name: str) -> str | None:
    "`def name(a:int, *, b=1)->T`, wrapped at `SIGNATURE_WIDTH` columns, keyword-only and positional-only markers kept; None if none."
    import inspect
    try: sig = inspect.signature(sym)  # annotations as the source writes them (`nn.Module`), not evaluated
    except (ValueError, TypeError): return None
    parts, kinds = [], [p.kind for p in sig.parameters.values()]
    for i, p in enumerate(sig.parameters.values()):
        if p.name == "self" and i == 0: continue
        if p.kind is p.KEYWORD_ONLY and inspect.Parameter.VAR_POSITIONAL not in kinds and "*" not in parts: parts.append("*")
        parts.append(_param(p))
        if p.kind is p.POSITIONAL_ONLY and (i + 1 == len(kinds) or kinds[i + 1] is not p.POSITIONAL_ONLY): parts.append("/")
    ret = "" if sig.return_annotation is inspect.Signature.empty else f" -> {_anno(sig.return_annotation)}"
    prefix = "class" if inspect.isclass(sym) else "async def" if inspect.iscoroutinefunction(sym) else "def"
    lines, line = [], f"{prefix} {name}("
    pieces = [part + ", " for part in parts[:-1]] + [(parts[-1] if parts else "") + ")" + ret]
    for piece in pieces:  # the closing `) -> T` travels with the last parameter, so no line passes SIGNATURE_WIDTH
        if len(line) + len(piece.rstrip()) > SIGNATURE_WIDTH and line.strip(): lines.append(line.rstrip()); line = "    "
        line += piece
    return "\n".join(lines + [line])


def _cell(text) -> str:
    "Text for a Markdown table cell: one line, pipes escaped."
    return " ".join(str(text).split()).replace("|", "\\|")


def _parameter_table(sym) -> str:
    "A Markdown table of the documented parameters of `sym` (its docments): name, type, default, details; '' if none."
    import inspect
    from fastcore.docments import docments
    try: dm = docments(sym, full=True)
    except Exception: return ""
    dm.pop("self", None)
    if not any(v.get("docment") for v in dm.values()): return ""
    empty = inspect.Parameter.empty
    code = lambda v: f"`{_cell(v)}`" if v not in ("", None) else ""
    rows = ["| parameter | type | default | details |", "|---|---|---|---|"]
    for name, v in dm.items():
        anno = "" if v.get("anno", empty) is empty else _anno(v["anno"])
        default = "" if v.get("default", empty) is empty else repr(v["default"])
        if name == "return": name = "**returns**"
        else: name = f"`{name}`"
        rows.append(f"| {name} | {code(anno)} | {code(default)} | {_cell(v.get('docment') or '')} |")
    return "\n".join(rows)


def compact_show_doc() -> None:
    "Make `show_doc` write a signature without comments and a parameter table, so no Markdown is left inside code."
    import nbdev.showdoc as sd
    from fastcore.docments import _ital_first

    def _repr_markdown_(self):
        doc = "---\n\n"
        src = sd.NbdevLookup().code(self.fn)
        if src: doc += sd._ext_link(src, "source", 'style="float:right; font-size:smaller"') + "\n\n"
        doc += f"{'#' * self.title_level} {self.nm}\n\n"
        sig = _signature(self.sym, self.nm) if callable(self.sym) else None
        if sig is None: return doc + sd.MarkdownRenderer._repr_markdown_(self)
        doc += f"```python\n{sig}\n```"
        if self.docs: doc += "\n\n" + _ital_first(self.docs)
        table = _parameter_table(self.sym)
        return doc + (f"\n\n{table}" if table else "")

    sd.BasicMarkdownRenderer._repr_markdown_ = _repr_markdown_


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
    # link targets only (`](01_als.ipynb#x)`, `href="01_als.ipynb"`): a file name in text or in a code block stays
    names = "|".join(map(re.escape, renames))
    pattern = re.compile(r"(\]\(|href=[\"'])(" + names + r")(?=[#)\"'\s])") if renames else None
    for path in PROC.glob("*.ipynb"):
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] != "markdown" or pattern is None: continue
            src = "".join(cell["source"])
            cell["source"] = pattern.sub(lambda m: m.group(1) + Path(renames[m.group(2)]).stem + ".html", src)
        path.write_text(json.dumps(nb, indent=1))


NESTED_LINK = re.compile(r"\[\[(`[^`\]]+`)\]\([^)\s]*\)\]\(([^)\s]+)\)")  # nbdev links a name that is a link already
PRIVATE_LINK = re.compile(r"\[(`[^`\]]+`)\]\([^)\s#]*#_[^)\s]*\)")  # a private name has no documentation to link to
IMAGE_MIMES = ("image/png", "image/svg+xml", "image/jpeg", "image/gif")


def sidebar_order() -> list[str]:
    "The processed notebooks in the order of the sidebar (the reading order), `index.ipynb` first."
    def walk(items):
        for item in items:
            if isinstance(item, str): yield item
            elif isinstance(item, dict):
                if "href" in item or "file" in item: yield item.get("href") or item.get("file")
                yield from walk(item.get("contents", []))
    side = yaml.safe_load((PROC / "sidebar.yml").read_text())["website"]["sidebar"]["contents"]
    return [Path(f).name for f in walk(side)]


def chapter_labels() -> dict[str, str]:
    "Each chapter's number in the sidebar's order (no `index.ipynb`); the Appendix section's chapters get letters."
    side = yaml.safe_load((PROC / "sidebar.yml").read_text())["website"]["sidebar"]["contents"]
    appendix = {Path(f).name for item in side if isinstance(item, dict) and item.get("section") == "Appendix"
                for f in item.get("contents", []) if isinstance(f, str)}
    order = [n for n in sidebar_order() if n != "index.ipynb"]
    body, extra = [n for n in order if n not in appendix], [n for n in order if n in appendix]
    return {**{n: str(i + 1) for i, n in enumerate(body)}, **{n: chr(ord("A") + i) for i, n in enumerate(extra)}}


def _set_front_matter(nb: dict, fm: dict) -> None:
    nb["cells"][0]["source"] = "---\n" + yaml.safe_dump(fm, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def _is_figure_only(cell: dict) -> bool:
    "Whether every output of a code cell is a picture (the cell draws a figure and shows nothing else)."
    outs = cell.get("outputs") or []
    return bool(outs) and all(any(m in (o.get("data") or {}) for m in IMAGE_MIMES) for o in outs)


def cell_options(src: str) -> tuple[dict, str]:
    """A code cell's Quarto `#| key: value` options and its code, nbdev's bare flags (`#| slow`, `#| cuda`) left out.

    smalldocs reads all the `#|` lines as one YAML block, which a bare flag beside a `key: value` line breaks."""
    from smalldocs.notebook import cell_options as _quarto_options
    head, lines = [], src.split("\n")
    while lines and lines[0].startswith("#|"): head.append(lines.pop(0))
    keyed = [line for line in head if re.match(r"#\|\s*[\w-]+\s*:", line)]
    opts, _ = _quarto_options("\n".join(keyed))
    return opts, "\n".join(lines)


def _with_options(src: str, opts: dict) -> str:
    "`src` with its `#|` options replaced by `opts` (one JSON value per line, which YAML reads as it is)."
    _, code = cell_options(src)
    return "".join(f"#| {k}: {json.dumps(v, ensure_ascii=False)}\n" for k, v in opts.items()) + code


def _repair_links(md: str) -> str:
    "Undo nbdev's link around a name that is a link already, and its links to private names (never documented)."
    return PRIVATE_LINK.sub(r"\1", NESTED_LINK.sub(r"[\1](\2)", md))


def polish_notebooks() -> dict[str, str]:
    "Number (or letter) the chapters and their captioned figures, fold the code of figure-only cells, repair nested doc links."
    numbers = chapter_labels()
    for path in PROC.glob("*.ipynb"):
        nb = json.loads(path.read_text())
        num, figures = numbers.get(path.name), 0
        fm = front_matter(nb)
        if num and fm.get("title"):
            fm["title"] = f"{num}. {fm['title']}"
            _set_front_matter(nb, fm)
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                cell["source"] = _repair_links("".join(cell["source"]))
                continue
            if cell["cell_type"] != "code": continue
            for out in cell.get("outputs", []):
                md = (out.get("data") or {}).get("text/markdown")
                if md: out["data"]["text/markdown"] = _repair_links("".join(md))
            src = "".join(cell["source"])
            opts, code = cell_options(src)
            changed = False
            caps = opts.get("fig-cap")
            if caps and num:
                many = isinstance(caps, list)
                numbered = []
                for cap in (caps if many else [caps]):
                    figures += 1
                    numbered.append(f"Figure {num}.{figures}: {cap}")
                if "fig-alt" not in opts: opts["fig-alt"] = str(caps[0] if many else caps)
                opts["fig-cap"] = numbered if many else numbered[0]
                changed = True
            if _is_figure_only(cell) and "code-fold" not in opts and opts.get("echo", True) is not False and code.strip():
                opts.update({"code-fold": True, "code-summary": "Show the code of the figure"})
                changed = True
            if changed: cell["source"] = _with_options(src, opts)
        path.write_text(json.dumps(nb, indent=1))
    return numbers


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


WEB_FONT = re.compile(r"@import\s+url\((['\"]?)https?://[^)]*\1\)\s*;?")


def system_fonts(site: Path) -> None:
    "Drop the theme's `@import` of a web font (fonts.googleapis.com): the font stacks fall back to the system's fonts."
    for css in site.rglob("*.css"): css.write_text(WEB_FONT.sub("", css.read_text()))


PRE_BLOCK = re.compile(r"<pre\b.*?</pre>", re.S)
INLINE_CODE = re.compile(r"(<code>)([^<]*)(</code>)")
FOLD_AFTER = re.compile(r"(?<=[A-Za-z)\]}])([._/,]+)(?=[A-Za-z{(\[])")  # `a.b`, `a_b`, `a/b`; not `1.5`, `x_1`, `__init__`


def fold_identifiers(html_text: str) -> str:
    "Mark where inline code may fold on a narrow screen (after `.`, `_`, `/`, `,` between words), code blocks untouched."
    def fold(m): return m.group(1) + FOLD_AFTER.sub(r"\1<wbr>", m.group(2)) + m.group(3)
    parts, last = [], 0
    for block in PRE_BLOCK.finditer(html_text):
        parts += [INLINE_CODE.sub(fold, html_text[last:block.start()]), block.group(0)]
        last = block.end()
    return "".join(parts + [INLINE_CODE.sub(fold, html_text[last:])])


def foldable_identifiers(site: Path) -> None:
    "Apply `fold_identifiers` to every page of the site."
    for page in site.rglob("*.html"): page.write_text(fold_identifiers(page.read_text()))


TEX_WORDS = {"times": "×", "in": "∈", "le": "≤", "leq": "≤", "ge": "≥", "geq": "≥", "circ": "∘", "odot": "⊙",
             "otimes": "⊗", "oplus": "⊕", "cdot": "·", "cdots": "⋯", "ldots": "…", "dots": "…", "sum": "Σ", "prod": "Π",
             "sqrt": "√", "top": "ᵀ", "bullet": "•", "approx": "≈", "neq": "≠", "ne": "≠", "to": "→", "infty": "∞",
             "mid": "|", "star": "⋆", "ast": "∗", "pm": "±", "min": "min", "max": "max", "log": "log", "exp": "exp",
             "nabla": "∇", "partial": "∂", "|": "‖", "lVert": "‖", "rVert": "‖", "Vert": "‖", "langle": "⟨", "rangle": "⟩",
             "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "varepsilon": "ε", "eta": "η",
             "theta": "θ", "lambda": "λ", "mu": "μ", "nu": "ν", "pi": "π", "rho": "ρ", "sigma": "σ", "tau": "τ",
             "phi": "φ", "varphi": "φ", "omega": "ω", "Delta": "Δ", "Sigma": "Σ", "Omega": "Ω", "Lambda": "Λ",
             "Gamma": "Γ", "Theta": "Θ", "Phi": "Φ", "Pi": "Π", "kappa": "κ", "xi": "ξ", "zeta": "ζ", "chi": "χ", "psi": "ψ"}
TEX_BB = {"R": "ℝ", "N": "ℕ", "Z": "ℤ", "C": "ℂ", "E": "𝔼", "Q": "ℚ"}


def tex_to_text(text: str) -> str:
    "TeX as a reader can scan it in plain text: `\\mathbb{R}^{m \\times n}` -> `ℝ^(m × n)`, `\\text{out}` -> `out`."
    t = re.sub(r"\\mathbb\{?([A-Z])\}?", lambda m: TEX_BB.get(m.group(1), m.group(1)), text)
    t = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", t)
    for _ in range(3):  # innermost groups first
        t = re.sub(r"\\(?:text|mathrm|mathbf|mathit|mathcal|operatorname|textstyle|displaystyle|boldsymbol|tfrac|left|right"
                   r"|big|Big|bigg|Bigg)\b\*?", "", t)
        t = re.sub(r"([_^])\{([^{}]*)\}", lambda m: m.group(1) + (m.group(2) if len(m.group(2)) == 1 else f"({m.group(2)})"), t)
        t = re.sub(r"\{([^{}]*)\}", r"\1", t) if "\\" in text else t
    t = re.sub(r"\\([A-Za-z]+|\|)", lambda m: TEX_WORDS.get(m.group(1), m.group(1)), t)
    t = re.sub(r"\\[,;:! ]|\\quad|\\qquad|~", " ", t)
    return re.sub(r"[ \t]{2,}", " ", t.replace("$", ""))


def readable_search_index(site: Path) -> None:
    "Rewrite the TeX in `search.json` (titles, sections, snippets) as plain text."
    path = site / "search.json"
    entries = json.loads(path.read_text())
    for e in entries:
        for key in ("title", "section", "text"):
            if isinstance(e.get(key), str) and "\\" in e[key]: e[key] = tex_to_text(e[key])
    path.write_text(json.dumps(entries, ensure_ascii=False))


def external_resources(site: Path) -> list[str]:
    "Every resource a page or stylesheet of the site would load from another host (scripts, styles, images, fonts)."
    found = []
    for page in sorted(site.rglob("*.html")):
        text = page.read_text()
        tags = re.findall(r"<(?:script|img|iframe|source|audio|video)\b[^>]*\bsrc=\"((?:https?:)?//[^\"]+)\"", text)
        tags += [h for tag in re.findall(r"<link\b[^>]*>", text) if not re.search(r"rel=\"(?:canonical|license)\"", tag)
                 for h in re.findall(r"href=\"((?:https?:)?//[^\"]+)\"", tag)]
        found += [f"{page.relative_to(site)}: loads {url}" for url in tags]
    for css in sorted(site.rglob("*.css")):
        text = re.sub(r"/\*.*?\*/", "", css.read_text(), flags=re.S)
        urls = re.findall(r"url\(\s*['\"]?((?:https?:)?//[^'\")]+)", text) + re.findall(r"@import\s+['\"]((?:https?:)?//[^'\"]+)", text)
        found += [f"{css.relative_to(site)}: loads {url}" for url in urls]
    return found


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
    polish_notebooks()
    html_only_quarto_yml()
    smalldocs("check")
    smalldocs("render")
    built = PROC / "_docs"
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(str(built), str(out))
    serve_katex_locally(out)
    system_fonts(out)
    foldable_identifiers(out)
    readable_search_index(out)
    settings = yaml.safe_load((PROC / "nbdev.yml").read_text())["website"]
    source_pages(out, f"{settings['repo-url']}/blob/{settings['repo-branch']}")
    relative_doc_links(out, settings["site-url"])
    changed = write_readme(renames, settings["site-url"], check_only=check_readme)
    problems = broken_links(out) + external_resources(out)
    if changed and check_readme: problems.append("README.md is not what index.ipynb renders to: run `make site` and commit it")
    for p in problems: print("problem:", p)
    print(f"built {len(list(out.glob('*.html')))} pages into {out}; README.md {'updated' if changed else 'unchanged'}; "
          f"{len(problems)} problem(s)")
    return len(problems)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "_docs"), help="where to write the site")
    parser.add_argument("--check-readme", action="store_true", help="fail if README.md is stale instead of rewriting it")
    parser.add_argument("--fetch", action="store_true", help="only the set-up that needs the network (KaTeX into .cache/)")
    args = parser.parse_args()
    if args.fetch: sys.exit(print(f"KaTeX in {katex_dist()}"))
    sys.exit(1 if build(Path(args.out).resolve(), args.check_readme) else 0)
