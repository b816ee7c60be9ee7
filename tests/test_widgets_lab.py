"End to end: the explorers of `nbs/10_explore.ipynb` in a real JupyterLab, driven by headless Chromium through Playwright."
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
NOTEBOOK = "nbs/10_explore.ipynb"
ERROR = re.compile(r"relative error:\s*([0-9.]+)")

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("jupyterlab")
if not Path(CHROMIUM).exists(): pytest.skip(f"{CHROMIUM} is not installed", allow_module_level=True)


def free_port() -> int:
    "A free TCP port on the loopback interface."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_repo(dest: Path) -> Path:
    "The parts of the repository a notebook needs, copied under `dest` (Lab autosaves: never touch the real one)."
    for name in ("nbs", "lowrank_tales"): shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    for name in ("settings.ini", "pyproject.toml"): shutil.copy(ROOT / name, dest / name)
    return dest


def start_lab(repo: Path, conf: Path, port: int) -> subprocess.Popen:
    "JupyterLab on 127.0.0.1:`port`, no token, no browser, news check off, all settings in `conf`."
    settings = conf / "share" / "jupyter" / "lab" / "settings"
    settings.mkdir(parents=True)
    (settings / "overrides.json").write_text(json.dumps({"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(conf / "config"), JUPYTER_RUNTIME_DIR=str(conf / "runtime"),
               PYTHONPATH=str(repo), LOWRANK_TALES_PROGRESS="0", MPLBACKEND="module://matplotlib_inline.backend_inline")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.token=",
           "--ServerApp.password=", f"--ServerApp.root_dir={repo}", f"--LabApp.app_settings_dir={settings}",
           f"--LabApp.user_settings_dir={conf / 'user-settings'}", f"--LabApp.workspaces_dir={conf / 'workspaces'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0: cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, env=env, cwd=repo, stdout=subprocess.DEVNULL, stderr=open(conf / "lab.log", "wb"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2): return proc
        except OSError: time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"JupyterLab did not start: {(conf / 'lab.log').read_text()[-2000:]}")


def wait_idle(page, timeout_s: float = 60) -> None:
    "Until the kernel is idle and no cell is queued or running (`[*]`)."
    page.wait_for_function("""() => {
        const busy = [...document.querySelectorAll('.jp-InputPrompt')].some(p => p.textContent.includes('*'));
        const status = document.querySelector('#jp-main-statusbar')?.innerText || '';
        return !busy && status.includes('Idle');
    }""", timeout=timeout_s * 1000, polling=200)


def read_error(page):
    "The relative error the approximation explorer shows (None while it is being redrawn)."
    texts = page.locator(".lrt-approx-result").all_inner_texts()
    found = [ERROR.search(t) for t in texts]
    return next((float(m.group(1)) for m in found if m), None)


def settled_error(page, before: float, timeout_s: float = 20) -> float:
    "The displayed error once it differs from `before` and has stopped changing."
    deadline, last, since = time.monotonic() + timeout_s, before, time.monotonic()
    while time.monotonic() < deadline:
        now = read_error(page)
        if now is not None and now != last: last, since = now, time.monotonic()
        if last != before and time.monotonic() - since > 1.5: return last
        time.sleep(0.2)
    return last


def test_explorer_in_jupyterlab(tmp_path):
    t0 = time.monotonic()
    repo, conf = copy_repo(tmp_path / "repo"), tmp_path / "jupyter"
    port = free_port()
    lab = start_lab(repo, conf, port)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"])
            page = None
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(30_000)
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}")
                page.locator(".jp-Notebook").first.wait_for()
                select = page.locator(".jp-Dialog button", has_text="Select")  # the notebook names no kernel
                try: select.first.click(timeout=15_000)
                except sync_api.TimeoutError: pass
                wait_idle(page, 40)
                page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
                page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
                page.locator(".lrt-budget-result").first.wait_for(timeout=70_000)  # the last explorer has rendered
                wait_idle(page, 30)
                result = page.locator(".lrt-approx-result").first
                result.scroll_into_view_if_needed()
                page.wait_for_function("() => /relative error:\\s*[0-9]/.test(document.querySelector('.lrt-approx-result')?.innerText || '')", timeout=20_000)
                before = read_error(page)
                handle = page.locator(".lrt-approx-k .noUi-handle").first
                handle.focus()
                for _ in range(3): page.keyboard.press("ArrowRight")
                after = settled_error(page, before)
                wait_idle(page, 20)
                (ROOT / "artifacts").mkdir(exist_ok=True)
                page.screenshot(path=str(ROOT / "artifacts" / "widgets-lab.png"))
                assert after < before, f"raising the rank should lower the error: {before} -> {after}"
                assert "rank" in page.locator(".lrt-approx-k").first.inner_text()
                from lowrank_tales.widgets import approximate  # the kernel-independent value: truncated SVD, rank 8 + 3
                assert abs(after - approximate("truncated SVD", 11).error) < 1e-4, after
            except Exception:
                if page is None: raise
                (ROOT / "artifacts").mkdir(exist_ok=True)
                page.screenshot(path=str(ROOT / "artifacts" / "widgets-lab-failure.png"))
                print("status bar:", page.locator("#jp-main-statusbar").first.inner_text())
                raise
            finally: browser.close()
    finally:
        lab.terminate()
        try: lab.wait(10)
        except subprocess.TimeoutExpired: lab.kill()
    assert time.monotonic() - t0 < 90
