"""The dashboard in a real browser: `spectralscope dashboard` as a subprocess on a free port, a writer process
appending to a live run, Debian's chromium driven by Playwright, screenshotting every page (into the test's
temporary folder: the README's screenshots come from real demo runs, `examples/screenshots.py`)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dashboard_runs import finished_run

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
PAGES = ["runs", "optimizer", "newton-schulz", "updates", "activations", "gradients", "sharpness", "scalars", "scaling"]

pytestmark = pytest.mark.slow


def _need_browser() -> None:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (make test installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def serve(folder: Path, port: int, refresh: float = 1.0) -> subprocess.Popen:
    env = {**os.environ, "SPECTRALSCOPE_REFRESH": str(refresh)}
    proc = subprocess.Popen([sys.executable, "-m", "spectralscope.cli", "dashboard", str(folder), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health")
    except TimeoutError:
        proc.kill()
        raise
    return proc


def browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=["--no-sandbox", "--disable-dev-shm-usage"])


def live_steps(page) -> int:
    """The `steps` cell of live.zarr in the overview table."""
    row = page.locator("tr", has_text="live.zarr").first
    cells = [c.strip() for c in row.locator("td, th").all_inner_texts()]
    header = [c.strip() for c in page.locator("thead tr").first.locator("th").all_inner_texts()]
    return int(re.sub(r"\D", "", cells[header.index("steps")]))


def test_pages_render_in_chromium_and_the_live_run_grows(tmp_path):
    _need_browser()
    from playwright.sync_api import sync_playwright

    folder = tmp_path / "runs"
    folder.mkdir()
    for w in (8, 12, 16):
        finished_run(folder / f"w{w}.zarr", w, steps=48)
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, str(REPO / "tests" / "dashboard_runs.py"), "live",
                               str(folder / "live.zarr"), str(stop)])
    port = free_port()
    server = serve(folder, port)
    shots = tmp_path / "shots"
    shots.mkdir()
    try:
        deadline = time.monotonic() + 60
        while not (folder / "live.zarr" / "optimizer" / "zarr.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        with sync_playwright() as pw:
            b = browser(pw)
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # plotly reports what it cannot draw on the console (e.g. 'Error: <image> attribute height: ... "NaN"')
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Error:" in m.text else None)
            base = f"http://127.0.0.1:{port}"
            for name in PAGES:
                page.goto(f"{base}/{name}")  # /runs too: the default page also answers at /
                if name == "runs":
                    page.wait_for_selector("tr:has-text('live.zarr')", timeout=60_000)
                else:
                    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
                    page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length > 0 && "
                                           "[...document.querySelectorAll('.js-plotly-plot')].every(d => d._fullLayout)",
                                           timeout=60_000)
                    drawn = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')].map(d => "
                                          "d._fullData.some(t => (t.x && t.x.length > 0) || (t.z && t.z.length > 0)))")
                    assert any(drawn), f"no chart on page {name} holds data"
                assert not page.locator("[data-testid='stException']").count(), f"exception on page {name}"
                assert not page.get_by_text("Page not found").count(), name
                page.wait_for_timeout(500)
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
            # deep links keep their run selection; the root serves the runs page
            page.goto(f"{base}/optimizer?run=w8.zarr")
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
            assert not page.get_by_text("Page not found").count()
            assert page.get_by_text("momentum σ̃ at q=0.5 — w8.zarr").count()
            # live: the overview's step count grows with no reload
            page.goto(f"{base}/")
            page.wait_for_selector("tr:has-text('live.zarr')", timeout=60_000)
            first = live_steps(page)
            grown = first
            deadline = time.monotonic() + 30
            while grown <= first and time.monotonic() < deadline:
                page.wait_for_timeout(500)
                grown = live_steps(page)
            assert grown > first, f"live run stayed at {first} steps"
            assert not errors, errors
            b.close()
    finally:
        stop.touch()
        writer.wait(timeout=60)
        server.terminate()
        try:
            log = server.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            server.kill()
            log = server.communicate()[0]
    # nothing runs Streamlit outside its server at start-up (it warns "missing ScriptRunContext" when it does)
    assert "ScriptRunContext" not in log and "Traceback" not in log, log[-2000:]
    # `spectralscope dashboard` becomes the server: stopping it leaves nothing listening behind
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    for name in PAGES:
        assert (shots / f"{name}.png").stat().st_size > 10_000, name

