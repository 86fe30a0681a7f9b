"""The model report: a tiny model run over every layer → each layer's site (with the
attention and residual-composition sections and layer graphs) and a model page that sets
the layers side by side and links them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urljoin, urlparse
from urllib.request import url2pathname

import polars as pl
import pytest

from coact.errors import CoactError
from coact.graph import EDGE_SCHEMA
from coact.pipeline import analyze
from coact.report.figures import spec_title, untitled_axes
from coact.report.model import _header, build_model_report, column_groups, is_model_run
from tests.test_report import DRAW_ALL, _parse
from tests.tiny_run import tiny_config

LAYERS = (0, 1, 2)
MODEL_CHARTS = {"layer-shares", "layer-composition", "layer-decoded"}
BLOCK_CHARTS = {
    "attention-families",
    "attention-d-distribution",
    "position-gains",
    "attention-threshold",
    "position-causal",
    "composition-shares",
    "composition-lasso-path",
}


def build_model_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model run over all three layers of tiny-llama with its reports (8 feature
    pages per layer; about 90 s on two busy cores). Built once per test session, in the
    session's base temporary directory, for this module and the browser test alike."""
    model_dir = tmp_path_factory.getbasetemp() / "model-run" / "model"
    if (model_dir / "report" / "site" / "index.html").is_file():
        return model_dir
    shutil.rmtree(model_dir.parent, ignore_errors=True)
    analyze(tiny_config(model_dir, layers="all", report_features=8))
    return model_dir


@pytest.fixture(scope="module")
def model_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_run(tmp_path_factory)


@pytest.fixture(scope="module")
def model_site(model_run: Path) -> Path:
    index = model_run / "report" / "site" / "index.html"
    assert index.is_file()
    assert json.loads((model_run / "summary.json").read_text())["report"] == str(index)
    return index.parent


def _tables(page: Path) -> list[tuple[list[str], list[list[str]]]]:
    """Every raw-HTML table of a page: its headers and its rows' cell texts."""
    text = page.read_text(encoding="utf-8")
    found = []
    for table in re.findall(r"<table[^>]*>.*?</table>", text, re.S):
        headers = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<th>(.*?)</th>", table, re.S)]
        rows = [
            [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)
        ]
        found.append((headers, [r for r in rows if r]))
    return found


def _resolve(page: Path, href: str) -> Path:
    """An href as the browser resolves it from file://, back to a path."""
    url = urlparse(urljoin(page.as_uri(), href))
    assert url.scheme == "file", href
    return Path(url2pathname(url.path))


def test_model_page_sets_every_layer_and_column_side_by_side(
    model_run: Path, model_site: Path
) -> None:
    assert is_model_run(model_run) and not is_model_run(model_run / "L1")
    layers = pl.read_parquet(model_run / "layers.parquet")
    assert layers["layer"].to_list() == list(LAYERS)
    index = model_site / "index.html"
    text = index.read_text(encoding="utf-8")
    assert "tiny-llama" in text and ">Layers side by side<" in text
    tables = {tuple(h): rows for h, rows in _tables(index)}
    for group in column_groups(layers.columns).values():
        headers = ("layer", *(_header(c) for c in group))
        assert headers in tables, (headers, list(tables))
        rows = tables[headers]
        assert [r[0] for r in rows] == [str(ell) for ell in LAYERS]
        assert all(len(r) == len(headers) and "–" not in r for r in rows), rows
    shown = {h for headers in tables for h in headers}
    assert {_header(c) for c in layers.columns} <= shown
    assert any(c.startswith("composition_share_") for c in layers.columns)
    assert any(c.startswith("decoded_fvu_") for c in layers.columns)
    assert "The seed study" in text and "same position" in text


def test_model_page_links_every_layer_site_relatively(model_run: Path, model_site: Path) -> None:
    index = model_site / "index.html"
    hrefs = {a["href"] for tag, a in _parse(index).tags if tag == "a" and "/L" in a.get("href", "")}
    for ell in LAYERS:
        href = f"../../L{ell}/report/site/index.html"
        assert href in hrefs, sorted(hrefs)
        target = _resolve(index, href)
        assert (
            target.is_file()
            and target.resolve()
            == (model_run / f"L{ell}" / "report" / "site" / "index.html").resolve()
        )
    # and each layer's pages link back to the model page
    for page in ("index.html", "layer-1.html"):
        path = model_run / "L1" / "report" / "site" / page
        back = [a["href"] for tag, a in _parse(path).tags if tag == "a" and a.get("href", "")
                .endswith("report/site/index.html") and "L1" not in a["href"]]  # fmt: skip
        assert back and _resolve(path, back[0]).resolve() == index.resolve(), (page, back)


