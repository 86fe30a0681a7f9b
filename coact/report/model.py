"""`build_model_report`: a model run (`coact analyze --layers …`) → one page that sets its
layers side by side (the per-layer table, the seed study's table for every layer and site,
charts across layers) and links each layer's own report, built here where it is missing
or its inputs changed (each layer's report and the model page are fingerprinted as a
single run's report is, `coact.report.fingerprint`).

The model site lives at `<model_dir>/report/site/`; each layer's at
`<model_dir>/L<ℓ>/report/site/`, so the model page links them relatively
(`../../L<ℓ>/report/site/index.html`) and the whole run directory can be moved or opened
from the file system as one piece."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from coact.errors import CoactError
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.summary import ModelSummary
from coact.report.build import Say, build_report, prepare, refuse_foreign
from coact.report.embed import Figures
from coact.report.fingerprint import inputs_fingerprint, is_current, model_fingerprint, stamp
from coact.report.model_page import model_name, model_page, span
from coact.report.site import build_site, mkdocs_config, write_assets, write_config
from coact.rundir.files import atomic_write, read_json, staged_dir
from coact.rundir.layout import ReportFiles, RunLayout, read_run_config
from coact.rundir.read import load_run


def is_model_run(run_dir: str | Path) -> bool:
    """A model run's directory: its config.json names several layers, or its summary.json
    their run directories."""
    layout = RunLayout(Path(run_dir), Path(run_dir))
    config = read_json(layout.config) or {}
    summary = read_json(layout.summary) or {}
    return bool(config.get("layers")) or "layer_runs" in summary


def build_model_report(
    model_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    features: Sequence[int] | int | None = None,
    rebuild_layers: bool = False,
    progress: bool = True,
) -> Path:
    """Write the model page and build its site; return the built `index.html`
    (`<model_dir>/report/site/index.html` unless `out_dir` is given).

    Each layer's report (`<model_dir>/L<ℓ>/report/`, with `features`, by default the run's
    `report_features`) and then the model page are built only where missing or built from
    other inputs (`coact.report.fingerprint`); `rebuild_layers` rebuilds them all."""
    started = time.perf_counter()
    layout = RunLayout.of(model_dir)
    say = Say(progress)
    config = AnalyzeConfig.from_dict(read_run_config(layout.run_dir))
    table = _layers(layout)
    summary = ModelSummary.read(layout.summary)
    layer_dirs = {int(ell): _layer_dir(layout, summary, int(ell)) for ell in table["layer"]}
    wanted = features if features is not None else config.report_features
    prints = {
        ell: _layer_report(ell, layer_dir, wanted, rebuild_layers, say)
        for ell, layer_dir in layer_dirs.items()
    }
    final = ReportFiles((Path(out_dir) if out_dir is not None else layout.report.path).resolve())
    refuse_foreign(final)
    links = {  # the staged folder is final's sibling: the same links from there
        ell: Path(os.path.relpath(RunLayout.of(d).report.index.resolve(), final.site)).as_posix()
        for ell, d in layer_dirs.items()
    }
    fingerprint = model_fingerprint(layout.run_dir, prints, links)
    if not rebuild_layers and is_current(final, fingerprint):
        say(f"model report unchanged since its last build: {final.index}")
        return final.index
    model, layers = model_name(config, summary), table["layer"].to_list()
    mkdocs = mkdocs_config(
        f"coact: {model}, layers {span(layers)}",
        [{"Model": "index.md"}],
        description=f"{model}: MLP, attention and residual composition of layers {span(layers)}",
    )
    with staged_dir(final.path) as staging:  # built aside, swapped in whole
        report = ReportFiles(staging)
        prepare(report)
        write_assets(report.docs)
        runs = {ell: load_run(d) for ell, d in layer_dirs.items()}
        say("writing the model page")
        text = model_page(layout.run_dir, config, summary, table, runs, links, Figures(report.docs))
        (report.docs / "index.md").write_text(text, encoding="utf-8")
        say("building the site (mkdocs, strict)")
        build_site(write_config(report.path, mkdocs))
    stamp(final, fingerprint)
    index = final.index
    say(f"model report built in {time.perf_counter() - started:.1f} s: {index}")
    return index


def _layer_report(
    layer: int, layer_dir: Path, features: Sequence[int] | int | None, force: bool, say: Say
) -> str:
    """Build the layer's report where its inputs changed since it was built (or `force`);
    return its fingerprint."""
    report = RunLayout.of(layer_dir).report
    fingerprint = inputs_fingerprint(layer_dir, features)
    if force or not is_current(report, fingerprint):
        say(f"building the report of layer {layer} ({layer_dir})")
        build_report(layer_dir, features=features, progress=say.on)
        stamp(report, fingerprint)
    return fingerprint


def _layers(layout: RunLayout) -> pl.DataFrame:
    """layers.parquet, completed with the layers finished since it was written; one clear
    error when the run has not finished a layer."""
    path = layout.layers_table
    _add_finished_layers(layout.run_dir, path)
    if not path.is_file():
        raise CoactError(
            f"{layout.run_dir} has no {path.name}: the model run has not finished a layer; "
            "rerun `coact analyze --layers …` with the same settings to complete it"
        )
    table = pl.read_parquet(path).sort("layer")
    if not table.height:
        raise CoactError(f"{path} has no layers")
    return table


def _add_finished_layers(model_dir: Path, table_path: Path) -> None:
    """Rewrite layers.parquet from every finished layer of the run where that adds layers
    it lacks (finished by another process, or by an earlier run stopped before its own
    table was written); rows of layers kept elsewhere (a moved run) are never dropped."""
    from coact.pipeline.model_table import finished_layers, layers_table

    finished = finished_layers(model_dir)
    listed = set(pl.read_parquet(table_path)["layer"].to_list()) if table_path.is_file() else set()
    if finished and listed < set(finished):
        atomic_write(table_path, layers_table(finished).write_parquet)


def _layer_dir(layout: RunLayout, summary: ModelSummary | None, layer: int) -> Path:
    """L<ℓ>/ beside layers.parquet (the run may have moved), else what summary.json says."""
    here = layout.layer_dir(layer)
    if RunLayout(here, here).config.is_file():
        return here
    recorded = summary.layer_runs.get(str(layer)) if summary else None
    if recorded and RunLayout(Path(recorded), Path(recorded)).config.is_file():
        return Path(recorded)
    raise CoactError(f"layer {layer} of {layout.run_dir} has no run directory ({here} is missing)")
