"""`analyze`: model → corpus → SAEs → feature codes → the layer's stages (connectors and
linearity, calibration of τ, logic labels, with the block stages attention, position
scores, attention's causal checks and the composition of the next stream, then outliers
and context ablation) → summary → report.

One layer (`layer`) or several (`layers`): the layers of a model run share one set of SAEs
and one code store (`coact.pipeline.shared`), so every SAE is trained once and every
activation is encoded in one forward pass; each layer's stages then write into
`<run>/L<layer>/`. Each step reuses what an earlier run of the same configuration left
behind (trained SAEs, finished code shards, finished stage results), so a killed run
resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import asdict
from functools import partial

import polars as pl

from coact.block.stage import BlockResult, ComposedBlock
from coact.errors import CoactError
from coact.linearity.table import percent_linear, relabel
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.pipeline.checks import before_touching, layer_warnings
from coact.pipeline.config import BLOCK_STAGES, AnalyzeConfig, run_model
from coact.pipeline.control import run_control
from coact.pipeline.executor import Execution, one_cluster, run_on_ray
from coact.pipeline.model_table import finished_layers, layers_table
from coact.pipeline.shared import Shared, groups_on_ray, layer_sites, prepare
from coact.pipeline.stages import LayerRun, stages_of
from coact.pipeline.summary import CodesSummary, ModelSummary, RunSummary, SiteSummary
from coact.rundir.claims import SHARED, SUMMARY, Claim, claimed
from coact.rundir.files import atomic_write, write_json
from coact.rundir.layout import RunLayout
from coact.rundir.results import Timings
from coact.rundir.verify import guarded_call


def analyze(config: AnalyzeConfig, execution: Execution | None = None) -> RunSummary | ModelSummary:
    """Run the pipeline and return (and write to summary.json) its headline figures; with
    `layers`, run every one of them (see `analyze_layers`). `execution` says how (serially,
    or a model run's SAE groups and layers on Ray workers) and whether to wait for another
    writer's claims."""
    execution = execution or Execution()
    if config.layers:
        return analyze_layers(config, execution)
    if execution.on_ray:
        raise CoactError("--workers and --executor ray run a model run's layers: give --layers")
    started = time.perf_counter()
    config = config.resolved()
    stages_of(config)  # a stage asked for without what it reads stops here, before loading
    lm = run_model(config)
    run_dir = config.resolved_run_dir()
    sites = layer_sites(config, config.layer)
    given = {sites[0]: config.sae_in, sites[1]: config.sae_out}
    before_touching(config, lm, run_dir, given)  # nothing is written before this passes
    layout = RunLayout(run_dir, run_dir)
    with claimed(layout.claims, SHARED, f"the SAEs and codes of {run_dir}", wait=execution.wait):
        shared = prepare(config, lm, sites, given, layout)
    return run_layer(config, lm, shared, started, wait=execution.wait)


@one_cluster()  # the SAE groups and the layers run on one Ray cluster
def analyze_layers(config: AnalyzeConfig, execution: Execution | None = None) -> ModelSummary:
    """Every layer of `config.layers` with the block stages, from one set of SAEs and one
    code store in the model run's directory; each layer's results land in `<run>/L<ℓ>/`
    (an ordinary run directory), the per-layer headline in `<run>/layers.parquet`. Layers
    run here one after another, or on Ray workers (`execution`); each is claimed first, so
    several processes or workers on one run directory share its layers out."""
    execution = execution or Execution()
    started = time.perf_counter()
    if config.sae_in or config.sae_out:
        raise CoactError("--sae-in / --sae-out name one layer's SAEs; give them with --layer")
    if config.control:
        raise CoactError("--control runs with --layer (one layer); a model run has no control yet")
    config = config.with_stages(add=BLOCK_STAGES).resolved()
    stages_of(config)
    lm = run_model(config)
    layers = _model_layers(config, lm)
    before_touching(config, lm, config.resolved_run_dir(), {})
    config = dataclasses.replace(config, layers=tuple(layers))
    model = RunLayout(config.resolved_run_dir(), config.resolved_run_dir())
    sites = list(dict.fromkeys(s for layer in layers for s in layer_sites(config, layer)))
    what = f"the SAEs and codes of {model.run_dir}"
    with claimed(model.claims, SHARED, what, wait=execution.wait):
        train = groups_on_ray(execution) if execution.on_ray else None
        shared = prepare(config, lm, sites, dict.fromkeys(sites), model, train)
    # a layer finished with these settings (report included when one is asked for) is
    # read back, not rerun: resuming a long run costs nothing for its finished layers
    done = _finished(config, model)
    todo = [layer for layer in layers if layer not in done]
    per_layer: dict[int, RunSummary] = {layer: done[layer] for layer in layers if layer in done}
    if execution.on_ray and todo:
        setup = partial(
            _worker_state, config, shared.trained_now, shared.evaluated_now, execution.wait
        )
        landed = partial(_landed, model, per_layer)
        run_on_ray(todo, setup, _layer_on_worker, execution, device=config.device, done=landed)
    else:
        _layers_here(config, lm, shared, model, todo, execution.wait, per_layer)
    summary = ModelSummary(
        model=lm.name,
        layers=layers,
        run_dir=str(model.run_dir),
        tokens=shared.store.n_tokens,
        saes_trained_now=shared.trained_now,
        layers_finished_before=sorted(done),  # finished_layers lists only `layers`
        layer_runs={str(layer): str(model.layer_dir(layer)) for layer in layers},
        timings={**shared.timings, "total_s": time.perf_counter() - started},
    )
    what = f"the summary and report of {model.run_dir}"
    with claimed(model.claims, SUMMARY, what, wait=execution.wait):
        summary.write(model.summary)
        if config.runs("report"):
            from coact.report.model import build_model_report

            summary = dataclasses.replace(summary, report=str(build_model_report(model.run_dir)))
            summary.write(model.summary)
    return summary


def _finished(config: AnalyzeConfig, model: RunLayout) -> dict[int, RunSummary]:
    """The layers finished with the run's settings (their report too when one is asked for)."""
    return {
        layer: summary
        for layer, summary in finished_layers(model.run_dir).items()
        if not config.runs("report") or summary.report is not None
    }


def _layers_here(
    config: AnalyzeConfig,
    lm: LoadedModel,
    shared: Shared,
    model: RunLayout,
    layers: list[int],
    wait: bool,
    per_layer: dict[int, RunSummary],
) -> None:
    """The layers in this process, into `per_layer`: those another writer holds are left
    for last, then waited for (and read back when it finished them)."""
    held: list[int] = []
    for layer in layers:
        claim = Claim(model.claims, _layer_claim(layer), f"layer {layer} of {model.run_dir}")
        if not claim.try_acquire():
            held.append(layer)
            continue
        try:
            summary = _model_layer(config, lm, shared, model, layer, wait)
        finally:
            claim.release()
        _landed(model, per_layer, layer, summary)
    for layer in held:
        summary = _claimed_layer(config, lm, shared, model, layer, wait)
        _landed(model, per_layer, layer, summary)


def _layer_claim(layer: int) -> str:
    return RunLayout.layer_name.format(layer=layer)


def _claimed_layer(
    config: AnalyzeConfig, lm: LoadedModel, shared: Shared, model: RunLayout, layer: int,
    wait: bool,
) -> RunSummary:  # fmt: skip
    """Layer `layer` under its claim; read back when another writer finished it first."""
    what = f"layer {layer} of {model.run_dir}"
    with claimed(model.claims, _layer_claim(layer), what, wait=wait):
        finished = _finished(config, model).get(layer)
        return finished or _model_layer(config, lm, shared, model, layer, wait)


def _model_layer(
    config: AnalyzeConfig, lm: LoadedModel, shared: Shared, model: RunLayout, layer: int,
    wait: bool,
) -> RunSummary:  # fmt: skip
    layer_config = dataclasses.replace(
        config, layer=layer, layers=None, run_dir=str(model.layer_dir(layer)), shared_dir=".."
    )
    return run_layer(layer_config, lm, shared, time.perf_counter(), wait=wait)


def _landed(
    model: RunLayout, per_layer: dict[int, RunSummary], layer: int, summary: RunSummary
) -> None:
    """After every layer, so a run stopped part-way has the table of the finished ones
    (those other writers finished included)."""
    per_layer[layer] = summary
    with claimed(model.claims, "layers", f"{model.layers_table}"):
        finished = {**finished_layers(model.run_dir), **per_layer}
        atomic_write(model.layers_table, layers_table(finished).write_parquet)


WorkerState = tuple[AnalyzeConfig, LoadedModel, Shared, RunLayout, bool]


def _worker_state(
    config: AnalyzeConfig, trained_now: list[str], evaluated_now: list[str], wait: bool
) -> WorkerState:
    """A Ray worker's model and the run's shared SAEs and codes (the driver made them:
    here they are read back), loaded once for every layer the worker runs."""
    lm = run_model(config)
    model = RunLayout(config.resolved_run_dir(), config.resolved_run_dir())
    layers = config.layers if isinstance(config.layers, tuple) else ()
    sites = list(dict.fromkeys(s for layer in layers for s in layer_sites(config, layer)))
    with claimed(model.claims, SHARED, f"the SAEs and codes of {model.run_dir}", wait=wait):
        shared = prepare(config, lm, sites, dict.fromkeys(sites), model)
    # what the driver trained and evaluated now, as a serial run's layers record it
    shared = dataclasses.replace(shared, trained_now=trained_now, evaluated_now=evaluated_now)
    return config, lm, shared, model, wait


def _layer_on_worker(state: WorkerState, layer: int) -> RunSummary:
    config, lm, shared, model, wait = state
    return _claimed_layer(config, lm, shared, model, layer, wait)


def _model_layers(config: AnalyzeConfig, lm: LoadedModel) -> list[int]:
    every = range(lm.adapter.n_layers)
    wanted = every if config.layers == "all" else config.layers or ()
    layers = sorted({int(layer) for layer in wanted})
    if not layers:
        raise CoactError("no layers to analyse")
    for layer in layers:
        if not 0 <= layer < lm.adapter.n_layers:
            raise CoactError(
                f"layer {layer} is out of range: the model has {lm.adapter.n_layers} layers "
                f"(0..{lm.adapter.n_layers - 1})"
            )
    return layers


def run_layer(
    config: AnalyzeConfig, lm: LoadedModel, shared: Shared, started: float, *, wait: bool = True
) -> RunSummary:
    """The stages of one layer on the shared codes, in data-flow order, then its
    summary.json and its report. Each stage is claimed while it runs, and the end (block,
    control, summary, report) too: a second writer of the run waits for each (or, without
    `wait`, stops), then reuses what the first finished."""
    layout = RunLayout.of(config.resolved_run_dir(), asdict(config))
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    if config.shared_dir is not None:  # a model run's layer: its own config names the share
        write_json(layout.config, asdict(config))
    run = LayerRun(config, lm, shared, layout)
    layer_warnings(config, lm, shared)  # stops on a bad pairing or fit, unless allowed
    timings = Timings(shared.timings if config.shared_dir is None else {})
    for stage in stages_of(config):
        print(f"coact: layer {config.layer}, {stage.name} → {stage.files(layout).path}",
              file=sys.stderr)  # fmt: skip
        what = f"stage {stage.name} of {layout.run_dir}"
        with claimed(layout.claims, stage.name, what, wait=wait), timings.part(stage.name):
            run.results[stage.name] = guarded_call(stage.files(layout), stage, run)
    with claimed(layout.claims, SUMMARY, f"the summary and report of {layout.run_dir}", wait=wait):
        return _finish(run, timings, started)


def _finish(run: LayerRun, timings: Timings, started: float) -> RunSummary:
    """block.json, the control, summary.json and the report of a layer whose stages ran."""
    config, layout = run.config, run.layout
    block = _block(run)
    if block is not None:
        block.write(layout.block)
    control = None
    if config.control:  # the same headline stages on the re-initialised model
        with timings.part("control"):
            control = run_control(run, run_layer)
    timings["total_s"] = time.perf_counter() - started
    summary = dataclasses.replace(_summary(run, block, timings), control=control)
    summary.write(layout.summary)
    if config.runs("report"):  # last: the report reads summary.json and every stage's tables
        from coact.report.fingerprint import build_report_if_changed

        with timings.part("report"):
            index = build_report_if_changed(
                layout.run_dir, decode=run.decode, features=config.report_features
            )
        summary = dataclasses.replace(summary, report=str(index), timings=timings)
        summary.write(layout.summary)
    return summary


def _block(run: LayerRun) -> BlockResult | None:
    """The block stages' headline (block.json), or None when none of them ran."""
    if not any(run.config.runs(stage) for stage in BLOCK_STAGES):
        return None
    at = run.attention_linearity()
    attention = run.result("attention")
    composed: ComposedBlock | None = run.result("composition")
    share = None
    if attention is not None:
        features = pl.read_parquet(run.layout.attention_connect.features)
        share = percent_linear(relabel(features, at))
    return BlockResult(
        layer=run.layer,
        tau=at.tau,
        form=at.form,
        mlp_tau=run.mlp_linearity().tau,
        attention=attention,
        attention_share=share,
        attention_calibration=run.result("attention_calibrate"),
        positions=run.result("positions"),
        attention_causal=run.result("attention_causal"),
        attention_jacobian=run.result("attention_jacobian"),
        composition=composed.composition if composed else None,
        decoded_fvu=composed.decoded_fvu if composed else None,
    )


def _summary(run: LayerRun, block: BlockResult | None, timings: dict[str, float]) -> RunSummary:
    config, shared, store = run.config, run.shared, run.shared.store
    sites = layer_sites(config, config.layer)
    return RunSummary(
        warnings=layer_warnings(config, run.lm, shared, say=False),
        model=run.lm.name,
        layer=config.layer,
        corpus=config.corpus,
        run_dir=str(run.layout.run_dir),
        tokens=store.n_tokens,
        saes_trained_now=[s for s in shared.trained_now if Site.parse(s) in sites],
        saes_evaluated_now=[s for s in shared.evaluated_now if Site.parse(s) in sites],
        sites={
            str(site): SiteSummary.of(
                shared.given.get(site) or str(shared.layout.sae_dir(site.slug)),
                shared.saes[site].width,
                shared.reports[site],
            )
            for site in sites
        },
        codes=CodesSummary(
            directory=str(store.directory),
            bytes_per_token={site.slug: store.bytes_per_token(site.slug) for site in sites},
        ),
        connect=run.result("connect"),
        calibrate=run.result("calibrate"),
        jacobian=run.result("jacobian"),
        logic=run.result("logic"),
        block=block,
        outliers=run.result("outliers"),
        ablation=run.result("ablate"),
        transcoder=run.result("transcoder"),
        timings=timings,
    )
