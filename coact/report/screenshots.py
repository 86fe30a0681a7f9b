"""Screenshots of a built report for the README (docs/report-feature.png and
docs/report-browser.png): a feature page's top, and the feature browser with a label
filter set and a feature's panel open, taken by headless Chromium from file:// (needs
playwright, the dev extra, and a Chromium: /usr/bin/chromium or $CHROMIUM).

    python -m coact.report.screenshots RUN/report/site docs [--feature N] [--label AND]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

WIDTH, HEIGHT = 1280, 1000
BROWSER_HEIGHT = 1300  # the browser's page: its intro, controls, an open panel and rows


def _browser(p: Any) -> Any:
    executable = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    return p.chromium.launch(executable_path=executable, headless=True)


def take(site: Path, out: Path, feature: int | None = None, label: str = "AND") -> list[Path]:
    """Write the two screenshots into `out`; `feature`: the page shown (default: the
    first feature page), `label`: the browser's label filter."""
    from playwright.sync_api import sync_playwright

    pages = sorted((site / "features").glob("out-*.html"), key=lambda p: int(p.stem[4:]))
    page_file = site / "features" / f"out-{feature}.html" if feature is not None else pages[0]
    out.mkdir(parents=True, exist_ok=True)
    shots = [out / "report-feature.png", out / "report-browser.png"]
    with sync_playwright() as p:
        browser = _browser(p)
        tab = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
        tab.goto(page_file.as_uri())
        tab.wait_for_function(
            "() => Array.from(document.querySelectorAll('figure.coact-chart'))"
            ".every((f) => ['yes', 'failed'].includes(f.getAttribute('data-drawn')))",
            timeout=60_000,
        )
        tab.screenshot(path=str(shots[0]))
        tab.goto((site / "features.html").as_uri())
        tab.wait_for_selector("#coact-browser tbody tr")
        tab.locator("#coact-browser select").first.select_option(label)
        rows = tab.evaluate("() => window.COACT_FEATURES.rows")
        columns = tab.evaluate("() => window.COACT_FEATURES.columns")
        c = {name: i for i, name in enumerate(columns)}
        pick = next(
            (r[c["feature"]] for r in rows if r[c["label"]] == label and not r[c["page"]]),
            None,
        )
        if pick is not None:
            tab.locator(f"#out-{pick}").click()
        tab.set_viewport_size({"width": WIDTH, "height": BROWSER_HEIGHT})
        tab.evaluate("() => window.scrollTo(0, 0)")
        tab.screenshot(path=str(shots[1]))
        browser.close()
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--feature", type=int, default=None)
    parser.add_argument("--label", default="AND")
    args = parser.parse_args()
    for path in take(args.site, args.out, args.feature, args.label):
        print(f"{path} ({path.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
