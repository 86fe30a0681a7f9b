"""`build_report`: a run directory → markdown pages + charts → an offline mkdocs-material
site (`<out>/site/index.html`)."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from coact.errors import CoactError
from coact.progress import tqdm
from coact.report.attention_page import attention_page
from coact.report.browser import write_browser
from coact.report.embed import Figures
from coact.report.evidence import Decode, Evidence, TokenText, default_decode
from coact.report.feature_page import feature_page
from coact.report.feature_parts import PageParts
from coact.report.layer_graphs import GraphWriter
from coact.report.layer_page import layer_page
from coact.report.names import (
    FEATURES_DIR,
    attention_page_name,
    feature_page_name,
    layer_page_name,
    model_link,
)
from coact.report.run_page import index_page
from coact.report.select import (
    DEFAULT_FEATURES,
    attention_page_count,
    interesting_attention_features,
    interesting_features,
)
from coact.report.site import build_site, mkdocs_config, write_assets, write_config
from coact.rundir.files import staged_dir
from coact.rundir.layout import ReportFiles
from coact.rundir.read import RunData, load_run

Featured = dict[int, list[str]]  # feature → why it has a page
PageWriter = Callable[[PageParts, int, list[str]], str]  # feature_page or attention_page
NameOf = Callable[[int], str]  # a feature's page name


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
    featured, count = _featured(data, features)
    final = ReportFiles(
        (Path(out_dir) if out_dir is not None else data.layout.report.path).resolve()
    )
    refuse_foreign(final)
    say = Say(progress)
    # built aside and swapped in whole: a reader (or a second writer) never meets a half-built one
    with staged_dir(final.path) as staging:
        report = ReportFiles(staging)
        prepare(report)
        attention = interesting_attention_features(data, attention_page_count(count))
        evidence = _evidence(data, decode, bool(featured or attention), say)
        write_assets(report.docs)
        pages = _Pages(data, report, evidence, progress)
        # the attention pages first: the layer page links those that exist
        pages.feature_pages(attention, "attention", attention_page, attention_page_name)
        say("writing the run and layer pages")
        pages.run_and_layer(featured)
        pages.feature_pages(featured, "feature", feature_page, feature_page_name)
        config = mkdocs_config(
            f"coact: {data.model}, layer {data.layer}",
            _nav(data, featured, attention),
            description=f"{data.in_site} → {data.out_site}",
        )
        say("building the site (mkdocs, strict)")
        build_site(write_config(report.path, config))
    index = final.index
    say(f"report built in {time.perf_counter() - started:.1f} s: {index}")
    return index


def _featured(data: RunData, features: Sequence[int] | int | None) -> tuple[Featured, int]:
    """The output features that get a page, each with why, and how many were asked for
    (attention pages are counted from it); asked-for ids must be output features."""
    if features is None or isinstance(features, int):
        count = DEFAULT_FEATURES if features is None else int(features)
        return (interesting_features(data, count) if data.features is not None else {}), count
    count = len(dict.fromkeys(int(j) for j in features))
    if data.features is None:
        return {}, count
    width = data.features.height
    bad = [int(j) for j in features if not 0 <= int(j) < width]
    if bad:
        raise CoactError(f"features {bad} are not output features (0 to {width - 1})")
    return {int(j): ["asked for"] for j in dict.fromkeys(features)}, count


def _evidence(data: RunData, decode: Decode | None, pages: bool, say: Say) -> Evidence | None:
    """The code store's evidence where pages (or the outlier flags of a run without an
    outlier table) need it; None without codes."""
    if not data.has_codes or not (pages or data.outliers is None):
        return None
    say(f"reading feature codes from {data.layout.codes}")
    if decode is None:
        decode = default_decode(data.run_dir, data.top_tokens)
    evidence = Evidence(data.layout.codes, decode)
    if data.outliers is None:
        folder = data.layout.outliers.path.name
        say(f"flagging outlier features (the run has no {folder}/; nothing is written)")
        _outliers_in_memory(data, evidence, decode)
    return evidence


def _outliers_in_memory(data: RunData, evidence: Evidence, decode: Decode) -> None:
    """The outlier table of a run that lacks outliers/ (an older run), for the flags."""
    from coact.evidence.outliers import OutlierConfig, OutliersResult, find_outliers, run_saes

    started = time.perf_counter()
    config = OutlierConfig()
    saes = run_saes(data.run_dir, list(evidence.store.sites))
    table, sites = find_outliers(evidence.store, config, decode, saes)
    data.outliers = table
    data.outlier_summary = OutliersResult(
        key="",  # in memory only: never written, never reused
        directory="",
        tokens=evidence.n_tokens,
        sites=sites,
        config=config,
        seconds=time.perf_counter() - started,
    )
    data._flags = None


class _Pages:
    """Writes a run's markdown pages into the report's docs/: what every page shares (the
    top tokens, the layer graphs, the charts' folders, the link to a model report) is
    set up once here."""

    def __init__(
        self, data: RunData, report: ReportFiles, evidence: Evidence | None, progress: bool
    ) -> None:
        self.data, self.docs, self.evidence = data, report.docs, evidence
        self.site = report.site  # where the pages will be: links to the model report start there
        self.token_text = TokenText(data.top_tokens, data.attention_top_tokens)
        # docs/graphs/: the block's graphs, or the MLP connector's alone in a run without --block
        self.graphs = GraphWriter(self.docs) if data.weights is not None or data.has_block else None
        self.feature_dir = self.docs / FEATURES_DIR
        self.feature_dir.mkdir(parents=True, exist_ok=True)
        self.feature_figures = Figures(self.feature_dir, static=False)  # no fallback images
        self.feature_model = model_link(data, self.site / FEATURES_DIR)
        self.bar: dict[str, Any] = {"unit": "page", "disable": not progress, "file": sys.stderr}

    def _write(self, name: str, text: str) -> None:
        """One page's markdown at `name` under docs/."""
        (self.docs / name).write_text(text, encoding="utf-8")

    def feature_pages(
        self, chosen: Mapping[int, list[str]], what: str, page: PageWriter, name: NameOf
    ) -> None:
        """One page per chosen feature (output or attention), under features/."""
        parts = PageParts(
            self.data, self.evidence, self.feature_figures, self.token_text, self.graphs,
            self.feature_model, frozenset(chosen),
        )  # fmt: skip
        for j, reasons in tqdm(chosen.items(), desc=f"{what} pages", **self.bar):
            self._write(f"{FEATURES_DIR}/{name(j)}.md", page(parts, j, reasons))

    def run_and_layer(self, featured: Featured) -> None:
        """The run's page, the layer page and the table of all features."""
        data = self.data
        figures = Figures(self.docs)  # the run's and the layer's charts: docs/charts/
        model = model_link(data, self.site)
        self._write("index.md", index_page(data, figures, len(featured), model=model))
        text = layer_page(
            data, figures, featured, set(featured),
            token_text=self.token_text, graphs=self.graphs, model=model,
        )  # fmt: skip
        self._write(f"{layer_page_name(data)}.md", text)
        self._write("features.md", write_browser(self.docs, data, set(featured), self.evidence))


def _nav(data: RunData, featured: Featured, attention: Mapping[int, list[str]]) -> list[Any]:
    """The site's navigation: the run, the layer, all features, then the feature pages."""
    nav: list[Any] = [
        {"Run": "index.md"},
        {f"Layer {data.layer}": f"{layer_page_name(data)}.md"},
        {"All features": "features.md"},
    ]
    if featured:
        pages = [
            {_nav_title(data, j): f"{FEATURES_DIR}/{feature_page_name(j)}.md"} for j in featured
        ]
        nav.append({"Feature pages": pages})
    if attention:
        pages = [{f"attn {j}": f"{FEATURES_DIR}/{attention_page_name(j)}.md"} for j in attention]
        nav.append({"Attention feature pages": pages})
    return nav


def refuse_foreign(report: ReportFiles) -> None:
    """A folder that holds files but no report marker is someone else's: never replaced."""
    out = report.path
    if out.exists() and any(out.iterdir()) and not report.marker.is_file():
        raise CoactError(
            f"{out} exists and is not a coact report directory (no {report.marker.name}); "
            "pass an empty or new directory"
        )


def prepare(report: ReportFiles) -> None:
    """The report folder is new, or a report folder of ours: its docs/ are rewritten from
    scratch; anything else is refused, so no one's files are overwritten."""
    refuse_foreign(report)
    report.path.mkdir(parents=True, exist_ok=True)
    report.marker.write_text("written by coact.report.build_report\n")
    shutil.rmtree(report.docs, ignore_errors=True)
    report.docs.mkdir()


def _nav_title(data: RunData, j: int) -> str:
    """A feature page's title in the navigation: 'out j (LABEL)'."""
    if data.labels is not None:
        hit = data.labels.filter(pl.col("output") == j)
        if hit.height:
            return f"out {j} ({hit['label'][0]})"
    return f"out {j}"


class Say:
    """Progress lines on stderr ('coact report: …'), or nothing when progress is off."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __call__(self, text: str) -> None:
        if self.on:
            print(f"coact report: {text}", file=sys.stderr)
