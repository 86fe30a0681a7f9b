"""The `coact` command line: thin wrappers that build configs and call the stages. Every
option's default and help come from the config dataclass field it sets (`option`), so no
default is written twice."""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Literal

import typer

from coact.block.graph import feature_graph
from coact.calibrate.stage import CalibrateConfig
from coact.connectors.config import MLP_FIT, ConnectConfig
from coact.connectors.exact import LassoPathConfig
from coact.connectors.train import ConnectorTrainConfig
from coact.errors import CoactError
from coact.evidence.ablation import AblationConfig
from coact.evidence.outliers import OutlierConfig
from coact.linearity.table import LinearityConfig
from coact.logic.config import LogicConfig
from coact.logic.stage import SAE_CONNECTOR, LabelsConfig
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.executor import Execution
from coact.report.select import DEFAULT_FEATURES
from coact.rundir.verify import guarded, require, require_codes
from coact.sae.train import SaeTrainConfig
from coact.settings import Range, default_of, help_of, range_of
from coact.usage import fail as _fail
from coact.usage import file_fault, usage_lines
from coact.usage import in_range as _in_range

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="coact: how the SAE features a transformer block reads turn into the features it writes.",
)


def option(cls: Any, name: str, *flags: str, default: Any = ..., **extra: Any) -> Any:
    """A typer option whose default and help are those of field `name` of dataclass `cls`
    (`default` only where the command line means something else, e.g. None: the budget's)."""
    value = default_of(cls, name) if default is ... else default
    bounds = range_of(cls, name)  # checked while parsing: nothing is read or written first
    if bounds is not None:
        extra = {"callback": _in_range(bounds), **extra}
    return typer.Option(value, *flags, help=help_of(cls, name), **extra)


def budget_option(name: str) -> Any:
    """An analyze option the budget sets unless given: its help names both defaults."""
    from coact.pipeline.budgets import with_budget

    full, survey = (
        default_of(AnalyzeConfig, name),
        getattr(with_budget(AnalyzeConfig(), "survey"), name),
    )
    return typer.Option(
        None, help=f"{help_of(AnalyzeConfig, name)} (default {full}; survey {survey})"
    )


def wait_option() -> Any:
    """--wait/--no-wait: wait for another writer's claim on the run, or stop naming it."""
    return option(Execution, "wait", "--wait/--no-wait")


RUN = typer.Argument(..., help="run directory written by `coact analyze`")


