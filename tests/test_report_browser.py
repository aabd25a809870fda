"""The study's report.html in a real browser: headless Chromium (Debian's /usr/bin/chromium
and /usr/bin/chromedriver, driven by selenium) loads it, every <img> has loaded, the console
has no errors, and a screenshot is taken. Skipped only where Chromium or its driver is not
installed (.ci/run installs both)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file():
            return f"{path} is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    from attnlab.compare import StudySettings, run_study

    s = StudySettings(
        models=("S", "L"),
        d_model=16,
        n_layers=2,
        window=8,
        tasks=("mqar:num_pairs=2", "needle:key_len=2,value_digits=2", "mrcr:num_topics=2"),
        train_len=80,
        lengths=(80, 96),
        depths=(0.0, 0.5, 1.0),
        steps=3,
        batch_size=4,
        eval_samples=2,
        workers=1,
        cost={"d_model": 16, "n_heads": 2, "prefill_contexts": [32, 64], "decode_contexts": [32, 64]},
    )
    out = tmp_path_factory.mktemp("browser") / "study"
    run_study(s, out, progress=False)
    return out / "report.html"


@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
def test_report_opens_in_headless_chromium(report, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", "--window-size=1280,2000",
                 f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        driver.get(report.as_uri())
        assert "attnlab compare" in driver.title
        images = driver.execute_script(
            "return Array.from(document.images)"
            ".map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);"
        )
        assert len(images) >= 5  # recall, heatmaps, Pareto, cache, cost plots
        for alt, complete, width, height in images:
            assert complete and width > 0 and height > 0, f"image {alt!r} did not load"
        headings = driver.execute_script(
            "return Array.from(document.querySelectorAll('h2')).map(h => h.textContent);"
        )
        for title in ("Summary", "Recall vs context length", "Recall vs memory", "Cost vs context",
                      "Diagnostics"):  # fmt: skip
            assert title in headings
        cells = driver.execute_script("return document.querySelectorAll('table td').length;")
        assert cells > 20
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        shot = tmp_path / "report.png"
        driver.set_window_size(1280, 2000)
        assert driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
