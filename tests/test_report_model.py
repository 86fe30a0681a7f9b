"""The model report: a tiny model run over every layer → each layer's site (with the
attention and residual-composition sections and layer graphs) and a model page that sets
the layers side by side and links them."""

from __future__ import annotations

import html
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
import yaml
from polars.testing import assert_frame_equal

from coact.block.graph import EDGE_SCHEMA
from coact.errors import CoactError
from coact.pipeline.run import analyze
from coact.report.attention_page import attention_page
from coact.report.charts.base import spec_title, untitled_axes
from coact.report.embed import Figures
from coact.report.evidence import TokenText
from coact.report.feature_parts import PageParts
from coact.report.model import build_model_report, is_model_run
from coact.report.model_columns import column_groups, column_header
from coact.report.select import interesting_attention_features
from coact.rundir.read import load_run
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

REPORT_FEATURES = 8  # the fixture's report_features: 8 output feature pages per layer
ATTENTION_PAGES = max(1, REPORT_FEATURES // 2)  # and half as many attention pages
GAIN = {"raw": "gain", "fvu": "gain_fvu", "seed": "gain_seed"}
D = {"raw": "d", "fvu": "d_fvu", "seed": "d_seed"}


def build_model_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model run over all three layers of tiny-llama with its reports (8 feature
    pages per layer; about 90 s on two busy cores). Built once per test session, in the
    session's base temporary directory, for this module and the browser test alike."""
    model_dir = tmp_path_factory.getbasetemp() / "model-run" / "model"
    if (model_dir / "report" / "site" / "index.html").is_file():
        return model_dir
    shutil.rmtree(model_dir.parent, ignore_errors=True)
    analyze(tiny_config(model_dir, layers="all", report_features=REPORT_FEATURES))
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
        headers = ("layer", *(column_header(c) for c in group))
        assert headers in tables, (headers, list(tables))
        rows = tables[headers]
        assert [r[0] for r in rows] == [str(ell) for ell in LAYERS]
        assert all(len(r) == len(headers) and "–" not in r for r in rows), rows
    shown = {h for headers in tables for h in headers}
    assert {column_header(c) for c in layers.columns} <= shown
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
                if page.parent.name == "features":  # feature pages: the inline spec alone
                    assert not figure["img"], (page, name)
                else:
                    assert figure["img"] and (page.parent / figure["img"]).is_file(), page
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
        assert f"Attention's own Jacobian (resid_pre[{ell}]" in text  # same-position map
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
        assert not figure["img"]  # drawn from its inline spec: no static image on feature pages
        # a click on an output feature opens its page, or its line in the feature browser
        hrefs = {v["href"] for rows in spec["datasets"].values() for v in rows if v.get("href")}
        assert f"out-{j}.html" in hrefs
        assert all(h.endswith(".html") or "features.html#out-" in h for h in hrefs), hrefs
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


def _g(value: float) -> str:
    """A number as the report writes it ('–' for NaN)."""
    return "–" if value != value else format(value, ".3g")


def _ranked_attention(run: Path) -> tuple[list[int], str, float]:
    """By hand from the parquet tables: the alive attention features of the position score
    by gain (the form attention is read in), largest first; the form and τ."""
    block = json.loads((run / "block.json").read_text())
    form = str(block["form"])
    column = GAIN[form]
    positions = pl.read_parquet(run / "attention" / "positions" / "positions.parquet")
    ranked = positions.filter((pl.col("status") != "dead") & pl.col(column).is_finite()).sort(
        [column, "feature"], descending=[True, False]
    )
    return [int(j) for j in ranked["feature"]], form, float(block["tau"])


def test_attention_features_get_pages_linked_from_the_layer_page_and_the_nav(
    model_run: Path,
) -> None:
    for ell in LAYERS:
        run = model_run / f"L{ell}"
        site = run / "report" / "site"
        ranked, _, _ = _ranked_attention(run)
        expected = ranked[:ATTENTION_PAGES]
        pages = sorted((site / "features").glob("attn-*.html"))
        assert sorted(int(p.stem.removeprefix("attn-")) for p in pages) == sorted(expected)
        # the layer page's position table lists them first, each linked to its page
        layer = site / f"layer-{ell}.html"
        text = layer.read_text(encoding="utf-8")
        table = next(
            t for t in re.findall(r"<table[^>]*>.*?</table>", text, re.S) if ">carrier<" in t
        )
        rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]
        shown = [int(re.search(r"attn (\d+)", r).group(1)) for r in rows]  # type: ignore[union-attr]
        assert shown == ranked[: len(shown)] and len(shown) == min(10, len(ranked))
        links = re.findall(r'href="(features/attn-(\d+)\.html)"', table)
        assert [int(j) for _, j in links] == expected, links
        assert all(_resolve(layer, href).is_file() for href, _ in links)
        # the nav lists them under their own heading, beside the output features
        config = yaml.safe_load((run / "report" / "mkdocs.yml").read_text(encoding="utf-8"))
        nav = {k: v for entry in config["nav"] for k, v in entry.items()}
        assert len(nav["Feature pages"]) == REPORT_FEATURES
        assert nav["Attention feature pages"] == [
            {f"attn {j}": f"features/attn-{j}.md"} for j in expected
        ]
        index = (site / "index.html").read_text(encoding="utf-8")
        assert "Attention feature pages" in index
        assert all(f'href="features/attn-{j}.html"' in index for j in expected)