@app.command()
def analyze(
    layer: int = option(AnalyzeConfig, "layer"),
    layers: str | None = typer.Option(
        None,
        help="a model run over several blocks: 'all', '0-5' or '1,3,5' (implies --block; "
        "SAEs and codes are shared, each layer lands in <run>/L<layer>/)",
    ),
    block: bool = typer.Option(
        False, help="also attention connectors, position scores and residual composition"
    ),
    model: str = option(AnalyzeConfig, "model"),
    corpus: str = option(AnalyzeConfig, "corpus"),
    budget: str | None = typer.Option(
        None,
        help="'full' (the default for one layer) or 'survey' (the default with --layers: "
        "fewer code and SAE tokens and evaluation contexts, no sae-connector)",
    ),
    tokens: int | None = budget_option("tokens"),
    sae_tokens: int | None = budget_option("sae_tokens"),
    ctx_len: int = option(AnalyzeConfig, "ctx_len"),
    device: str = option(AnalyzeConfig, "device"),
    dtype: str = option(AnalyzeConfig, "dtype"),
    run_dir: str | None = option(AnalyzeConfig, "run_dir"),
    sae_in: str | None = option(AnalyzeConfig, "sae_in"),
    sae_out: str | None = option(AnalyzeConfig, "sae_out"),
    seed: int = option(AnalyzeConfig, "seed"),
    no_report: bool = typer.Option(
        False, "--no-report", help="skip the report site and its context ablation"
    ),
    report_features: int | None = budget_option("report_features"),
    control: bool = option(AnalyzeConfig, "control", "--control/--no-control"),
    transcoder: bool = typer.Option(
        False,
        help="also train a skip transcoder per layer (the SAEs' width, k and tokens) and measure "
        "the metric sheet: SAE route vs transcoder at equal L0 (opt-in: it trains a third "
        "dictionary per layer)",
    ),
    allow_mismatch: bool = option(AnalyzeConfig, "allow_mismatch", "--allow-mismatch"),
    executor: str = option(Execution, "executor"),
    workers: int = option(Execution, "workers"),
    address: str | None = option(Execution, "address"),
    wait: bool = wait_option(),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="print the plan (`coact plan`) and stop before anything loads"
    ),
) -> None:
    """Model → corpus → SAEs at the MLP's input and output → feature codes → connectors →
    calibration → logic labels → report; prints the headline and the report's path."""
    from coact.pipeline.budgets import with_budget
    from coact.pipeline.config import BLOCK_STAGES, parse_layers
    from coact.report.text import format_model_summary, format_summary

    config = AnalyzeConfig(
        model=model, layer=layer, layers=parse_layers(layers) if layers is not None else None,
        corpus=corpus, ctx_len=ctx_len, seed=seed, device=device, dtype=dtype, control=control,
        run_dir=run_dir, sae_in=sae_in, sae_out=sae_out, allow_mismatch=allow_mismatch,
    )  # fmt: skip
    config = config.with_stages(
        add=(*(BLOCK_STAGES if block else ()), *(("transcoder",) if transcoder else ())),
        drop=("report", "ablate") if no_report else (),
    )
    config = with_budget(config, budget or ("survey" if config.layers else "full"))
    config = dataclasses.replace(  # what the command line names beats the budget
        config,
        tokens=config.tokens if tokens is None else tokens,
        sae_tokens=config.sae_tokens if sae_tokens is None else sae_tokens,
        report_features=config.report_features if report_features is None else report_features,
    )
    from coact.plan.cli import plan_text, stop_unless_fits

    if dry_run:
        typer.echo(plan_text(config))
        return
    stop_unless_fits(config)  # a run that cannot fit stops here, before anything loads
    from coact import api

    execution = Execution(executor=executor, workers=workers, address=address, wait=wait)
    summary = api.analyze(config, execution)
    text = format_summary(summary) if hasattr(summary, "layer") else format_model_summary(summary)  # type: ignore[arg-type]
    typer.echo(text)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plan(ctx: typer.Context) -> None:
    """What `coact analyze` with the same options would cost here, before anything loads:
    per stage the time, host and device memory (measured rates scaled by the model's size
    and the tokens), the code store's size on disk, and whether it fits; exits 2 when it
    does not. Takes analyze's options (`coact analyze --help`)."""
    typer.main.get_command(app).main(["analyze", "--dry-run", *ctx.args], standalone_mode=False)


@app.command("train-sae")
def train_sae(
    site: str = typer.Option(..., help="e.g. mlp_out[3] or mlp_resid[3]"),
    out: Path = typer.Option(..., help="directory for the SAE (SAELens format)"),
    model: str = option(AnalyzeConfig, "model"),
    corpus: str = option(AnalyzeConfig, "corpus"),
    tokens: int = option(AnalyzeConfig, "sae_tokens"),
    expansion: int = option(SaeTrainConfig, "expansion"),
    k: int = option(SaeTrainConfig, "k"),
    device: str = option(AnalyzeConfig, "device"),
    seed: int = option(AnalyzeConfig, "seed"),
) -> None:
    """Train a TopK SAE on one site and save it in the SAELens format."""
    from coact import api
    from coact.models.load import load_model
    from coact.sae.formats import save_saelens

    width = expansion * load_model(model).adapter.d_model
    if k > width:
        raise CoactError(
            f"--k {k} is above the SAE's width {width} (--expansion {expansion} × "
            f"d_model {width // expansion}); use at most {width}"
        )
    sae = api.train_sae(
        site, model=model, corpus=corpus, tokens=tokens, expansion=expansion, k=k,
        device=device, seed=seed,
    )  # fmt: skip
    sae.metadata["model_name"] = model  # so a run on another model can tell
    save_saelens(sae, out)
    typer.echo(f"saved SAE for {site} (width {sae.width}, k {sae.k}) to {out}")


