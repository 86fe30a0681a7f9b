"""The report: a tiny run → markdown + charts → an offline mkdocs-material site."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from coact.errors import CoactError
from coact.pipeline.run import analyze
from coact.report.build import build_report
from coact.report.charts.base import spec_title, untitled_axes
from coact.report.evidence import Evidence
from coact.rundir.layout import OutlierFiles
from coact.rundir.verify import stamp
from tests.tiny_run import tiny_config

LAYER_CHARTS = {
    "mlp-curve",
    "lasso-path",
    "families",
    "pareto",
    "d-distribution",
    "noise",
    "threshold",
    "splices",
    "causal",
    "label-counts",
}
# URLs that appear as text in the bundled scripts but are never fetched here: XML
# namespaces, vega's schema id, editor link and an error message, and Material's
# code paths for a repository link, mermaid diagrams and browsers without
# ResizeObserver (the report has none of them).
ALLOWED_URLS = (
    "http://www.w3.org/",
    "https://vega.github.io/schema/",
    "https://vega.github.io/editor/",
    "https://github.com/vega/vega-lite/issues/",
    "https://api.github.com/",
    "https://${",
    "https://unpkg.com/mermaid@",
    "https://unpkg.com/resize-observer-polyfill",
    "https://clipboardjs.com/",
    "https://bit.ly/",
    "https://developer.mozilla.org/",
    "https://github.com/",
)
URL = re.compile(r"https?://[^\s\"'<>`)\\]+")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny finished run with every stage (about 20 s on two busy cores)."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    analyze(tiny_config(run_dir))
    return run_dir


@pytest.fixture(scope="module")
def site(run: Path) -> Path:
    index = build_report(run, features=8, progress=False)
    assert index == run / "report" / "site" / "index.html"
    return index.parent


class _Tags(HTMLParser):
    """Every tag's attributes, and each chart figure's spec, caption and fallback image."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.figures: list[dict[str, str]] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "figure" and "coact-chart" in a.get("class", ""):
            self.figures.append({"id": a.get("id", ""), "spec": "", "caption": "", "img": ""})
        elif self.figures and tag == "script" and "coact-spec" in a.get("class", ""):
            self._in = "spec"
        elif self.figures and tag == "figcaption":
            self._in = "caption"
        elif self.figures and tag == "img" and "coact-fallback" in a.get("class", ""):
            self.figures[-1]["img"] = a.get("src", "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "figcaption"):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in and self.figures:
            self.figures[-1][self._in] += data


def _parse(path: Path) -> _Tags:
    parser = _Tags()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_site_has_index_layer_and_feature_pages(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert (site / "layer-1.html").is_file() and (site / "features.html").is_file()
    pages = sorted((site / "features").glob("out-*.html"))
    assert len(pages) == 8
    index = (site / "index.html").read_text()
    assert "tiny-llama" in index and "SAE quality" in index
    # a run without block results: no attention or composition; its feature pages' layer
    # graphs are the MLP connector's alone
    layer = (site / "layer-1.html").read_text()
    assert ">Attention<" not in layer and ">Residual composition<" not in layer
    assert all(">Layer graph<" in p.read_text() for p in pages)
    assert "the MLP's connector only" in pages[0].read_text()
    assert (site / "graphs").is_dir() and "the model report" not in index
    # the jacobian stage's sections, with the run's own figures
    assert ">How far to trust this<" in layer and ">The block's own Jacobian<" in layer
    assert "Three-way agreement of strong connections" in layer
    assert all("From the block's own Jacobian" in p.read_text() for p in pages)


def test_every_page_linked_from_the_layer_page_exists(site: Path) -> None:
    layer = site / "layer-1.html"
    hrefs = {a["href"] for tag, a in _parse(layer).tags if tag == "a" and a.get("href")}
    local = {h.split("#")[0] for h in hrefs if not re.match(r"^[a-z]+:|^#|^//", h)} - {""}
    feature_links = {h for h in local if h.startswith("features/out-")}
    assert len(feature_links) == 8, sorted(local)
    missing = [h for h in local if not (layer.parent / h).resolve().exists()]
    assert not missing, missing


def test_nothing_is_fetched_from_a_network(site: Path) -> None:
    files = [p for p in site.rglob("*") if p.suffix in (".html", ".js", ".css")]
    assert any(p.name == "vega.js" for p in files)
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        text = re.sub(r"(<|\\3c\s?)!--.*?--", "", text, flags=re.S)  # licence comments
        if path.suffix == ".html":
            for tag, a in _parse(path).tags:
                for attr in ("src", "data") if tag != "link" else ("href",):
                    ref = a.get(attr, "")
                    assert not re.match(r"^([a-z]+:)?//", ref), (path, tag, ref)
        if path.suffix == ".css":
            text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
            assert not re.search(r"url\(\s*['\"]?(https?:)?//|@import", text), path
        stray = [u for u in URL.findall(text) if not u.startswith(ALLOWED_URLS)]
        assert not stray, (path, stray[:5])
        if path.suffix == ".html":  # the report's own pages name no URL at all
            assert "unpkg.com" not in text and "fonts.googleapis" not in text, path


def test_every_chart_has_a_title_axis_titles_a_caption_and_a_fallback(site: Path) -> None:
    seen: set[str] = set()
    for page in site.rglob("*.html"):
        for figure in _parse(page).figures:
            spec = json.loads(figure["spec"])
            name = figure["id"].removeprefix("chart-")
            seen.add(name)
            assert spec_title(spec), (page, name)
            assert not untitled_axes(spec), (page, name, untitled_axes(spec))
            caption = figure["caption"].replace("static image", "").strip()
            assert caption.startswith("Read:") and len(caption) > 30, (page, name)
            if page.parent.name == "features":  # feature pages: the inline spec alone
                assert not figure["img"] and "static image" not in figure["caption"], page
            else:
                assert figure["img"] and (page.parent / figure["img"]).is_file(), (page, name)
    assert seen >= LAYER_CHARTS | {"sae-training"}, sorted(LAYER_CHARTS - seen)
    assert any(n.endswith("-histogram") for n in seen)
    assert any(n.endswith("-coactivation") for n in seen)


def test_feature_page_shows_formula_and_marks_the_activating_token(run: Path, site: Path) -> None:
    features = pl.read_parquet(run / "connect" / "features.parquet")
    page = sorted((site / "features").glob("out-*.html"))[0]
    j = int(page.stem.removeprefix("out-"))
    text = page.read_text(encoding="utf-8")
    formula = features.filter(pl.col("feature") == j)["formula"][0]
    assert html.escape(formula, quote=False) in text
    for section in (
        "Inputs",
        "Evidence: where it fires",
        "Linearity",
        "Logic label",
        "Causal check",
    ):
        assert f">{section}<" in text, section
    # the first context line: its outlined token carries the line's activation
    evidence = text[text.index("Evidence: where it fires") :]
    row = re.search(
        r'<div class="coact-line" data-rank="1">.*?<span class="coact-act">([^<]+)</span>'
        r"(.*?)</div>",
        evidence,
        re.S,
    )
    assert row is not None
    marked = re.findall(r'class="coact-tok coact-max"[^>]*title="activation ([^";]+)', row.group(2))
    assert len(marked) == 1 and float(marked[0]) == pytest.approx(float(row.group(1)), rel=1e-2)
    # the histogram and the inputs' contributions sit beside the formula; contexts are
    # never in a table cell
    beside = text[text.index('class="coact-beside"') : text.index(">Inputs<")]
    assert (
        f'id="chart-out-{j}-histogram"' in beside and f'id="chart-out-{j}-contributions"' in beside
    )
    assert not re.search(r"<td[^>]*>[^/]*?coact-context", text)


def test_top_contexts_are_distinct_ranked_and_marked(run: Path) -> None:
    evidence = Evidence(run / "codes", lambda ids: "".join(chr(65 + i % 26) for i in ids))
    codes = evidence.codes("mlp_out.1")
    j = int(np.argmax(np.diff(codes.indptr)))  # the most active feature
    top = evidence.top_contexts("mlp_out.1", j, k=5, before=3, after=2)
    assert len(top) == 5 and len({c.context for c in top}) == 5
    assert [c.activation for c in top] == sorted((c.activation for c in top), reverse=True)
    assert top[0].activation == pytest.approx(evidence.activations("mlp_out.1", j).max())
    for c in top:
        assert c.values[c.marked] == pytest.approx(c.activation)
        assert len(c.tokens) == len(c.values) <= 6 and c.marked <= 3


def test_run_without_logic_or_calibration_still_builds(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report"))
    shutil.rmtree(copy / "logic")
    shutil.rmtree(copy / "calibrate")
    index = build_report(copy, tmp_path / "out", features=[0, 3], progress=False)
    layer = (index.parent / "layer-1.html").read_text(encoding="utf-8")
    assert "Features were not labelled" in layer and "was not calibrated" in layer
    assert "pareto" in layer  # the connect stage's charts are still there
    page = (index.parent / "features" / "out-3.html").read_text(encoding="utf-8")
    assert "coact-max" in page and "No causal check" in page


def test_refuses_a_foreign_directory_and_unknown_features(run: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CoactError, match="not a coact report directory"):
        build_report(run, foreign, features=[0], progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(CoactError, match="not output features"):
        build_report(run, tmp_path / "new", features=[10**6], progress=False)
    assert not (tmp_path / "new").exists()


# vegaEmbed from the site's own bundle, run in node on every inline spec with a minimal
# fake DOM; each view is rendered to SVG by vega's headless path.
DRAW_ALL = r"""
const fs = require("fs"), path = require("path"), vm = require("vm");
const site = process.argv[2];
function el(tag) {
  return { tagName: tag, nodeName: tag.toUpperCase(), children: [], childNodes: [], style: {},
    attributes: {}, innerHTML: "", ownerDocument: null,
    get firstChild() { return this.childNodes[0] || null; },
    get lastChild() { return this.childNodes[this.childNodes.length - 1] || null; },
    classList: { add() {}, remove() {}, contains() { return false; } },
    appendChild(c) { this.children.push(c); this.childNodes.push(c); return c; },
    insertBefore(c) { this.childNodes.push(c); return c; }, replaceChild(c) { return c; },
    removeChild(c) { return c; }, remove() {}, setAttribute(k, v) { this.attributes[k] = v; },
    getAttribute(k) { return this.attributes[k]; }, addEventListener() {},
    removeEventListener() {}, getRootNode() { return doc; },
    getBoundingClientRect() { return { left: 0, top: 0, width: 500, height: 300 }; },
    querySelector() { return null; }, querySelectorAll() { return []; } };
}
const doc = { head: el("head"), body: el("body"), createElement: el,
  createElementNS: (ns, t) => el(t), getElementById() { return null; },
  querySelector() { return null; }, addEventListener() {}, removeEventListener() {} };
const box = { console, setTimeout, clearTimeout, setInterval, clearInterval, URL, TextEncoder,
  TextDecoder, structuredClone, queueMicrotask, document: doc, ShadowRoot: function () {},
  navigator: { userAgent: "node" } };
box.window = box; box.globalThis = box; box.self = box;
vm.createContext(box);
vm.runInContext(fs.readFileSync(path.join(site, "assets/javascripts/vega.js"), "utf8"), box);
const pages = [];
(function walk(d) {
  for (const f of fs.readdirSync(d)) {
    const p = path.join(d, f);
    if (fs.statSync(p).isDirectory()) walk(p); else if (p.endsWith(".html")) pages.push(p);
  }
})(site);
const re = /<script type="application\/json" class="coact-spec">([\s\S]*?)<\/script>/g;
(async () => {
  let drawn = 0; const failed = [];
  for (const page of pages) {
    const text = fs.readFileSync(page, "utf8"); let m;
    while ((m = re.exec(text))) {
      try {
        const result = await box.vegaEmbed(el("div"), JSON.parse(m[1]), { mode: "vega-lite",
          actions: false, renderer: "none", defaultStyle: false, tooltip: false });
        const svg = await result.view.toSVG();
        if (!svg.includes("<svg") || svg.length < 500) throw new Error("empty drawing");
        result.finalize(); drawn++;
      } catch (e) { failed.push(path.relative(site, page) + ": " + e.message); }
    }
  }
  console.log(JSON.stringify({ drawn, failed }));
})();
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the vega bundle")
def test_every_inline_chart_draws_with_the_bundled_vega(site: Path, tmp_path: Path) -> None:
    script = tmp_path / "draw.js"
    script.write_text(DRAW_ALL)
    done = subprocess.run(
        ["node", str(script), str(site)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["failed"], result["failed"][:5]
    assert result["drawn"] >= len(LAYER_CHARTS) + 8  # layer charts and a histogram per page


def test_a_relative_run_path_builds_where_it_says(run, tmp_path, monkeypatch) -> None:
    """mkdocs resolves its site directory against mkdocs.yml: relative paths must not nest."""
    shutil.copytree(run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "report", ignore_errors=True)
    monkeypatch.chdir(tmp_path)
    index = build_report(Path("run"), features=2, progress=False)
    assert index == (tmp_path / "run" / "report" / "site" / "index.html").resolve()
    assert index.is_file() and not (tmp_path / "run" / "report" / "run").exists()


def test_feature_pages_show_context_ablation_of_the_top_contexts(run: Path, site: Path) -> None:
    table = pl.read_parquet(run / "evidence" / "ablation.parquet")
    assert set(table["mode"]) == {"remove", "replace"} and table["clean"].min() > 0
    assert (table["clean"] - table["stored"]).abs().max() < 1e-4
    charts = 0
    for page in sorted((site / "features").glob("out-*.html")):
        j = int(page.stem.removeprefix("out-"))
        text = page.read_text(encoding="utf-8")
        assert "Which preceding tokens it needs" in text
        names = {f["id"] for f in _parse(page).figures}
        if f"chart-mlp-out-1-{j}-ablation" in names:
            charts += 1
            assert "Most important preceding token" in text or "No single preceding" in text
            # its top contexts underline each preceding token by the share lost without it
            assert "ablating it loses" in text and "blue underline" in text
        else:
            assert "was not among the ablated features" in text
    assert charts >= 1
    # the ablated contexts are the report's top contexts (the same choice, in rank order)
    evidence = Evidence(run / "codes", lambda ids: "")
    ablated = table.filter(pl.col("site") == "mlp_out.1")
    j = int(ablated["feature"][0])
    ranks = ablated.filter(pl.col("feature") == j).unique("rank").sort("rank")
    top = evidence.top_contexts("mlp_out.1", j, k=ranks.height)
    assert [(c.context, c.position) for c in top] == list(
        zip(ranks["context"], ranks["position"], strict=True)
    )


def test_outliers_are_flagged_in_every_table(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report"))
    labels = pl.read_parquet(copy / "logic" / "features.parquet")
    lab = (
        labels.filter((pl.col("label") != "DEAD") & (pl.col("inputs").list.len() > 0))
        .sort(["confidence", "n_active"], descending=True)
        .row(0, named=True)
    )
    j, i = int(lab["output"]), int(lab["inputs"][0])
    path = copy / "outliers" / "outliers.parquet"
    flags = pl.read_parquet(path)
    hit = ((pl.col("site") == "mlp_out.1") & (pl.col("feature") == j)) | (
        (pl.col("site") == "mlp_resid.1") & (pl.col("feature") == i)
    )
    flags = flags.with_columns(
        pl.when(hit).then(True).otherwise(False).alias("outlier"),
        pl.when(hit).then(pl.lit("first tokens 80%")).otherwise(pl.lit("")).alias("reason"),
    )
    flags.write_parquet(path)
    stamp(OutlierFiles(copy / "outliers"))  # the flags stand for the stage's own
    index = build_report(copy, tmp_path / "out", features=[j], progress=False)
    built = index.parent
    mark = 'class="coact-outlier" title="possible artefact (outlier feature): 80% of its active'

    def row_of(page: Path, name: str) -> list[str]:
        text = page.read_text(encoding="utf-8")
        return [r for r in re.findall(r"<tr>.*?</tr>", text, re.S) if re.search(name, r)]

    layer = built / "layer-1.html"
    feature = built / "features" / f"out-{j}.html"
    out_name = rf">out {j}</a>|>out {j} <"
    rows = row_of(layer, out_name)  # features tables (the layer's logic table too)
    assert rows and all(mark in r for r in rows)
    assert "artefact?" in layer.read_text(encoding="utf-8")
    browser = _browser_data(built)  # the feature browser's row carries the reason
    flagged = {r[0]: r[browser["columns"].index("artefact")] for r in browser["rows"]}
    assert flagged[j] == "first tokens 80%" and sum(map(bool, flagged.values())) == 1
    assert len(row_of(layer, out_name)) >= 3  # logic table, outlier list, features table
    text = feature.read_text(encoding="utf-8")
    assert "Possible artefact (outlier feature)" in text
    inputs = row_of(feature, rf">in {i} <span")
    assert inputs and mark in inputs[0]  # the inputs table
    assert f"in {i} ⚠" in text  # the truth table's header
    assert "possible artefacts among its inputs" in text
    # a run without outliers/ or evidence/ is flagged in memory and says it has no ablation
    shutil.rmtree(copy / "outliers")
    shutil.rmtree(copy / "evidence")
    index = build_report(copy, tmp_path / "bare", features=[j], progress=False)
    columns = _browser_data(index.parent)["columns"]
    assert "artefact" in columns and "coact-browser" in (index.parent / "features.html").read_text()
    page = (index.parent / "features" / f"out-{j}.html").read_text(encoding="utf-8")
    assert "No context ablation" in page
    assert not (copy / "outliers").exists()


def test_cli_ablate_and_outliers_on_a_finished_run(run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from coact.cli import app

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report", "evidence", "outliers"))
    runner = CliRunner()
    done = runner.invoke(app, ["outliers", str(copy), "--min-active", "5"])
    assert done.exit_code == 0, done.output
    assert "outliers mlp_out.1:" in done.output and "alive features flagged" in done.output
    flags = pl.read_parquet(copy / "outliers" / "outliers.parquet")
    assert set(flags["site"]) == {"mlp_out.1", "mlp_resid.1"}
    assert not flags["share_high_norm"].is_nan().all()  # the run's SAEs give the norms
    args = ["ablate", str(copy), "--feature", "3", "--contexts", "2", "--inputs", "1"]
    done = runner.invoke(app, [*args, "--window", "2", "--mode", "replace"])
    assert done.exit_code == 0, done.output
    assert "context ablation:" in done.output
    table = pl.read_parquet(copy / "evidence" / "ablation.parquet")
    out = table.filter(pl.col("site") == "mlp_out.1")
    assert set(out["feature"]) == {3} and out["rank"].max() <= 2
    assert set(table["mode"]) == {"replace"} and table["ablated_offset"].max() <= 2
    assert (table["clean"] - table["stored"]).abs().max() < 1e-4  # contexts rebuilt right


def _browser_data(site: Path) -> dict:
    """The feature browser's data file, as the page's script reads it."""
    text = (site / "assets" / "coact" / "features.js").read_text(encoding="utf-8")
    assert text.startswith("window.COACT_FEATURES=") and text.rstrip().endswith(";")
    return dict(json.loads(text.strip().removeprefix("window.COACT_FEATURES=").rstrip(";")))


def test_feature_browser_data_matches_the_tables(run: Path, site: Path) -> None:
    data = _browser_data(site)
    features = pl.read_parquet(run / "connect" / "features.parquet")
    weights = pl.read_parquet(run / "connect" / "weights.parquet")
    c = {name: i for i, name in enumerate(data["columns"])}
    rows = {r[c["feature"]]: r for r in data["rows"]}
    assert sorted(rows) == sorted(features["feature"].to_list())
    pages = {int(p.stem.removeprefix("out-")) for p in (site / "features").glob("out-*.html")}
    assert {j for j, r in rows.items() if r[c["page"]]} == pages
    evidence = Evidence(run / "codes", lambda ids: "".join(chr(65 + i % 26) for i in ids))
    checked = 0
    for r in features.filter(pl.col("active_count") > 0).head(5).iter_rows(named=True):
        j = r["feature"]
        assert rows[j][c["active"]] == r["active_count"]
        assert rows[j][c["d_seed"]] == pytest.approx(r["d_seed"], rel=1e-3, nan_ok=True)
        # its inputs: the strongest terms by |refitted weight|, as the formula has them
        mine = weights.filter(pl.col("output") == j).sort(
            pl.col("weight_refit").abs(), descending=True
        )
        assert [t[0] for t in data["inputs"].get(str(j), [])] == mine["input"].head(6).to_list()
        # its first context peaks at its largest activation, on the marked token (100%)
        first = data["contexts"][str(j)][0]
        peak = float(evidence.activations("mlp_out.1", j).max())
        assert first[0] == pytest.approx(peak, rel=1e-2) and first[3][first[1]] == 100
        assert all(0 <= t < len(data["vocab"]) for t in first[2])
        checked += 1
    assert checked == 5


def test_input_contributions_against_the_codes(run: Path) -> None:
    from coact.report.contributions import input_contributions
    from coact.rundir.read import load_run

    data = load_run(run)
    evidence = Evidence(run / "codes", lambda ids: "?")
    x = evidence.codes("mlp_resid.1").toarray()
    y = evidence.codes("mlp_out.1").toarray()
    weights = pl.read_parquet(run / "connect" / "weights.parquet")
    j = int(weights.group_by("output").len().sort("len", descending=True)["output"][0])
    table = input_contributions(data, evidence, j)
    connector = table.filter(pl.col("source") == "connector")
    assert connector.height >= 1
    for i, value, n in connector.select("input", "contribution", "tokens").iter_rows():
        w = weights.filter((pl.col("output") == j) & (pl.col("input") == i))["weight_refit"][0]
        both = (x[:, i] > 0) & (y[:, j] > 0)  # brute force over every stored token
        assert n == both.sum() and value == pytest.approx(w * x[both, i].mean(), rel=1e-6)
    connections = pl.read_parquet(run / "jacobian" / "connections.parquet")
    jac = table.filter(pl.col("source") == "Jacobian")
    for i, value in jac.select("input", "contribution").iter_rows():
        hit = connections.filter((pl.col("output") == j) & (pl.col("input") == i))
        assert value == pytest.approx(hit["attribution_mean"][0])


def test_context_lines_mark_shade_and_underline() -> None:
    from coact.report.evidence import Context, context_lines

    ctx = Context(context=4, position=9, doc=1, activation=2.0, tokens=["a", "\n", "c"],
                  values=[0.0, 1.0, 2.0], marked=2)  # fmt: skip
    text = context_lines([ctx], 2.0, "out 1", [{1: 0.5, 2: 0.25}])
    assert text.count('class="coact-line"') == 1 and 'title="doc 1, context 4, position 9"' in text
    spans = re.findall(r'<span class="(coact-tok[^"]*)"([^>]*)>([^<]*)<', text)
    assert [s[2] for s in spans] == ["a", "↵", "c"]
    assert [s[0] for s in spans] == ["coact-tok", "coact-tok", "coact-tok coact-max"]
    # background: activation / max (none where inactive); underline: the share lost
    # without the token (1 back: 50%, 2 back: 25%); the activating token is not ablated
    assert spans[0][1] == (
        ' style="box-shadow:inset 0 -3px rgba(31,119,180,0.25)" title="ablating it loses 25%"'
    )
    assert spans[1][1] == (
        ' style="background:rgba(255,127,14,0.50);box-shadow:inset 0 -3px '
        'rgba(31,119,180,0.50)" title="activation 1; ablating it loses 50%"'
    )
    assert spans[2][1] == ' style="background:rgba(255,127,14,1.00)" title="activation 2"'


def test_feature_page_graph_links_its_nodes(site: Path) -> None:
    page = sorted((site / "features").glob("out-*.html"))[0]
    j = int(page.stem.removeprefix("out-"))
    figure = next(f for f in _parse(page).figures if f["id"] == f"chart-out-{j}-graph")
    spec = json.loads(figure["spec"])
    values = [v for rows in spec["datasets"].values() for v in rows if "href" in v]
    links = {v["href"] for v in values if v["href"]}
    assert f"../features.html#out-{j}" not in links and any(v["feature"] == j for v in values)
    pages = {p.name for p in (site / "features").glob("out-*.html")}
    for link in links:  # a page that exists, or a feature's line in the browser
        assert link in pages or re.fullmatch(r"\.\./features\.html#out-\d+", link), link
    assert len(re.findall(r'"href":\{"field":"href"', figure["spec"])) == 2  # dots, names


def test_inline_chart_data_is_rounded_and_needs_no_image(tmp_path: Path) -> None:
    import altair as alt

    from coact.report.embed import Figures

    frame = pl.DataFrame({"x": [0.123456789, 26.036279678], "y": [1, 2]}).to_pandas()
    chart = alt.Chart(frame, title="t").mark_point().encode(x=alt.X("x", title="x"), y="y")
    shown = Figures(tmp_path, static=False).figure(chart, "c", "Read: the figure.")
    found = re.search(r'class="coact-spec">(.*?)</script>', shown)
    assert found is not None
    spec = json.loads(found.group(1))
    assert [r["x"] for rows in spec["datasets"].values() for r in rows] == [0.1235, 26.04]
    assert "<img" not in shown and not (tmp_path / "charts").exists()


def test_layer_page_warns_of_what_allow_mismatch_let_through() -> None:
    from types import SimpleNamespace
    from typing import Any

    from coact.report.layer_page import mismatch_warnings

    data: Any = SimpleNamespace(summary=SimpleNamespace(warnings=["proceeded with <FVE> nan"]))
    lines = mismatch_warnings(data)
    assert lines[0] == '!!! warning "Run with --allow-mismatch"'
    assert "    - proceeded with &lt;FVE&gt; nan" in lines
    empty: Any = SimpleNamespace(summary=SimpleNamespace(warnings=[]))
    nothing: Any = SimpleNamespace(summary=None)
    assert mismatch_warnings(empty) == [] and mismatch_warnings(nothing) == []
