"""spectralscope.report and `spectralscope report`: a self-contained report.html, opened offline in Chromium."""

from __future__ import annotations

import os
import re

import pytest

from spectralscope.cli import main
from spectralscope.report import report_html

CHROMIUM = "/usr/bin/chromium"


def test_the_report_is_self_contained(sweep_comparison):
    page = report_html(sweep_comparison)
    assert not re.search(r"<script[^>]+src=", page)  # plotly.js inlined: it opens offline
    assert page.count("Plotly.newPlot") == 6  # 4, and 2 of the token-frequency buckets
    for o in ("muon", "adamw", "normuon"):
        assert f">{o}<" in page  # the exponents and runs tables


def test_report_command_writes_the_page_and_says_bad_input_in_one_line(optimizer_sweep, tmp_path, capsys):
    folder = os.path.dirname(os.path.dirname(optimizer_sweep[0]))
    out = tmp_path / "r" / "report.html"
    assert main(["report", folder, "-o", str(out), "--csv", str(tmp_path / "csv")]) == 0
    said = capsys.readouterr().out
    assert out.exists() and "9 runs" in said and "optimizers adamw, muon, normuon" in said  # as found
    assert (tmp_path / "csv" / "runs.csv").exists()
    assert main(["report", str(tmp_path / "nothing"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing: no spectralscope run there" in err[0]


@pytest.mark.slow
def test_report_opens_in_chromium_with_its_plots(sweep_comparison, tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    path = tmp_path / "report.html"
    path.write_text(report_html(sweep_comparison), encoding="utf-8")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:")
                       else route.continue_())  # offline: anything fetched from the network fails
            page.goto(path.as_uri())
            page.wait_for_selector(".js-plotly-plot .main-svg")
            plots = page.locator(".js-plotly-plot")
            assert plots.count() == 6
            for i in range(6):
                assert plots.nth(i).locator(".scatterlayer .trace").count() >= 3  # a trace per optimizer at least
            texts = page.locator(".js-plotly-plot").first.locator(".legendtext")
            legend = {texts.nth(i).text_content() for i in range(texts.count())}
            assert {"muon", "adamw", "normuon"} <= legend
        finally:
            browser.close()