@app.command()
def collect(
    sae: list[str] = typer.Option(
        ..., help="SITE=PATH, repeatable, e.g. mlp_out[3]=runs/x/sae/mlp_out.3"
    ),
    out: Path = typer.Option(..., help="directory of the code store"),
    model: str = option(AnalyzeConfig, "model"),
    corpus: str = option(AnalyzeConfig, "corpus"),
    tokens: int = option(AnalyzeConfig, "tokens"),
    device: str = option(AnalyzeConfig, "device"),
    seed: int = option(AnalyzeConfig, "seed"),
) -> None:
    """Encode a corpus into sparse feature codes with the given SAEs (resumable)."""
    from coact import api
    from coact.models.sites import Site
    from coact.sae.base import SparseAutoencoder

    pairs: dict[str | Site, str | Path | SparseAutoencoder] = {}
    for item in sae:
        if "=" not in item:
            raise CoactError(f"--sae expects SITE=PATH, got {item!r}")
        site, path = item.split("=", 1)
        pairs[site] = path
    store = api.collect(
        pairs, model=model, corpus=corpus, tokens=tokens, device=device, seed=seed, out=out
    )
    typer.echo(json.dumps({"directory": str(store.directory), "tokens": store.n_tokens}))


def _run_config(run: Path) -> AnalyzeConfig:
    from coact.rundir.layout import read_run_config

    return AnalyzeConfig.from_dict(read_run_config(run))


def _decode(model: str) -> Any:
    """The model's tokenizer as a decode function, or None (top tokens shown as ids)."""
    try:
        from coact.models.load import load_model

        tokenizer = load_model(model).tokenizer
    except CoactError:
        typer.echo("model not available: top tokens are shown as ids", err=True)
        return None
    return lambda ids: str(tokenizer.decode(ids))


@app.command()
def connect(
    run: Path = RUN,
    in_site: str | None = typer.Option(None, help="default: mlp_resid[LAYER]"),
    out_site: str | None = typer.Option(None, help="default: mlp_out[LAYER]"),
    n_alphas: int = option(LassoPathConfig, "n_alphas"),
    magnitude: float = option(ConnectConfig, "magnitude"),
    tau: float = option(LinearityConfig, "tau"),
    form: str = option(LinearityConfig, "form"),
    mlp_epochs: int = option(ConnectorTrainConfig, "epochs", default=MLP_FIT.epochs),
    stability: bool = option(ConnectConfig, "stability", "--stability/--no-stability"),
    device: str = option(AnalyzeConfig, "device"),
    wait: bool = wait_option(),
) -> None:
    """Sparse linear connectors (L1 path, frontier, elbow, stability) and the linearity
    table, from a run's feature codes; writes <run>/connect/."""
    from coact.connectors.stage import connect as run_connect
    from coact.models.sites import SitePair
    from coact.pipeline.commands import stage_claim
    from coact.report.text import format_connect
    from coact.rundir.layout import RunLayout

    cfg = _run_config(run)
    pair = SitePair.of(in_site or f"mlp_resid[{cfg.layer}]", out_site or f"mlp_out[{cfg.layer}]")
    config = dataclasses.replace(
        cfg.connect, path=LassoPathConfig(n_alphas=n_alphas), magnitude=magnitude,
        stability=stability, mlp=dataclasses.replace(cfg.connect.mlp, epochs=mlp_epochs),
        linearity=LinearityConfig(tau=tau, form=_form(form)), seed=cfg.seed, device=device,
    )  # fmt: skip
    layout = RunLayout.of(run)
    with stage_claim(run, "connect", wait=wait):
        require_codes(layout.codes)
        with guarded(layout.connect):  # earlier results stay until these land
            result = run_connect(
                layout.codes, pair, layout.connect.path, config, _decode(cfg.model)
            )
    typer.echo(format_connect(result))


