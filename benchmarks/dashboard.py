"""Load time of the dashboard's scaling-laws page on many long runs, in headless Chromium.

    python benchmarks/dashboard.py [--runs 20] [--steps 5000] [--depth 8] [--repeat 3] [--keep DIR]

Writes `--runs` stores through the real `RunWriter` (optimizer group, SPEC layout), each with `--steps`
recorded rows for the 6·depth = 48 matrices of a GPT of depth 8 and a width that grows from run to run;
the values follow a power law in model size with noise, so every group has a fit. Then starts
`spectralscope dashboard` on the folder, opens /scaling in Debian's chromium (Playwright) and times
navigation → every chart drawn with data: first on a fresh server (cold: nothing cached), then again
(warm: Streamlit's cache holds the settled values of runs that did not change). Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_dashboard_browser import CHROMIUM, browser, free_port, serve  # noqa: E402

from spectralscope.gpt import GPT, GPTConfig  # noqa: E402
from spectralscope.layers import layer_coords, select_layers  # noqa: E402
from spectralscope.measure import OPTIMIZER_VARIABLES  # noqa: E402
from spectralscope.spectra import DEFAULT_QUANTILES  # noqa: E402
from spectralscope.store import GroupSpec, RunWriter  # noqa: E402


def write_run(path: Path, width: int, depth: int, steps: int, seed: int) -> int:
    """A run store with ``steps`` optimizer rows for a GPT of this width and depth; returns its size."""
    model = GPT(GPTConfig(vocab=64, width=width, depth=depth, heads=4, ctx=32))
    opt = torch.optim.Muon(model.hidden_matrices(), lr=0.02)
    layers = select_layers(opt, model)
    size = sum(p.numel() for p in model.parameters())
    coords = {**layer_coords(layers), "quantile": ("quantile", np.array(DEFAULT_QUANTILES))}
    dims = {v: ("step", "layer", "quantile") if q else ("step", "layer") for v, q in OPTIMIZER_VARIABLES.items()}
    spec = GroupSpec("optimizer", coords, dims)
    attrs = {"name": path.stem, "model_size": size, "optimizer": {"class": "Muon", "ns_steps": 5}, "meta": {}}
    writer = RunWriter(path, [spec], attrs, flush_seconds=60)
    rng = np.random.default_rng(seed)
    nl, nq = len(layers), len(DEFAULT_QUANTILES)
    base = (size / 1e5) ** -0.3 * np.linspace(0.2, 1.0, nq)[None, :] * rng.uniform(0.5, 1.5, (nl, 1))
    for s in range(steps):
        settle = 1.0 + 2.0 * np.exp(-s / (0.1 * steps))
        row = {v: (base * settle * rng.lognormal(0, 0.05, (nl, nq)) if q else rng.lognormal(-3, 0.3, nl))
               for v, q in OPTIMIZER_VARIABLES.items()}
        writer.append("optimizer", s, row)
    writer.update_attrs(steps=steps)
    writer.close()
    return size


DRAWN = ("() => { const d = [...document.querySelectorAll('.js-plotly-plot')];"
         " return d.length > 0 && d.every(p => p._fullData && p._fullData.some(t => t.x && t.x.length > 0)); }")


def scenarios(folder: Path) -> dict[str, float]:
    """Seconds from navigation to the scaling page's charts drawn with data, in four situations on one
    fresh server: (1) a new tab straight to /scaling on the fresh server (imports, cold caches); (2) a tab
    already showing the Runs page clicks "Scaling laws" (settled values not cached yet); (3) a new tab
    opens /scaling (the page's JavaScript loads again, data cached); (4) in that tab, Runs → Scaling laws."""
    from playwright.sync_api import sync_playwright

    out = {}
    port = free_port()
    server = serve(folder, port, refresh=30)
    base = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as pw:
            b = browser(pw)
            def timed(action) -> float:
                t = time.perf_counter()
                action()
                page.wait_for_function(DRAWN, timeout=120_000, polling=50)
                return time.perf_counter() - t

            def to_runs_page() -> None:
                page.get_by_text("Runs", exact=True).first.click() if page.url.endswith("/scaling") \
                    else page.goto(f"{base}/")
                page.wait_for_selector("table", timeout=120_000)

            def click_scaling() -> None:
                page.get_by_text("Scaling laws", exact=True).first.click()

            page = b.new_page(viewport={"width": 1400, "height": 1000})
            out["fresh server, new tab"] = timed(lambda: page.goto(f"{base}/scaling"))
            page.close()
            server.terminate()
            server.wait(timeout=30)
            server = serve(folder, port, refresh=30)
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            to_runs_page()
            out["in-app click, data not cached"] = timed(click_scaling)
            page.close()
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            out["new tab, data cached"] = timed(lambda: page.goto(f"{base}/scaling"))
            to_runs_page()
            out["in-app click, data cached"] = timed(click_scaling)
            b.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", default=None, help="write the runs here (and reuse them) instead of a temporary folder")
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        sizes = []
        for i in range(args.runs):
            path = folder / f"w{32 + 8 * i:04d}.zarr"
            if not path.exists():
                sizes.append(write_run(path, 32 + 8 * i, args.depth, args.steps, seed=i))
        built = time.perf_counter() - t
        disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        rounds = [scenarios(folder) for _ in range(args.repeat)]
    print(f"{args.runs} runs × {args.steps} steps × {6 * args.depth} layers × {len(DEFAULT_QUANTILES)} quantiles "
          f"({disk / 1e6:.0f} MB on disk; written in {built:.0f} s{'' if sizes else ', reused'}); "
          f"navigation → scaling charts drawn, median of {args.repeat} rounds (target ≤ 3 s)")
    print(f"{'situation':<34} {'median':>8} {'min–max':>14}")
    for key in rounds[0]:
        v = [r[key] for r in rounds]
        print(f"{key:<34} {statistics.median(v):7.2f}s {min(v):6.2f}–{max(v):.2f}s")


if __name__ == "__main__":
    main()
