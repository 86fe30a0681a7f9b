"""The control run of a layer: the same architecture with every weight re-initialised
(seeded, `coact.models.load.reinitialised`), SAEs trained by the run's recipe on the same
corpus tokens, and the headline stages only (connect, logic, and jacobian when the run has
it; no calibration, outliers, ablation or report), into `<run>/control/`, an ordinary run
directory. The control's causal check of strong connections runs with the run's calibrate
settings (its calibrate stage does not run), into `<run>/control/causal/`.

A finished control (its config.json is the one asked for, its summary.json is written,
and its causal check carries the right key) is read back, not rerun; an unfinished one
resumes like any run (SAEs, codes and finished stages are reused)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl

from coact.calibrate.causal import CausalConfig, CausalSummary, causal_check, causal_summary
from coact.linearity.fits import load_linearity_connectors
from coact.models.load import LoadedModel, reinitialised
from coact.models.sites import SitePair
from coact.pipeline.config import STAGE_NAMES, AnalyzeConfig
from coact.pipeline.control_figures import (
    ControlSummary,
    HeadlineVsControl,
    causal_figures,
    connector_figures,
    jacobian_figures,
    label_figures,
    linearity_figures,
)
from coact.pipeline.shared import Shared, layer_sites, prepare
from coact.pipeline.stages import STAGES, LayerRun
from coact.pipeline.summary import RunSummary
from coact.rundir.files import atomic_write, read_json
from coact.rundir.layout import RunLayout
from coact.rundir.results import Result, Timings, result_key

CONTROL_STAGES = ("connect", "logic", "jacobian")  # the headline stages a control reruns
CAUSAL_VERSION = 1
RunLayer = Callable[[AnalyzeConfig, LoadedModel, Shared, float], RunSummary]


@dataclass(frozen=True, kw_only=True)
class ControlCausal(Result):
    """The control's causal check: its key (the control's connectors and the settings),
    where its table is, and its headline."""

    key: str
    directory: str
    summary: CausalSummary


def control_config(config: AnalyzeConfig, layout: RunLayout) -> AnalyzeConfig:
    """The run's config for its control: into `<run>/control/`, the headline stages the run
    has (and what they read), SAEs trained by the same recipe (none given: no published SAE
    fits a re-initialised model), and no control of its own."""
    wanted = {name for name in config.stages if name in CONTROL_STAGES} | {"connect"}
    needs = {stage.name: stage.needs for stage in STAGES}
    kept = tuple(
        name for name in STAGE_NAMES if name in wanted and set(needs[name]) <= wanted
    )  # in data-flow order
    return dataclasses.replace(
        config, control=False, stages=kept, run_dir=str(layout.control), shared_dir=None,
        sae_in=None, sae_out=None,
    )  # fmt: skip


def causal_settings(config: AnalyzeConfig) -> CausalConfig | None:
    """The run's causal check settings (as its calibrate stage builds them), or None when
    the run checks no connections."""
    if not (config.runs("calibrate") and config.calibrate.causal):
        return None
    c = config.calibrate
    return CausalConfig(
        connections=c.causal_connections, batch_size=c.batch_size,
        skip_first_positions=c.skip_first_positions, progress=c.progress,
    )  # fmt: skip


def _layout(config: AnalyzeConfig) -> RunLayout:
    """The control's own directory holds its SAEs and codes too (a single-layer run's way)."""
    return RunLayout(Path(str(config.run_dir)), Path(str(config.run_dir)))


def _causal_key(connect_key: str | None, settings: CausalConfig, contexts: int) -> str:
    return result_key({"connect": connect_key, "contexts": contexts}, settings, CAUSAL_VERSION)


def finished_control(
    config: AnalyzeConfig, settings: CausalConfig | None
) -> tuple[RunSummary, ControlCausal | None] | None:
    """The control's summary (and causal check) when a control of exactly this config
    finished before; None otherwise."""
    layout = _layout(config)
    own = read_json(layout.config)
    if own is None or own != json.loads(json.dumps(asdict(config), default=str)):
        return None
    summary = RunSummary.read(layout.summary) if layout.summary.is_file() else None
    if summary is None:
        return None
    if settings is None:
        return summary, None
    if any(getattr(summary, name, None) is None for name in config.stages):
        return None  # stopped part-way
    connect_key = summary.connect.key if summary.connect else None
    key = _causal_key(connect_key, settings, config.calibrate.contexts)
    causal = ControlCausal.finished(layout.causal, key)
    return None if causal is None else (summary, causal)


def _check_causal(control: LayerRun, settings: CausalConfig) -> ControlCausal:
    """The causal check of the control's strong connections on its held-out contexts, as
    the run's calibrate stage checks the run's. It runs right after the control's connect
    stage (run or reused here), so the stages after it can read its table."""
    config, lm, shared, layout = control.config, control.lm, control.shared, control.layout
    connected = next(stage for stage in STAGES if stage.name == "connect")(control)
    files, pair = layout.causal, SitePair.mlp(config.layer)
    key = _causal_key(getattr(connected, "key", None), settings, config.calibrate.contexts)
    if (done := ControlCausal.finished(files, key)) is not None:
        return done
    weights = pl.read_parquet(layout.connect.weights)
    connectors = load_linearity_connectors(layout.connect.connectors, str(lm.device))
    table = causal_check(
        lm, config.layer, shared.saes[pair.in_site], shared.saes[pair.out_site],
        control.eval_tokens[: config.calibrate.contexts], weights, connectors, settings,
    )  # fmt: skip
    files.path.mkdir(parents=True, exist_ok=True)
    atomic_write(files.causal, table.write_parquet)
    result = ControlCausal(key=key, directory=str(files.path), summary=causal_summary(table))
    result.write(files.result)
    return result


def run_control(run: LayerRun, run_layer: RunLayer) -> ControlSummary:
    """The control of `run`'s layer (run or read back), and every headline of `run` beside
    the control's. `run_layer` runs a layer's stages (`coact.pipeline.run.run_layer`)."""
    started = time.perf_counter()
    config = control_config(run.config, run.layout)
    settings = causal_settings(run.config)
    done = finished_control(config, settings)
    if done is not None:
        control, causal = done
    else:
        lm = reinitialised(run.lm, config.seed)
        sites = layer_sites(config, config.layer)
        shared = prepare(config, lm, sites, dict.fromkeys(sites), _layout(config))
        layer = LayerRun(config, lm, shared, _layout(config))
        causal, parts = None, Timings(shared.timings)  # the control's summary.json has them
        if settings is not None:
            with parts.part("connect_and_causal"):  # connect's rerun below is then reused
                causal = _check_causal(layer, settings)
        shared.timings = parts
        control = run_layer(config, lm, shared, started)
    timings = dict(control.timings)
    timings["control_s"] = time.perf_counter() - started
    return ControlSummary(
        run_dir=str(config.run_dir),
        model=control.model,
        seed=config.seed,
        stages=list(config.stages),
        reused=done is not None,
        tau=run.result("calibrate").tau if run.result("calibrate") else None,
        form=run.result("calibrate").form if run.result("calibrate") else None,
        connect=control.connect,
        logic=control.logic,
        jacobian=control.jacobian,
        causal=causal.summary if causal else None,
        figures=headline_figures(run, control, causal.summary if causal else None),
        timings=timings,
    )


def headline_figures(
    run: LayerRun, control: RunSummary, causal: CausalSummary | None
) -> dict[str, HeadlineVsControl]:
    """Every headline the run and its control both have, beside each other."""
    figures: dict[str, HeadlineVsControl] = {}
    control_layout = RunLayout.of(control.run_dir)
    real_connect, calibrated = run.result("connect"), run.result("calibrate")
    if real_connect is not None and control.connect is not None:
        figures |= linearity_figures(
            run.layout.connect.features, control_layout.connect.features, calibrated
        )
        figures |= connector_figures(real_connect, control.connect)
    if run.result("logic") is not None and control.logic is not None:
        figures |= label_figures(run.result("logic"), control.logic)
    if calibrated is not None and calibrated.causal is not None and causal is not None:
        figures |= causal_figures(calibrated.causal, causal)
    if run.result("jacobian") is not None and control.jacobian is not None:
        figures |= jacobian_figures(run.result("jacobian"), control.jacobian)
    return figures


__all__ = ["CONTROL_STAGES", "ControlCausal", "control_config", "run_control"]