@app.command()
def calibrate(
    run: Path = RUN,
    tolerance: float = option(CalibrateConfig, "tolerance"),
    contexts: int = option(CalibrateConfig, "contexts"),
    max_contexts: int = option(CalibrateConfig, "max_contexts"),
    form: str = option(CalibrateConfig, "form"),
    causal: bool = option(CalibrateConfig, "causal", "--causal/--no-causal"),
    wait: bool = wait_option(),
) -> None:
    """Calibrate τ against the model's next-token loss (noise curves, splices, causal
    check); everything else in the run is reused. Writes <run>/calibrate/."""
    from coact.report.text import format_calibrate

    config = _run_config(run)
    settings = dataclasses.replace(
        config.calibrate, tolerance=tolerance, contexts=contexts, form=_form(form), causal=causal,
        max_contexts=max_contexts,
    )  # fmt: skip
    config = dataclasses.replace(config, run_dir=str(run), calibrate=settings).with_stages(
        add=("connect", "calibrate")
    )  # the run's other stages are rerun too, each reusing its finished result
    from coact import api

    summary = api.analyze(config, Execution(wait=wait))
    assert summary.calibrate is not None  # type: ignore[union-attr]
    typer.echo(format_calibrate(summary.calibrate))  # type: ignore[union-attr]


@app.command()
def logic(
    run: Path = typer.Argument(..., help="run directory with connect/ results"),
    max_inputs: int = option(LogicConfig, "max_inputs"),
    sae_connector: bool = typer.Option(
        default_of(LabelsConfig, "sae_connector") is not None,
        "--sae-connector/--no-sae-connector",
        help=help_of(LabelsConfig, "sae_connector"),
    ),
    wait: bool = wait_option(),
) -> None:
    """Label each output feature's computation (OR, AND, A-AND-NOT-B, WEIGHTED-SUM,
    NONLINEAR, UNEXPLAINED) with a confidence, from co-activation statistics and the
    jacobian stage's connections when <run>/jacobian/ holds them; writes <run>/logic/."""
    from coact.logic.stage import label_run
    from coact.models.sites import SitePair
    from coact.pipeline.commands import stage_claim
    from coact.report.text import format_logic
    from coact.rundir.layout import RunLayout

    cfg = _run_config(run)
    try:
        settings = dataclasses.replace(cfg.logic.logic, max_inputs=max_inputs)
    except ValueError as error:
        raise CoactError(f"--max-inputs: {error}") from None
    config = dataclasses.replace(
        cfg.logic,
        logic=settings,
        sae_connector=(cfg.logic.sae_connector or SAE_CONNECTOR) if sae_connector else None,
        seed=cfg.seed,
    )
    layout = RunLayout.of(run)
    pair = SitePair.mlp(cfg.layer)
    with stage_claim(run, "logic", wait=wait):
        require_codes(layout.codes)
        require(layout.connect, f"`coact connect {run}`")
        with guarded(layout.logic):
            result = label_run(
                layout.codes, pair, layout.connect.path, layout.logic.path, config,
                jacobian_dir=layout.jacobian.path,
            )  # fmt: skip
    typer.echo(format_logic(result))