def test_attention_pages_show_connector_position_score_causal_check_and_graph(
    model_run: Path,
) -> None:
    for ell in LAYERS:
        run = model_run / f"L{ell}"
        site = run / "report" / "site"
        ranked, form, tau = _ranked_attention(run)
        attention = run / "attention"
        features = pl.read_parquet(attention / "connect" / "features.parquet")
        weights = pl.read_parquet(attention / "connect" / "weights.parquet")
        positions = pl.read_parquet(attention / "positions" / "positions.parquet")
        causal = pl.read_parquet(attention / "causal" / "causal.parquet")
        flags = pl.read_parquet(run / "outliers" / "outliers.parquet")
        for rank, j in enumerate(ranked[:ATTENTION_PAGES], start=1):
            page = site / "features" / f"attn-{j}.html"
            text = page.read_text(encoding="utf-8")
            for section in (
                "Evidence: where it fires",
                "Same-position connector",
                "Linearity at attention's τ",
                "Position score: does it need earlier positions?",
                "Causal check: does it use earlier tokens?",
                "Layer graph",
            ):
                assert f">{section}<" in text, (page, section)
            tables = {tuple(h): rows for h, rows in _tables(page)}
            # the headline: feature, site, active tokens, outlier flag
            f = features.filter(pl.col("feature") == j).row(0, named=True)
            flag = flags.filter((pl.col("site") == f"attn_out.{ell}") & (pl.col("feature") == j))
            flagged = flag.height and flag["outlier"][0]
            head = tables[("feature", "site", "active tokens", "artefact? (outlier flag)")]
            assert head == [
                [
                    f"attn {j}",
                    f"attn_out[{ell}]",
                    f"{f['active_count']:,}",
                    f"⚠ {flag['reason'][0]}" if flagged else "no",
                ]
            ]
            assert f"rank {rank} of the position score" in text
            # top contexts from the code store and the histogram of its activations
            assert "coact-max" in text and f'id="chart-attn-{j}-histogram"' in text
            # the same-position connector: its formula, strongest input, d at attention's τ
            stored = str(f["formula"])
            assert stored.startswith(f"out {j} = ")
            shown = f"attn {j} = " + stored.removeprefix(f"out {j} = ")
            assert html.escape(shown, quote=False) in text
            mine = weights.filter(pl.col("output") == j)
            inputs = next((rows for h, rows in _tables(page) if h and h[0] == "input"), None)
            if mine.height:
                top = int(mine.sort(pl.col("weight_refit").abs(), descending=True)["input"][0])
                assert inputs and inputs[0][0].split()[:2] == ["in", str(top)], inputs
            d, low, high = (float(f[D[form] + s]) for s in ("", "_low", "_high"))
            status = "linear" if d <= tau else "nonlinear"
            assert f"d ({form} form) = {_g(d)}, 95% interval [{_g(low)}, {_g(high)}]" in text
            assert f"τ = {_g(tau)} ({form} form" in text
            assert f"({status} at the point estimate)" in text
            # the position score
            p = positions.filter(pl.col("feature") == j).row(0, named=True)
            column = GAIN[form]
            score = tables[
                (
                    f"gain ({form} form)",
                    "95% interval",
                    "verdict",
                    "carrier",
                    "previous token alone (/ variance)",
                    "decayed context alone (/ variance)",
                    "rank by gain",
                )
            ][0]
            assert score[0] == _g(p[column])
            assert score[1] == f"[{_g(p[column + '_low'])}, {_g(p[column + '_high'])}]"
            assert score[2] == p["verdict"]
            assert score[4:6] == [
                _g(p["gain_previous_alone_fvu"]),
                _g(p["gain_decayed_alone_fvu"]),
            ]
            assert score[6] == f"rank {rank} of {len(ranked)}"
            # the causal check
            c = causal.filter(pl.col("feature") == j).row(0, named=True)
            checks = tables[("intervention", "tokens where it fires", "FVU", "mass kept")]
            resampled = next(r for r in checks if r[0] == "earlier tokens resampled")
            alone = next(r for r in checks if r[0] == "self-only attention")
            assert resampled[2] == _g(c["resample_fvu"]) and alone[2] == _g(c["self_only_fvu"])
            if c["resample_kept"] == c["resample_kept"]:  # not NaN
                kept = f"{100 * c['resample_kept']:.0f}%"
                assert resampled[3] == kept
                assert f"earlier tokens resampled: the code keeps {kept} of its mass" in text
            # the layer graph: what feeds it (attention) and what it feeds (composition)
            figures = {fig["id"]: fig for fig in _parse(page).figures}
            graph = json.loads(figures[f"chart-attn-{j}-graph"]["spec"])
            assert spec_title(graph) == f"Layer graph of attn_out[{ell}]#{j}"
            links = [a["href"] for tag, a in _parse(page).tags if tag == "a" and "graphs/" in
                     a.get("href", "")]  # fmt: skip
            assert len(links) == 3 and all(_resolve(page, h).is_file() for h in links), links
            edges = pl.read_parquet(_resolve(page, next(h for h in links if "edges.parq" in h)))
            site_name = f"attn_out[{ell}]"
            chosen = (pl.col("target_site") == site_name) & (pl.col("target_feature") == j)
            fed = (pl.col("source_site") == site_name) & (pl.col("source_feature") == j)
            assert edges.filter(chosen | fed).height > 0
            assert set(edges.filter(chosen)["path"]) <= {"attention"}
            assert set(edges.filter(fed)["path"]) <= {"composition"}
            # every chart: a title, titled axes, a "Read:" caption (drawn from its spec alone)
            for name, figure in figures.items():
                spec = json.loads(figure["spec"])
                assert spec_title(spec), (page, name)
                assert not untitled_axes(spec), (page, name, untitled_axes(spec))
                caption = figure["caption"].replace("static image", "").strip()
                assert caption.startswith("Read:") and len(caption) > 30, (page, name)
                assert not figure["img"], (page, name)
            # links back to the layer page
            hrefs = {a["href"] for tag, a in _parse(page).tags if tag == "a" and a.get("href")}
            assert f"../layer-{ell}.html" in hrefs


