"""The documentation site builds without Quarto and reads well in a real browser: maths rendered by the site's own
KaTeX, a sidebar with every chapter, doc links and source links that resolve. Saves a screenshot to artifacts/."""
import functools
import http.server
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


def page_name(nb: Path) -> str:
    "The page nbdev names a notebook after: its file name without the leading chapter number."
    return re.sub(r"^\d+[a-z]?_", "", nb.stem) + ".html"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "_docs"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "build_docs.py"), "--out", str(out), "--check-readme"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
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