@app.command()
def report(
    run: Path = typer.Argument(
        ..., help="run directory written by `coact analyze` (or a model run's)"
    ),
    out: Path | None = typer.Option(None, help="default: <run>/report"),
    features: int | None = typer.Option(
        None,
        callback=_in_range(Range(0)),
        help=f"how many of the most interesting output features get a page (default "
        f"{DEFAULT_FEATURES}; for a model run, its --report-features)",
    ),
    feature: list[int] | None = typer.Option(
        None, help="an output feature to give a page (repeatable; replaces --features)"
    ),
    keep_layer_reports: bool = typer.Option(
        False,
        help="model run: accepted and redundant; each layer's report (and the model page) "
        "is rebuilt only when its inputs changed",
    ),
    wait: bool = wait_option(),
) -> None:
    """Markdown pages, altair charts and an offline mkdocs-material site from a run;
    prints the path of the built site's index.html. For a model run (`coact analyze
    --layers`) each layer's report is built and a model page links and compares them."""
    from coact.pipeline.commands import stage_claim
    from coact.pipeline.run import SUMMARY
    from coact.report.fingerprint import build_report_if_changed
    from coact.report.model import build_model_report, is_model_run

    chosen = list(feature) if feature else features
    if feature:
        _check_features(run, list(feature))
    with stage_claim(run, SUMMARY, wait=wait):  # analyze's claim on the summary and report
        model_run = is_model_run(run)
        build = build_model_report if model_run else build_report_if_changed
        index = build(run, out, features=chosen)  # unchanged inputs: reused
    typer.echo(f"{'model report' if model_run else 'report'}: {index}")


@app.command()
def ablate(
    run: Path = RUN,
    features: int = typer.Option(
        default_of(AnalyzeConfig, "report_features"),
        help="ablate the report's N most interesting output features",
        callback=_in_range(Range(1)),
    ),
    feature: list[int] | None = typer.Option(
        None, help="an output feature to ablate (repeatable; replaces --features)"
    ),
    contexts: int = option(AblationConfig, "contexts"),
    inputs: int = option(AblationConfig, "inputs_per_feature"),
    input_contexts: int = option(AblationConfig, "input_contexts"),
    window: int = option(AblationConfig, "window"),
    mode: list[str] | None = option(
        AblationConfig, "modes", default=None, show_default="remove, replace"
    ),
    filler: str = option(AblationConfig, "filler"),
    batch_size: int = option(AblationConfig, "batch_size"),
    device: str = option(AnalyzeConfig, "device"),
    wait: bool = wait_option(),
) -> None:
    """Context ablation: remove or replace each token before a feature's top activations,
    rerun the model up to the site and re-encode; writes <run>/evidence/ablation.parquet."""
    from coact.evidence.ablation import MODES
    from coact.pipeline.commands import ablate_run
    from coact.report.text import format_ablation

    modes = tuple(mode or MODES)
    if bad := [m for m in modes if m not in MODES]:
        raise CoactError(f"unknown --mode {bad}; use remove or replace")
    settings = AblationConfig(
        contexts=contexts, input_contexts=input_contexts, inputs_per_feature=inputs,
        window=window, modes=modes, filler=filler, batch_size=batch_size,  # type: ignore[arg-type]
    )  # fmt: skip
    chosen = list(feature) if feature else features
    result = ablate_run(run, settings, chosen, device=device, wait=wait)
    typer.echo(format_ablation(result))


@app.command()
def outliers(
    run: Path = RUN,
    first_positions: int = option(OutlierConfig, "first_positions"),
    norm_factor: float = option(OutlierConfig, "norm_factor"),
    share: float = option(OutlierConfig, "share"),
    min_active: int = option(OutlierConfig, "min_active"),
    wait: bool = wait_option(),
) -> None:
    """Flag artefact features (firing mostly on the first tokens, the first delimiter or
    tokens of very high norm) of the layer's sites; writes <run>/outliers/outliers.parquet."""
    from coact.pipeline.commands import outliers_run
    from coact.report.text import format_outliers

    settings = OutlierConfig(
        first_positions=first_positions, norm_factor=norm_factor, share=share,
        min_active=min_active,
    )  # fmt: skip
    typer.echo(format_outliers(outliers_run(run, settings, wait=wait)))