def test_every_chart_is_titled_and_captioned(model_run: Path, model_site: Path) -> None:
    sites = [model_site] + [model_run / f"L{ell}" / "report" / "site" for ell in LAYERS]
    seen: dict[Path, set[str]] = {}
    for site in sites:
        names: set[str] = set()
        for page in site.rglob("*.html"):
            for figure in _parse(page).figures:
                spec = json.loads(figure["spec"])
                name = figure["id"].removeprefix("chart-")
                names.add(name)
                assert spec_title(spec), (page, name)
                assert not untitled_axes(spec), (page, name, untitled_axes(spec))
                caption = figure["caption"].replace("static image", "").strip()
                assert caption.startswith("Read:") and len(caption) > 30, (page, name)
                assert figure["img"] and (page.parent / figure["img"]).is_file(), (page, name)
        seen[site] = names
    assert seen[model_site] >= MODEL_CHARTS, seen[model_site]
    for site in sites[1:]:
        assert seen[site] >= BLOCK_CHARTS, sorted(BLOCK_CHARTS - seen[site])
        assert sum(n.startswith("graph-resid_pre-") for n in seen[site]) == 3
        assert any(re.fullmatch(r"out-\d+-graph", n) for n in seen[site])


def test_layer_pages_have_attention_and_composition(model_run: Path) -> None:
    for ell in LAYERS:
        layer = model_run / f"L{ell}" / "report" / "site" / f"layer-{ell}.html"
        text = layer.read_text(encoding="utf-8")
        for section in ("Attention", "Residual composition"):
            assert re.search(rf'<h2 id="[^"]+">{section}', text), (ell, section)
        for check in ("identity_raw", "identity_decoded", "composition_decoded", "target_sae"):
            assert f"<code>{check}</code>" in text, (ell, check)
        headers = [h for h, _ in _tables(layer)]
        positions = [h for h in headers if "carrier" in h]
        assert positions and "top tokens" in positions[0] and "artefact?" in positions[0]
        assert "Chosen α =" in text and "same position (gain ≤ τ)" in text
        assert "Causal check: does attention use earlier tokens?" in text
        assert "calibrated at attn_out" in text  # attention is read at its own τ
        assert "FVU with earlier tokens resampled" in positions[0]
        # the MLP's sections are still there, in front
        assert text.index("Linearity: what the mlp adds") < text.index(">Attention<")


def test_feature_pages_draw_the_layer_graph_and_export_its_edges(model_run: Path) -> None:
    site = model_run / "L1" / "report" / "site"
    pages = sorted((site / "features").glob("out-*.html"))
    assert len(pages) == 8
    for page in pages:
        j = int(page.stem.removeprefix("out-"))
        text = page.read_text(encoding="utf-8")
        assert ">Layer graph<" in text
        figure = next(f for f in _parse(page).figures if f["id"] == f"chart-out-{j}-graph")
        spec = json.loads(figure["spec"])
        assert spec_title(spec) == f"Layer graph of mlp_out[1]#{j}"
        assert figure["img"].endswith(".svg") and (page.parent / figure["img"]).is_file()
        links = [a["href"] for tag, a in _parse(page).tags if tag == "a" and "graphs/" in
                 a.get("href", "")]  # fmt: skip
        assert len(links) == 3 and all(_resolve(page, h).is_file() for h in links), links
        edges = pl.read_parquet(_resolve(page, next(h for h in links if "edges.parquet" in h)))
        assert list(edges.columns) == [*EDGE_SCHEMA, "depth"]
        chosen = (pl.col("target_site") == "mlp_out[1]") & (pl.col("target_feature") == j)
        fed = (pl.col("source_site") == "mlp_out[1]") & (pl.col("source_feature") == j)
        assert edges.filter(chosen | fed).height > 0
        # both directions: what feeds it (the MLP) and what it feeds (the composition)
        assert set(edges.filter(chosen)["path"]) <= {"mlp"}
        assert set(edges.filter(fed)["path"]) <= {"composition"}
    assert any(
        "writes most into resid_pre[2]" in p.read_text(encoding="utf-8") for p in pages
    )  # the feature choice also picks the MLP features that feed the next stream most


def test_cli_report_on_a_model_run(model_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from typer.testing import CliRunner

    from coact.cli import app, main

    done = CliRunner().invoke(app, ["report", str(model_run), "--keep-layer-reports"])
    assert done.exit_code == 0, done.output
    assert "model report:" in done.output and "index.html" in done.output
    # a model run that has not finished: one clear line, exit status 2
    copy = tmp_path / "unfinished"
    copy.mkdir()
    shutil.copy(model_run / "config.json", copy / "config.json")
    with pytest.raises(CoactError, match=r"no layers\.parquet"):
        build_model_report(copy, progress=False)
    monkeypatch.setattr(sys, "argv", ["coact", "report", str(copy)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "layers.parquet" in err, err
    assert not (copy / "report").exists()  # nothing half-written


def test_model_report_into_another_directory_links_back(model_run: Path, tmp_path: Path) -> None:
    index = build_model_report(model_run, tmp_path / "elsewhere", progress=False)
    hrefs = {
        a["href"] for tag, a in _parse(index).tags if tag == "a" and "/L1/" in a.get("href", "")
    }
    assert hrefs and all(_resolve(index, h).is_file() for h in hrefs), hrefs


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the vega bundle")
def test_every_inline_chart_draws_with_the_bundled_vega(
    model_run: Path, model_site: Path, tmp_path: Path
) -> None:
    script = tmp_path / "draw.js"
    script.write_text(DRAW_ALL)
    for site, least in ((model_site, 3), (model_run / "L1" / "report" / "site", 20)):
        done = subprocess.run(
            ["node", str(script), str(site)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert not result["failed"], result["failed"][:5]
        assert result["drawn"] >= least, result