def test_attention_pages_skip_what_the_run_lacks(model_run: Path, tmp_path: Path) -> None:
    data = load_run(model_run / "L1")
    text_of = TokenText(data.attention_top_tokens)
    # no position score: the most active alive attention features instead
    data.positions = data.positions_table = None
    data.attention_causal = data.attention_causal_table = None
    picked = interesting_attention_features(data, 2)
    assert data.attention_features is not None
    alive = data.attention_features.filter(pl.col("status") != "dead")
    most = alive.sort(["active_count", "feature"], descending=[True, False])["feature"]
    assert list(picked) == [int(j) for j in most.head(2)]
    j = next(iter(picked))
    text = attention_page(PageParts(data, None, Figures(tmp_path / "a"), text_of), j, picked[j])
    assert "No position score" in text and "No causal check of attention" in text
    assert "No codes of this site" in text and ">Layer graph<" not in text
    assert "## Same-position connector" in text and "d (seed form) = " in text
    assert "The largest activations of" in text  # connect's stored top tokens instead
    data.attention_features = data.attention_weights = data.attention_top_tokens = None
    parts = PageParts(data, None, Figures(tmp_path / "b"), TokenText())
    text = attention_page(parts, j, ["asked for"])
    assert "No same-position connector" in text and "artefact?" in text
    # a run without attention results (or asked for no pages) gets no attention pages
    assert interesting_attention_features(data, 0) == {}
    data.attention = data.block = None
    assert interesting_attention_features(data, 4) == {}


