"""The README's screenshots, from real runs: every dashboard page and report.html, in headless Chromium.

    spectralscope demo                      # runs/demo: the sweeps of every optimizer, and runs/demo/report.html
    python examples/screenshots.py runs/demo [--out docs/img]

Serves `spectralscope dashboard` on the folder, selects every run in it, and saves each page (and the report,
opened from its file) as a full-page PNG. Needs Debian's chromium (`make test` installs it) and Playwright.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
PAGES = ["runs", "optimizer", "newton-schulz", "updates", "activations", "gradients", "sharpness", "scalars", "scaling",
         "compare"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def wait_plots(page, timeout_ms: int = 120_000) -> None:
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=timeout_ms)
    page.wait_for_function("[...document.querySelectorAll('.js-plotly-plot')].every(d => d._fullLayout)",
                           timeout=timeout_ms)
    page.wait_for_timeout(1500)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", help="a folder of runs (runs/demo)")
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    folder, out = Path(args.runs).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.zarr") if (p / "zarr.json").exists())
    if not runs:
        sys.exit(f"no runs under {folder}: run `spectralscope demo` first")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "spectralscope.cli", "dashboard", str(folder), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health")
        query = "&".join(f"run={r}" for r in runs)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for name in PAGES:
                page.goto(f"http://127.0.0.1:{port}/{name}?{query}")
                if name == "runs":
                    page.wait_for_selector("table", timeout=120_000)
                    page.wait_for_timeout(1500)
                else:
                    wait_plots(page)
                page.screenshot(path=str(out / f"{name}.png"), full_page=True)
                print(f"{out / (name + '.png')}", flush=True)
            report = folder / "report.html"
            if report.exists():
                page.goto(report.as_uri())
                wait_plots(page)
                page.screenshot(path=str(out / "report.png"), full_page=True)
                print(out / "report.png")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
