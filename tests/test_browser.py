"""The built report in a real browser: headless Chromium opens the site from file:// (it
must work offline, without a server), every chart draws, no script errs, every internal
link resolves, and the index, layer and a feature page are screenshotted.

Needs Debian's `chromium` (`apt-get install chromium`; `.ci/run` installs it) and the
`playwright` package (dev extra), which drives that Chromium: `playwright install` is never
needed. Skips only when no Chromium is found, and fails instead when COACT_REQUIRE_BROWSER=1
(as in CI)."""

from __future__ import annotations

import os
import shutil
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urldefrag, urlparse

import pytest

from coact.pipeline.run import analyze
from tests.tiny_run import tiny_config

CHART_TIMEOUT_MS = 30_000

# Each chart figure: is its vega view drawn, with marks (svg) or non-blank pixels (canvas)?
CHART_STATE = r"""
() => Array.from(document.querySelectorAll("figure.coact-chart")).map((figure) => {
  const view = figure.querySelector(".coact-view");
  const svg = view && view.querySelector("svg");
  const canvas = view && view.querySelector("canvas");
  let marks = 0, inked = false;
  if (svg) marks = svg.querySelectorAll("path, rect, line, circle, text, image").length;
  if (canvas && canvas.width && canvas.height) {
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 0; i < data.length && !inked; i += 4) {
      inked = data[i + 3] !== 0 && (data[i] < 250 || data[i + 1] < 250 || data[i + 2] < 250);
    }
  }
  return { id: figure.id, drawn: figure.getAttribute("data-drawn"), svg: !!svg, marks,
           canvas: !!canvas, inked, fallback: !!figure.querySelector("img.coact-fallback") };
})
"""
# Charts settle when drawn or failed; without vegaEmbed (bundle not loaded) none ever starts.
ALL_SETTLED = r"""
() => typeof window.vegaEmbed !== "function" ||
  Array.from(document.querySelectorAll("figure.coact-chart"))
    .every((f) => ["yes", "failed"].includes(f.getAttribute("data-drawn")))
"""
# Every link, script, style sheet and image the page refers to, as the browser resolved it.
REFERENCES = r"""
() => [
  ...Array.from(document.querySelectorAll("a[href]"), (e) => e.href),
  ...Array.from(document.querySelectorAll("link[href]"), (e) => e.href),
  ...Array.from(document.querySelectorAll("script[src], img[src]"), (e) => e.src),
]
"""
IDS = "() => Array.from(document.querySelectorAll('[id]'), (e) => e.id)"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site of a tiny finished run with every stage, built by `analyze` itself (the
    report tests' settings, 8 feature pages; about 25 s on two busy cores)."""
    run_dir = tmp_path_factory.mktemp("browser") / "run"
    analyze(tiny_config(run_dir, report_features=8))
    index = run_dir / "report" / "site" / "index.html"
    assert index.is_file()
    return index.parent


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    if executable is None:
        reason = "no Chromium (/usr/bin/chromium): apt-get install chromium to run this test"
        if os.environ.get("COACT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"COACT_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - the dev extra installs it
        pytest.fail("the browser test needs playwright: pip install -e '.[dev]'")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, headless=True)
        yield launched
        launched.close()


class _Visit:
    """Opens pages in one tab and keeps every console error, page error and failed load."""

    def __init__(self, browser: Any) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.problems: list[str] = []
        self.page.on("console", self._console)
        self.page.on("request", self._request)
        self.page.on("pageerror", lambda e: self.problems.append(f"{self.url}: error {e}"))
        self.page.on(
            "requestfailed",
            lambda r: self.problems.append(f"{self.url}: failed to load {r.url} ({r.failure})"),
        )

    @property
    def url(self) -> str:
        return str(self.page.url)

    def _console(self, message: Any) -> None:
        # errors, and the report script's warning when vega could not draw a chart
        if message.type == "error" or (message.type == "warning" and "coact" in message.text):
            self.problems.append(f"{self.url}: console {message.type}: {message.text}")

    def _request(self, request: Any) -> None:
        if not request.url.startswith(("file:", "data:", "blob:")):  # offline: nothing else
            self.problems.append(f"{self.url}: fetched {request.url}")

    def open(self, path: Path) -> list[dict[str, Any]]:
        """Load a page, wait for its charts to settle; return their state."""
        self.page.goto(path.as_uri(), wait_until="load")
        self.page.wait_for_function(ALL_SETTLED, timeout=CHART_TIMEOUT_MS)
        return list(self.page.evaluate(CHART_STATE))


def _local(url: str) -> tuple[Path, str] | None:
    """A file:// reference as (file, fragment); None for anything else."""
    bare, fragment = urldefrag(url)
    parsed = urlparse(bare)
    if parsed.scheme != "file":
        return None
    return Path(unquote(parsed.path)), unquote(fragment)


def _png_has_content(png: bytes) -> bool:
    """A PNG whose pixels are not one flat colour (decodes the IDAT stream, no PIL)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat = 8, b""
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind = png[at + 4 : at + 8]
        if kind == b"IDAT":
            idat += png[at + 8 : at + 8 + length]
        at += 12 + length
    return len(set(zlib.decompress(idat))) > 32


def test_report_renders_in_chromium(browser: Any, site: Path, tmp_path: Path) -> None:
    started = time.perf_counter()
    visit = _Visit(browser)
    # 404.html is left out: mkdocs writes it with root-absolute asset paths for a web
    # server's "not found" answer; nothing links to it and the file system never shows it.
    pages = sorted(p for p in site.rglob("*.html") if p.name != "404.html")
    index, layer = site / "index.html", site / "layer-1.html"
    feature = sorted((site / "features").glob("out-*.html"))[0]
    assert {index, layer, feature} <= set(pages)

    charts: dict[str, list[dict[str, Any]]] = {}
    ids: dict[Path, set[str]] = {}
    references: dict[Path, set[str]] = {}
    for page in pages:
        charts[str(page.relative_to(site))] = visit.open(page)
        ids[page] = set(visit.page.evaluate(IDS))
        references[page] = set(visit.page.evaluate(REFERENCES))
        if page in (index, layer, feature):
            shot = tmp_path / f"{page.stem}.png"
            visit.page.screenshot(path=str(shot), full_page=True)
            png = shot.read_bytes()
            assert len(png) > 20_000 and _png_has_content(png), shot

    # every chart drew: a vega view with marks (svg) or ink (canvas), the fallback gone
    drawn = [c for state in charts.values() for c in state]
    bad = {
        page: [c for c in state if not (c["drawn"] == "yes" and (c["marks"] > 5 or c["inked"]))]
        for page, state in charts.items()
    }
    assert not any(bad.values()), {p: b for p, b in bad.items() if b}
    assert not any(c["fallback"] for c in drawn)
    assert len(charts["layer-1.html"]) >= 10 and charts["index.html"]
    assert charts[str(feature.relative_to(site))]
    assert not visit.problems, visit.problems[:10]

    # every internal reference resolves: the file exists, and a #fragment names an element
    # of the page it points to (pages' ids as the browser sees them, after scripts ran)
    broken = []
    for page, refs in references.items():
        for ref in refs:
            target = _local(ref)
            if target is None:
                continue
            path, fragment = target
            if site.resolve() not in path.resolve().parents:  # the site must move as a whole
                broken.append(f"{page.relative_to(site)} → {ref} (outside the site)")
            elif not path.is_file():
                broken.append(f"{page.relative_to(site)} → {ref}")
            elif fragment and path.suffix == ".html" and fragment not in ids.get(path, set()):
                broken.append(f"{page.relative_to(site)} → {ref} (no such anchor)")
    assert not broken, broken[:10]

    # navigation works by clicking: index → layer page → a feature page → back to the index
    visit.page.goto(index.as_uri())
    visit.page.locator("a[href$='layer-1.html']").first.click()
    visit.page.wait_for_load_state("load")
    assert visit.page.url == layer.as_uri()
    link = visit.page.locator(f"article a[href$='features/{feature.name}']").first
    link.click()
    visit.page.wait_for_load_state("load")
    assert visit.page.url == feature.as_uri()
    visit.page.locator("a[href$='index.html']").first.click()
    visit.page.wait_for_load_state("load")
    assert visit.page.url == index.as_uri()
    assert not visit.problems, visit.problems[:10]
    seconds = time.perf_counter() - started
    print(f"browser: {len(pages)} pages, {len(drawn)} charts drawn in {seconds:.1f} s")


@pytest.fixture(scope="module")
def model_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model run of tests/test_report_model.py (all three layers of tiny-llama, with
    their reports and the model page), built once per session for both modules."""
    from tests.test_report_model import build_model_run

    return build_model_run(tmp_path_factory)


def test_model_report_renders_in_chromium(browser: Any, model_run: Path) -> None:
    """The model page and a layer page of the model run: every chart draws, nothing errs,
    every reference resolves inside the run directory, and the links between the model
    page and a layer's site work by clicking, from file://."""
    visit = _Visit(browser)
    index = model_run / "report" / "site" / "index.html"
    layer_site = model_run / "L1" / "report" / "site"
    layer = layer_site / "layer-1.html"
    feature = sorted((layer_site / "features").glob("out-*.html"))[0]
    attention = sorted((layer_site / "features").glob("attn-*.html"))
    assert attention  # a block layer's top attention features have pages of their own
    broken = []
    for page in (index, layer, feature, *attention):
        state = visit.open(page)
        bad = [c for c in state if not (c["drawn"] == "yes" and (c["marks"] > 5 or c["inked"]))]
        assert state and not bad, (page, bad)
        assert not any(c["fallback"] for c in state)
        for ref in visit.page.evaluate(REFERENCES):
            target = _local(ref)
            if target is None:
                continue
            path = target[0]
            if model_run.resolve() not in path.resolve().parents or not path.is_file():
                broken.append(f"{page.relative_to(model_run)} → {ref}")
    assert not broken, broken[:10]
    assert len(visit.open(index)) >= 3
    visit.page.locator("article a[href$='L1/report/site/index.html']").first.click()
    visit.page.wait_for_load_state("load")
    assert visit.page.url == (layer_site / "index.html").as_uri()
    visit.page.locator("article a", has_text="the model report").first.click()
    visit.page.wait_for_load_state("load")
    assert visit.page.url == index.as_uri()
    assert not visit.problems, visit.problems[:10]


# The feature browser's list: how many rows show, and the median row's height in pixels.
ROWS = r"""
() => {
  const h = Array.from(document.querySelectorAll("#coact-browser tbody tr"),
                       (r) => r.getBoundingClientRect().height).sort((a, b) => a - b);
  return { rows: h.length, median: h.length ? h[Math.floor(h.length / 2)] : 0 };
}
"""
# Every element holding a context: the narrowest one's width, and whether any is a table cell.
CONTEXT_BOXES = r"""
() => {
  const held = Array.from(document.querySelectorAll(".coact-context"), (e) => e.parentElement);
  return { n: held.length, narrowest: Math.min(...held.map((e) => e.getBoundingClientRect().width)),
           cells: held.filter((e) => e.closest("td, th")).length };
}
"""


def _rows(page: Any) -> dict[str, float]:
    return dict(page.evaluate(ROWS))


def test_feature_browser_at_1280_and_1920(browser: Any, site: Path) -> None:
    """The all-features page is a compact browser: one short line per feature; search and
    a filter narrow it; a row of a feature without a page opens a panel with its contexts;
    no context is squeezed under 360 px there or on a feature page."""
    started = time.perf_counter()
    feature = sorted((site / "features").glob("out-*.html"))[0]
    for width in (1280, 1920):
        visit = _Visit(browser)
        page = visit.page
        page.set_viewport_size({"width": width, "height": 900})
        page.goto((site / "features.html").as_uri())
        page.wait_for_selector("#coact-browser tbody tr")
        data = page.evaluate("() => window.COACT_FEATURES")
        c = {name: i for i, name in enumerate(data["columns"])}
        everything = _rows(page)
        assert everything["rows"] == len(data["rows"]) > 100
        assert everything["median"] <= 40, (width, everything)
        # search by a feature's number: that feature (and those reading an input of that number)
        search = page.locator("#coact-browser input[type=search]")
        search.fill("7")
        found = _rows(page)["rows"]
        assert 1 <= found < everything["rows"] and page.locator("#out-7").count() == 1
        search.fill("")
        # a label filter: only that label's features remain
        label = sorted({r[c["label"]] for r in data["rows"] if r[c["label"]]})[0]
        page.locator("#coact-browser select").first.select_option(label)
        shown = page.locator("#coact-browser tbody tr")
        want = sum(r[c["label"]] == label for r in data["rows"])
        assert shown.count() == want < everything["rows"]
        page.locator("#coact-browser select").first.select_option("")
        assert _rows(page)["rows"] == everything["rows"]
        # a feature without a page opens its panel: formula, inputs, contexts
        j = next(
            r[c["feature"]] for r in data["rows"]
            if not r[c["page"]] and str(r[c["feature"]]) in data["contexts"]
        )  # fmt: skip
        page.locator(f"#out-{j}").click()
        panel = page.locator("#coact-detail")
        panel.wait_for(state="visible")
        text = panel.inner_text()
        assert f"out {j}" in text and f"coact report RUN --feature {j}" in text
        boxes = page.evaluate(CONTEXT_BOXES)
        assert boxes["n"] >= 1 and boxes["narrowest"] >= 360 and not boxes["cells"], boxes
        # a feature page: its contexts (its own and its inputs') are full-width lines
        visit.open(feature)
        boxes = page.evaluate(CONTEXT_BOXES)
        assert boxes["n"] >= 3 and boxes["narrowest"] >= 360 and not boxes["cells"], boxes
        assert not visit.problems, visit.problems[:10]
        page.close()
    print(f"feature browser checked at 1280 and 1920 px in {time.perf_counter() - started:.1f} s")