def test_a_model_run_stopped_part_way_reports_its_finished_layers(
    model_run: Path, tmp_path: Path
) -> None:
    """layers.parquet is written after every layer, so a stopped run's report shows the
    finished layers and names the missing ones."""
    partial = tmp_path / "partial"
    shutil.copytree(model_run, partial, symlinks=True)
    table = pl.read_parquet(partial / "layers.parquet").filter(pl.col("layer") < 2)
    table.write_parquet(partial / "layers.parquet")
    (partial / "summary.json").unlink()  # written only when the whole run ends
    (partial / "L2" / "summary.json").unlink()  # and a layer's only when its stages end
    index = build_model_report(partial, progress=False)
    text = (index.parent / "index.html").read_text(encoding="utf-8")
    assert "2 of 3 layers are finished; layer 2 is not yet" in text
    tokens = json.loads((partial / "config.json").read_text())["tokens"]
    assert f"one code store ({tokens:,} tokens of corpus" in text
    assert "layer 0" in text and "layer 1" in text
    complete = (model_run / "report" / "site" / "index.html").read_text(encoding="utf-8")
    assert "layers are finished" not in complete


def test_the_model_page_takes_layers_finished_by_another_process(
    model_run: Path, tmp_path: Path
) -> None:
    """A layer finished with the run's settings but missing from layers.parquet (another
    process ran it) joins the table; one left by other settings does not."""
    from coact.pipeline.model_table import finished_layers

    copy = tmp_path / "shared"
    shutil.copytree(model_run, copy, symlinks=True)
    full = pl.read_parquet(copy / "layers.parquet").sort("layer")
    full.filter(pl.col("layer") == 0).write_parquet(copy / "layers.parquet")
    assert sorted(finished_layers(copy)) == [0, 1, 2]
    other = json.loads((copy / "L2" / "config.json").read_text())
    (copy / "L2" / "config.json").write_text(json.dumps({**other, "tokens": other["tokens"] + 1}))
    assert sorted(finished_layers(copy)) == [0, 1]
    index = build_model_report(copy, progress=False)
    table = pl.read_parquet(copy / "layers.parquet").sort("layer")
    assert table["layer"].to_list() == [0, 1]
    # as the run itself wrote it
    assert_frame_equal(table.filter(pl.col("layer") == 1), full.filter(pl.col("layer") == 1))
    assert "2 of 3 layers are finished; layer 2 is not yet" in index.read_text(encoding="utf-8")
