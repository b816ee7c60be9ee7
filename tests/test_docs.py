"""The documentation site builds without Quarto and reads well in a real browser: maths rendered by the site's own
KaTeX, a sidebar with every chapter, doc links and source links that resolve. Saves screenshots to artifacts/.
Set LOWRANK_TALES_SITE=_docs to check a site built already (`make site`) instead of building one."""
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHAPTERS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith("_"))


def _no_network() -> list[str]:
    "A command prefix that runs a command in a network namespace of its own (no interface but loopback), if allowed."
    try: ok = subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0
    except OSError: ok = False
    return ["unshare", "-rn"] if ok else []


NO_NETWORK = _no_network()


def page_name(nb: Path) -> str:
    "The page nbdev names a notebook after: its file name without the leading chapter number."
    return re.sub(r"^\d+[a-z]?_", "", nb.stem) + ".html"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if os.environ.get("LOWRANK_TALES_SITE"): return Path(os.environ["LOWRANK_TALES_SITE"]).resolve()  # a site built already
    out = tmp_path_factory.mktemp("site") / "_docs"
    tool = [sys.executable, str(ROOT / "tools" / "build_docs.py")]
    fetch = subprocess.run(tool + ["--fetch"], cwd=ROOT, capture_output=True, text=True)  # the set-up, with network
    assert fetch.returncode == 0, fetch.stdout[-3000:] + fetch.stderr[-3000:]
    run = subprocess.run(NO_NETWORK + tool + ["--out", str(out), "--check-readme"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def server(site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass  # no request log in the test output
    handler = functools.partial(Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists(): pytest.fail("Chromium is missing: `make browser` installs Debian's chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                              "--disable-background-networking", "--disable-component-update", "--no-first-run"])
        yield b
        b.close()


def test_site_builds_without_network(site):
    "The `site` fixture built the book with no network at all (after set-up: KaTeX cached in .cache/ by a first build)."
    if os.environ.get("LOWRANK_TALES_SITE"): pytest.skip("checking a site built elsewhere")
    if not NO_NETWORK: pytest.skip("`unshare -rn` is not permitted here: the build ran with the network")
    assert (site / "index.html").exists()


def test_every_chapter_has_a_page(site):
    for nb in CHAPTERS: assert (site / page_name(nb)).exists(), page_name(nb)


def test_site_is_self_contained(site):
    for page in site.glob("*.html"):
        assert "cdn.jsdelivr" not in page.read_text(), f"{page.name} loads from a CDN"


def test_maths_renders_offline(browser, server, site):
    pages = [p.name for p in site.glob("*.html") if 'class="math display"' in p.read_text()]
    assert pages, "no page has display maths"
    page = browser.new_page()
    page.route(re.compile(r"^(?!http://127\.0\.0\.1).*"), lambda route: route.abort())  # offline: only the site itself
    for name in pages:
        page.goto(f"{server}/{name}")
        page.wait_for_function("document.querySelectorAll('.katex-display').length > 0", timeout=15000)
        text = page.inner_text("main")
        assert "$$" not in text and "\\[" not in text and "\\(" not in text, f"raw TeX left on {name}"
    page.screenshot(path=str(artifact("docs-maths.png")), full_page=False)


def test_sidebar_lists_every_chapter(browser, server):
    page = browser.new_page()
    page.goto(f"{server}/index.html")
    hrefs = page.eval_on_selector_all("#quarto-sidebar a, nav.sidebar a, .sidebar a", "els => els.map(e => e.getAttribute('href'))")
    listed = {Path(h.split("#")[0]).name for h in hrefs if h}
    for nb in CHAPTERS: assert page_name(nb) in listed, f"{page_name(nb)} not in the sidebar {sorted(listed)}"
    page.screenshot(path=str(artifact("docs-index.png")), full_page=True)


def test_sidebar_reads_in_file_order():
    "The book's reading order (the sidebar) is the order JupyterLab lists the notebooks in: by file name, index first."
    import yaml
    def walk(items):
        for item in items:
            if isinstance(item, str): yield item
            else: yield from walk(item.get("contents", []))
    side = yaml.safe_load((ROOT / "nbs" / "sidebar.yml").read_text())["website"]["sidebar"]["contents"]
    listed = list(walk(side))
    assert listed[0] == "index.ipynb" and listed[1:] == sorted(listed[1:]), listed
    assert sorted(listed) == sorted(nb.name for nb in CHAPTERS), "the sidebar and nbs/ list different notebooks"


def test_doc_and_source_links_resolve(browser, server):
    page = browser.new_page()
    page.goto(f"{server}/index.html")
    link = page.locator("a[href^='core.html#']").first  # a backticked symbol nbdev turned into a doc link
    target = link.get_attribute("href").split("#")[1]
    link.click()
    page.wait_for_load_state()
    assert page.url.endswith(f"core.html#{target}")
    assert page.locator(f"[id='{target}']").count() == 1, f"no anchor {target} on core.html"
    source = page.locator("a:text-is('source')").first
    href = source.get_attribute("href")
    assert href.startswith("source/core.py.html#L-"), href
    page.goto(f"{server}/core.html".rsplit("/", 1)[0] + "/" + href)
    assert page.locator(f"[id='{href.split('#')[1]}']").count() == 1


def artifact(name: str) -> Path:
    path = ROOT / "artifacts" / name
    path.parent.mkdir(exist_ok=True)
    return path


# ---------------------------------------------------------------- as a reader sees every page

def pages(site: Path) -> list[str]:
    return sorted(p.name for p in site.glob("*.html"))


READER_TEXT = """() => {
    const main = document.querySelector('main').cloneNode(true);
    main.querySelectorAll('pre, code, script, style, .katex, .katex-display, .sourceCode').forEach(e => e.remove());
    return main.innerText;
}"""


def test_no_raw_markdown_or_tex_in_rendered_text(browser, server, site):
    "Prose, tables and doc entries show no Markdown link syntax and no TeX delimiter (code blocks and maths excluded)."
    page, found = browser.new_page(), {}
    for name in pages(site):
        page.goto(f"{server}/{name}", wait_until="load")
        page.wait_for_timeout(200)
        text = page.evaluate(READER_TEXT)
        bad = [m.group(0) for m in re.finditer(r".{0,40}(?:\]\(|\$|\\\(|\\\[).{0,40}", text)]
        if bad: found[name] = bad[:5]
    assert not found, f"raw Markdown or TeX in rendered text: {found}"


def test_pages_request_no_other_host(browser, server, site):
    "Every page, its stylesheets, scripts and fonts come from the site itself (Playwright's request log)."
    page, foreign = browser.new_page(), set()
    page.on("request", lambda r: foreign.add(r.url) if not r.url.startswith((server, "data:", "blob:")) else None)
    page.route(re.compile(r"^(?!http://127\.0\.0\.1).*"), lambda route: route.abort())
    for name in pages(site):
        page.goto(f"{server}/{name}", wait_until="load")
        page.wait_for_timeout(200)
    assert not foreign, f"requests to other hosts: {sorted(foreign)}"


def test_previous_next_and_footer_on_every_page(browser, server, site):
    page = browser.new_page()
    missing = {}
    for name in pages(site):
        page.goto(f"{server}/{name}")
        links = page.eval_on_selector_all("nav.page-navigation a", "els => els.map(e => e.getAttribute('href'))")
        problems = [] if links else ["no previous/next link"]
        if not page.locator("footer.footer").count(): problems.append("no footer")
        if problems: missing[name] = problems
    assert not missing, missing


def test_contents_lists_stay_short(site):
    "The 'On this page' list holds the chapter's sections, not every documented function."
    long = {}
    for name in pages(site):
        toc = re.search(r'<nav id="TOC".*?</nav>', (site / name).read_text(), re.S)
        n = len(re.findall(r"<li\b", toc.group(0))) if toc else 0
        if n > 20: long[name] = n
    assert not long, f"contents lists longer than 20 entries: {long}"


def test_parameter_tables_fit_the_column(browser, server, site):
    """Documented arguments show as a table, and no table or signature runs past the right edge of the text column (a
    long printed output may scroll)."""
    name = "compression.html"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{server}/{name}")
    assert page.locator("main table th:text-is('parameter')").count() > 0, "no parameter table on compression.html"
    over = page.evaluate("""() => {
        const main = document.querySelector('main').getBoundingClientRect();
        return [...document.querySelectorAll('main table, .cell-output-markdown pre')].filter(e => e.scrollWidth > e.clientWidth + 2 ||
            e.getBoundingClientRect().right > main.right + 2).map(e => e.innerText.slice(0, 60));
    }""")
    assert not over, f"cut off on {name}: {over[:5]}"


def test_code_cells_have_copy_buttons(site):
    for name in pages(site):
        text = (site / name).read_text()
        if "cell-code" in text: assert "code-copy-button" in text, f"{name}: no copy button on code cells"


def test_figure_code_is_folded(site):
    "A cell whose only output is a figure shows the figure and folds its plotting code."
    text = (site / "performance.html").read_text()
    assert re.search(r'<details class="code-fold">', text), "no folded figure code on performance.html"


def contrast(fg: str, bg: str) -> float:
    "WCAG contrast ratio of two CSS `rgb(...)`/`rgba(...)` colours."
    def lum(c):
        r, g, b = (float(v) / 255 for v in re.findall(r"[\d.]+", c)[:3])
        f = lambda v: v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4
        return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b)
    hi, lo = sorted((lum(fg), lum(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_search_results_are_readable(browser, server):
    "Search finds a chapter, its snippets carry no TeX, and their text contrasts with the panel (WCAG AA, 4.5:1)."
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{server}/index.html", wait_until="load")
    box = page.locator("input[type=search]").first
    box.click()
    box.fill("kronecker")
    page.wait_for_selector(".search-result", timeout=10000)
    page.screenshot(path=str(artifact("docs-search.png")))
    texts = page.locator(".search-result").all_inner_texts()
    assert texts and not [t for t in texts if "\\" in t or "$" in t], f"TeX in search snippets: {texts[:3]}"
    colours = page.evaluate("""() => {
        const bg = e => { for (; e; e = e.parentElement) { const c = getComputedStyle(e).backgroundColor;
                          if (c && !c.startsWith('rgba(0, 0, 0, 0)') && c !== 'transparent') return c; } return 'rgb(255, 255, 255)'; };
        return ['.search-result-title', '.search-result-section', '.search-result-text'].map(s => {
            const e = document.querySelector(s); return [s, getComputedStyle(e).color, bg(e)]; });
    }""")
    low = [(s, fg, bg, round(contrast(fg, bg), 2)) for s, fg, bg in colours if contrast(fg, bg) < 4.5]
    assert not low, f"search results below 4.5:1 contrast: {low}"


def notebook_figures() -> list[str]:
    "Every figure in the saved outputs of the chapters that lacks a caption (`#| fig-cap:`) or alt text (`#| fig-alt:`)."
    import json
    import yaml
    missing = []
    for nb in CHAPTERS:
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] != "code": continue
            pics = sum(any(m.startswith("image/") for m in o.get("data", {})) for o in cell.get("outputs", []))
            if not pics: continue
            head = [line[3:] for line in "".join(cell["source"]).splitlines()
                    if re.match(r"#\| [\w-]+\s*:", line)]  # Quarto's key: value options (not nbdev's bare flags)
            try: opts = yaml.safe_load("\n".join(head)) or {}
            except yaml.YAMLError: opts = {}
            opts = opts if isinstance(opts, dict) else {}
            if opts.get("output") is False or opts.get("include") is False: continue
            lacks = [k for k in ("fig-cap", "fig-alt") if not opts.get(k)]
            if lacks: missing.append(f"{nb.name} cell {cell.get('id')}: no {' and no '.join(lacks)}")
    return missing


def test_every_figure_has_a_caption_and_alt_text():
    "Every figure the book shows carries a numbered caption and an alt text (`#| fig-cap:` and `#| fig-alt:` in its cell)."
    missing = notebook_figures()
    assert not missing, f"{len(missing)} figure(s) without caption/alt text:\n" + "\n".join(missing)


def test_figures_draw_no_number_of_their_own():
    "No figure writes a 'Figure N' title into its image: the build numbers figures from their captions."
    import json
    found = []
    for nb in CHAPTERS:
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] != "code": continue
            for m in re.finditer(r"""["']Figure\s*[\d{]""", "".join(cell["source"])):
                found.append(f"{nb.name} cell {cell.get('id')}: {m.group(0)}")
    assert not found, "figures numbered in their own titles:\n" + "\n".join(found)


def test_captions_are_numbered_and_alt_text_set(site):
    "The build numbers every caption per chapter (`Figure 3.1: ...`) and writes its alt text."
    for name in pages(site):
        text = (site / name).read_text()
        for fig in re.findall(r"<figure\b.*?</figure>", text, re.S):
            if "<img" not in fig: continue
            assert re.search(r'<img[^>]*\balt="[^"]+"', fig), f"{name}: a figure without alt text"
            assert re.search(r"<figcaption>Figure (?:\d+|[A-Z])\.\d+: ", fig), f"{name}: a figure caption without its number"


# ---------------------------------------------------------------- layout at a desktop's and a phone's width

LAYOUT = """() => {
    const main = document.querySelector('main'), right = main.getBoundingClientRect().right;
    const cs = e => getComputedStyle(e), head = e => e.tagName.toLowerCase() + ': ' + (e.innerText || '').slice(0, 50);
    const boxed = e => { for (let x = e.parentElement; x && x !== main; x = x.parentElement)
                             if (cs(x).overflowX !== 'visible') return x; return null; };
    const scrolls = e => ['auto', 'scroll'].includes(cs(e).overflowX);
    const out = {};
    const doc = document.documentElement.scrollWidth;
    out.page = doc > window.innerWidth + 1 ? [doc] : [];
    out.softWrap = [...main.querySelectorAll('pre, pre code')].filter(e => cs(e).whiteSpace !== 'pre').map(head);
    out.breakInWord = [...main.querySelectorAll('code, pre')].filter(e => cs(e).wordBreak === 'break-all' ||
        ['anywhere', 'break-word'].includes(cs(e).overflowWrap)).map(head);
    const wide = [...main.querySelectorAll('pre, .math.display, table, .sd-table')]
        .filter(e => e.scrollWidth > e.clientWidth + 1);
    out.hidden = wide.filter(e => !scrolls(e) && !(boxed(e) && scrolls(boxed(e)))).map(head);
    out.noCue = wide.filter(scrolls).filter(e => !cs(e).backgroundImage.includes('gradient')).map(head);
    out.pastColumn = [...main.querySelectorAll('*')]
        .filter(e => !boxed(e) && e.getBoundingClientRect().right > right + 2).map(head);
    const pre = main.querySelector('pre.sourceCode');
    if (pre) {
        const probe = document.createElement('span');
        probe.textContent = 'x'.repeat(100); probe.style.position = 'absolute';
        pre.querySelector('code').appendChild(probe);
        const per = probe.getBoundingClientRect().width / 100, ps = cs(pre);
        probe.remove();
        const inner = pre.clientWidth - parseFloat(ps.paddingLeft) - parseFloat(ps.paddingRight);
        out.codeColumns = Math.floor(inner / per);
    }
    return out;
}"""


@pytest.mark.parametrize("width", [1400, 390])
def test_layout_holds_on_every_page(browser, server, site, width):
    """At 1400 px (desktop) and 390 px (phone): no page is wider than the window; code never soft-wraps and never breaks
    inside a word; a code block, output, table or equation wider than the column scrolls inside its own box and shows
    it (edge shadows); nothing else runs past the column; on a desktop a code block holds 88 to 100 characters."""
    page, found, columns = browser.new_page(viewport={"width": width, "height": 900}), {}, set()
    for name in pages(site):
        page.goto(f"{server}/{name}", wait_until="load")
        page.wait_for_timeout(150)
        r = page.evaluate(LAYOUT)
        if "codeColumns" in r: columns.add(r.pop("codeColumns"))
        bad = {k: v[:3] for k, v in r.items() if v}
        if bad: found[name] = bad
        if name in ("als.html", "adapters.html"): page.screenshot(path=str(artifact(f"docs-{name[:-5]}-{width}.png")))
    assert not found, f"layout problems at {width} px: {found}"
    if width >= 1200: assert columns and all(88 <= c <= 100 for c in columns), f"code columns at {width} px: {columns}"


def test_identifiers_fold_only_between_words():
    "Inline code may fold after `.`, `_`, `/`, `,` between words; code blocks, numbers and dunder names are left alone."
    sys.path.insert(0, str(ROOT / "tools"))
    from build_docs import fold_identifiers
    text = ("<p><code>lt.adapters.save_adapter(m)</code> <code>1e-10, 1.5</code> <code>x_1</code> "
            "<code>__init__</code></p><code>peft/tuners/{lora,loha}.py</code><pre class='x'><code>a.b_c</code></pre>")
    assert fold_identifiers(text) == (
        "<p><code>lt.<wbr>adapters.<wbr>save_<wbr>adapter(m)</code> <code>1e-10, 1.5</code> <code>x_1</code> "
        "<code>__init__</code></p><code>peft/<wbr>tuners/<wbr>{lora,<wbr>loha}.<wbr>py</code>"
        "<pre class='x'><code>a.b_c</code></pre>")


# ---------------------------------------------------------------- links between chapters (tools/fix_links.py)

def test_fix_links_points_pages_at_their_notebooks():
    "Links to a chapter's page become links to its notebook (anchors kept); other links, code and outputs stay."
    sys.path.insert(0, str(ROOT / "tools"))
    from fix_links import fix_notebook, notebook_pages
    pages = notebook_pages(ROOT / "nbs")
    assert pages["als.html"] == "01_als.ipynb" and pages["kernels.html"] == "96_kernels.ipynb"
    assert pages["index.html"] == "index.ipynb" and len(pages) == len(CHAPTERS)
    md = ["See [ALS](als.html#dense_als) and [core](core.html), <a href=\"api.html\">the API</a>,\n",
          "[a site](https://example.org/als.html), [no chapter](nowhere.html), [done](01_als.ipynb).\n"]
    nb = {"cells": [{"cell_type": "markdown", "id": "a1", "metadata": {}, "source": list(md)},
                    {"cell_type": "code", "id": "b2", "metadata": {}, "source": ["# [ALS](als.html)\n"], "outputs": []}]}
    changed = fix_notebook(nb, pages)
    assert nb["cells"][0]["source"] == [
        "See [ALS](01_als.ipynb#dense_als) and [core](95_core.ipynb), <a href=\"99_api.ipynb\">the API</a>,\n", md[1]]
    assert nb["cells"][1]["source"] == ["# [ALS](als.html)\n"] and nb["cells"][0]["id"] == "a1"
    assert changed == [(md[0], nb["cells"][0]["source"][0])]
    assert fix_notebook(nb, pages) == []  # a second run changes nothing


def test_fixed_notebooks_link_to_notebooks():
    "The notebooks `fix_links` has been run on link to chapters as notebooks, which the site build maps to pages."
    sys.path.insert(0, str(ROOT / "tools"))
    from fix_links import fix_notebook, notebook_pages
    import json
    pages = notebook_pages(ROOT / "nbs")
    for name in ("index.ipynb", "01_als.ipynb", "10_explore.ipynb"):
        assert fix_notebook(json.loads((ROOT / "nbs" / name).read_text()), pages) == [], f"{name}: links to pages"