@app.command()
def linearity(
    run: Path = typer.Argument(..., help="run directory with connect/ results"),
    tau: float | None = typer.Option(
        None,
        help="threshold on d(j); default: the calibrated τ, else the seed's 0.001",
        callback=_in_range(range_of(LinearityConfig, "tau") or Range()),
    ),
    form: str | None = typer.Option(None, help=help_of(LinearityConfig, "form")),
) -> None:
    """Re-read the linearity table at another τ or form (no refitting) and print the share."""
    import polars as pl

    from coact.calibrate.stage import CalibrateResult
    from coact.linearity.table import percent_linear, relabel
    from coact.report.text import format_share
    from coact.rundir.layout import RunLayout

    layout = RunLayout.of(run)
    require(layout.connect, f"`coact connect {run}`")
    if not layout.connect.features.is_file():
        raise CoactError(
            f"no linearity table at {layout.connect.features}; run `coact connect {run}` first"
        )
    calibrated = CalibrateResult.read(layout.calibrate.result) if tau is None else None
    if calibrated is not None:
        tau, form = calibrated.tau, form or calibrated.form
        typer.echo(f"calibrated τ = {tau:.4g} ({form} form), from {layout.calibrate.result}")
    tau = default_of(LinearityConfig, "tau") if tau is None else tau
    form = form or default_of(LinearityConfig, "form")
    assert tau is not None and form is not None
    at = LinearityConfig(tau=tau, form=_form(form))
    table = relabel(pl.read_parquet(layout.connect.features), at)
    typer.echo(format_share(percent_linear(table), tau, form).strip())


GRAPH = inspect.signature(feature_graph).parameters


@app.command()
def graph(
    run: Path = typer.Argument(..., help="a layer run with block results (--block)"),
    site: str = typer.Argument(..., help="the chosen feature's site, e.g. 'mlp_out[3]'"),
    feature: int = typer.Argument(..., help="the chosen feature's index at that site"),
    top: int = typer.Option(
        GRAPH["top"].default,
        help="strongest connections kept per feature and hop",
        callback=_in_range(Range(1)),
    ),
    depth: int = typer.Option(
        GRAPH["depth"].default,
        help="hops walked from the chosen feature",
        callback=_in_range(Range(1)),
    ),
    direction: str = typer.Option(
        GRAPH["direction"].default, help="in (what feeds it), out (what it feeds) or both"
    ),
    out: Path | None = typer.Option(None, help="default: <run>/graph/"),
    wait: bool = wait_option(),
) -> None:
    """The layer graph of one feature: the connections that feed it (or that it feeds)
    through the skip path, attention, the MLP and the composition of the next stream.
    Writes its edge and node tables (parquet and CSV) and the chart (SVG, PNG)."""
    from coact.pipeline.commands import GRAPH_CLAIM, stage_claim
    from coact.report.graph import write_feature_graph
    from coact.report.text import format_graph

    with stage_claim(run, GRAPH_CLAIM, wait=wait):
        found, written = write_feature_graph(run, site, feature, top, depth, direction, out)
    typer.echo(format_graph(found))
    typer.echo("wrote " + ", ".join(str(p) for p in written))


def _check_features(run: Path, features: list[int]) -> None:
    """Each --feature is an output feature of the run (0 to its SAE's width − 1)."""
    from coact.rundir.read import output_width

    width = output_width(run)
    if width is not None and (bad := [j for j in features if not 0 <= j < width]):
        raise CoactError(
            f"--feature {bad[0]} is out of range: the output SAE has {width} "
            f"features (0..{width - 1})"
        )


def _form(form: str) -> Literal["raw", "fvu", "seed"]:
    if form not in ("raw", "fvu", "seed"):
        raise CoactError(f"unknown form {form!r}; use raw, fvu or seed")
    return form  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors, usage errors and file-system faults become one to three
    lines on stderr and exit status 2, never a traceback."""
    try:
        code = app(args=argv, standalone_mode=False, prog_name="coact")
    except CoactError as error:
        _fail(str(error))
    except (typer.Abort, KeyboardInterrupt):
        print("coact: interrupted; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    except OSError as error:
        _fail(file_fault(error))
    except Exception as error:
        lines = usage_lines(error)
        if lines is None:
            raise
        print("\n".join(lines), file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
