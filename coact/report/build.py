"""`build_report`: a run directory → markdown pages + charts → an offline mkdocs-material
site (`<out>/site/index.html`)."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from coact.errors import CoactError
from coact.report import feature_page, pages
from coact.report.embed import Figures
from coact.report.evidence import Decode, Evidence, default_decode
from coact.report.select import (
    DEFAULT_FEATURES,
    attention_page_count,
    interesting_attention_features,
    interesting_features,
)
from coact.report.site import build_site, mkdocs_config, write_assets, write_config
from coact.rundir.read import RunData, load_run

MARKER = ".coact-report"


def build_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    decode: Decode | None = None,
    features: Sequence[int] | int | None = None,
    progress: bool = True,
) -> Path:
    """Write the report of a run and build its site; return the built `index.html`.

    `out_dir` defaults to `<run>/report/` (pages in `docs/`, site in `site/`). `features`
    picks the output features that get a page: a list of ids, a number of the most
    interesting ones, or None for the default ~50 (most confident per logic label, largest
    nonlinear gain, strongest connections, causally checked, clearly linear, most active).
    A block run's attention features get pages too, half as many (at least one): those
    that gain most from earlier positions, the first rows of the layer page's table of
    them.
    `decode` turns token ids into text; by default the run's tokenizer when it is on this
    machine, else the token texts `connect` stored. Stages the run lacks (calibrate/,
    logic/, ...) are skipped with a note."""
    started = time.perf_counter()
    data = load_run(run_dir)
    featured: dict[int, list[str]] = {}
    if features is None or isinstance(features, int):
        count = DEFAULT_FEATURES if features is None else int(features)
    else:
        count = len(dict.fromkeys(int(j) for j in features))
    if data.features is not None:
        if features is None or isinstance(features, int):
            featured = interesting_features(data, count)
        else:
            width = data.features.height
            bad = [int(j) for j in features if not 0 <= int(j) < width]
            if bad:
                raise CoactError(f"features {bad} are not output features (0 to {width - 1})")
            featured = {int(j): ["asked for"] for j in dict.fromkeys(features)}
    out = (Path(out_dir) if out_dir is not None else data.run_dir / "report").resolve()
    _prepare(out)
    docs = out / "docs"
    say = _Say(progress)

    attention = interesting_attention_features(data, attention_page_count(count))
    evidence = None
    if data.has_codes and (featured or attention or data.outliers is None):
        say(f"reading feature codes from {data.layout.codes}")
        if decode is None:
            decode = default_decode(data.run_dir, data.top_tokens)
        evidence = Evidence(data.layout.codes, decode)
        if data.outliers is None:
            say("flagging outlier features (the run has no outliers/; nothing is written)")
            _outliers_in_memory(data, evidence, decode)
    pages_with = set(featured)

    write_assets(docs)
    layer_name = pages.layer_page_name(data)
    token_text = pages.TokenText(data.top_tokens, data.attention_top_tokens)
    graphs = pages.GraphWriter(docs) if data.has_block else None  # tables in docs/graphs/
    site = out / "site"  # where the pages will be: links to the model report start there
    feature_dir = docs / "features"
    feature_dir.mkdir(parents=True, exist_ok=True)
    feature_figures = Figures(feature_dir)
    feature_model = pages.model_link(data, site / "features")
    # the attention pages first: the layer page links those that exist
    bar = {"unit": "page", "disable": not progress, "file": sys.stderr}
    for j, reasons in tqdm(attention.items(), desc="attention pages", **bar):
        text = feature_page.attention_page(
            data, j, reasons, evidence, feature_figures, token_text, graphs, feature_model
        )
        (feature_dir / f"{pages.attention_page_name(j)}.md").write_text(text, encoding="utf-8")

    say("writing the run and layer pages")
    root_figures = Figures(docs)  # the run's and the layer's charts: docs/charts/
    model = pages.model_link(data, site)
    (docs / "index.md").write_text(
        pages.index_page(data, root_figures, len(featured), model=model), encoding="utf-8"
    )
    (docs / f"{layer_name}.md").write_text(
        pages.layer_page(
            data, root_figures, featured, pages_with,
            token_text=token_text, graphs=graphs, model=model,
        ),
        encoding="utf-8",
    )  # fmt: skip
    (docs / "features.md").write_text(pages.all_features_page(data, pages_with), encoding="utf-8")

    for j, reasons in tqdm(featured.items(), desc="feature pages", **bar):
        text = feature_page.feature_page(
            data, j, reasons, evidence, feature_figures, token_text, graphs, feature_model
        )
        (feature_dir / f"{pages.feature_page_name(j)}.md").write_text(text, encoding="utf-8")

    nav: list[Any] = [
        {"Run": "index.md"},
        {f"Layer {data.layer}": f"{layer_name}.md"},
        {"All features": "features.md"},
    ]
    if featured:
        nav.append(
            {
                "Feature pages": [
                    {_nav_title(data, j): f"features/{pages.feature_page_name(j)}.md"}
                    for j in featured
                ]
            }
        )
    if attention:
        nav.append(
            {
                "Attention feature pages": [
                    {f"attn {j}": f"features/{pages.attention_page_name(j)}.md"} for j in attention
                ]
            }
        )
    config = mkdocs_config(
        f"coact: {data.model}, layer {data.layer}",
        nav,
        description=f"{data.in_site} → {data.out_site}",
    )
    say("building the site (mkdocs, strict)")
    index = build_site(write_config(out, config))
    say(f"report built in {time.perf_counter() - started:.1f} s: {index}")
    return index


def _outliers_in_memory(data: RunData, evidence: Evidence, decode: Decode) -> None:
    """The outlier table of a run that lacks outliers/ (an older run), for the flags."""
    from coact.evidence.outliers import OutlierConfig, find_outliers, run_saes

    config = OutlierConfig()
    saes = run_saes(data.run_dir, list(evidence.store.sites))
    table, sites = find_outliers(evidence.store, config, decode, saes)
    data.outliers = table
    data.outlier_summary = {"sites": sites, "config": dataclasses.asdict(config)}
    data._flags = None


def _prepare(out: Path) -> None:
    """out/ is new, or a report directory of ours: its docs/ are rewritten from scratch."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise CoactError(
            f"{out} exists and is not a coact report directory (no {MARKER}); "
            "pass an empty or new directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by coact.report.build_report\n")
    shutil.rmtree(out / "docs", ignore_errors=True)
    (out / "docs").mkdir()


def _nav_title(data: RunData, j: int) -> str:
    if data.labels is not None:
        hit = data.labels.filter(pl.col("output") == j)
        if hit.height:
            return f"out {j} ({hit['label'][0]})"
    return f"out {j}"


class _Say:
    def __init__(self, on: bool) -> None:
        self.on = on

    def __call__(self, text: str) -> None:
        if self.on:
            print(f"coact report: {text}", file=sys.stderr)
