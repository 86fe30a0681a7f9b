"""The `coact` command line: thin wrappers that build configs and call the stage functions."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from coact.errors import CoactError
from coact.models.load import EMBEDDED

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="coact: how the SAE features a transformer block reads turn into the features it writes.",
)

ModelOpt = Annotated[
    str, typer.Option(help=f"{EMBEDDED!r}, a tiny-* test model, a local directory or a hub id")
]
CorpusOpt = Annotated[
    str, typer.Option(help="'embedded', a text file or folder, a saved dataset or a hub dataset id")
]
DeviceOpt = Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1, mps")]


@app.command()
def analyze(
    layer: Annotated[int, typer.Option(help="block whose MLP is studied")] = 3,
    layers: Annotated[
        str | None,
        typer.Option(
            help="a model run over several blocks: 'all', '0-5' or '1,3,5' (implies --block; "
            "SAEs and codes are shared, each layer lands in <run>/L<layer>/)"
        ),
    ] = None,
    block: Annotated[
        bool,
        typer.Option(help="also attention connectors, position scores and residual composition"),
    ] = False,
    model: ModelOpt = EMBEDDED,
    corpus: CorpusOpt = "embedded",
    budget: Annotated[
        str | None,
        typer.Option(
            help="'full' (the default for one layer) or 'survey' (the default with --layers: "
            "40k code tokens, 120k SAE tokens, fewer evaluation contexts, no sae-connector)"
        ),
    ] = None,
    tokens: Annotated[
        int | None,
        typer.Option(help="tokens whose feature codes are stored [default: 100000; survey 40000]"),
    ] = None,
    sae_tokens: Annotated[
        int | None,
        typer.Option(help="tokens each trained SAE sees [default: 400000; survey 120000]"),
    ] = None,
    ctx_len: Annotated[int, typer.Option(help="tokens per context, BOS included")] = 128,
    device: DeviceOpt = "cpu",
    run_dir: Annotated[str | None, typer.Option(help="default: runs/<model>-L<layer>")] = None,
    sae_in: Annotated[
        str | None, typer.Option(help="SAE directory for mlp_resid at --layer; trained if omitted")
    ] = None,
    sae_out: Annotated[
        str | None, typer.Option(help="SAE directory for mlp_out at --layer; trained if omitted")
    ] = None,
    seed: int = 0,
    no_report: Annotated[bool, typer.Option(help="skip the report site")] = False,
    report_features: Annotated[
        int | None,
        typer.Option(
            help="output features per layer that get a page of their own [default: 50; survey 10]"
        ),
    ] = None,
) -> None:
    """Model → corpus → SAEs at the MLP's input and output → feature codes → connectors →
    calibration → logic labels → report; prints the headline and the report's path."""
    from coact.pipeline.run import AnalyzeConfig, parse_layers, with_budget
    from coact.pipeline.run import analyze as run_analyze
    from coact.report.text import format_model_summary, format_summary

    config = AnalyzeConfig(
        model=model,
        layer=layer,
        layers=parse_layers(layers) if layers is not None else None,
        block=block,
        corpus=corpus,
        ctx_len=ctx_len,
        seed=seed,
        device=device,
        run_dir=run_dir,
        sae_in=sae_in,
        sae_out=sae_out,
        report=not no_report,
    )
    config = with_budget(config, budget or ("survey" if config.layers else "full"))
    config = dataclasses.replace(  # what the command line names beats the budget
        config,
        tokens=config.tokens if tokens is None else tokens,
        sae_tokens=config.sae_tokens if sae_tokens is None else sae_tokens,
        report_features=config.report_features if report_features is None else report_features,
    )
    summary = run_analyze(config)
    typer.echo(format_model_summary(summary) if "layers" in summary else format_summary(summary))


@app.command("train-sae")
def train_sae(
    site: Annotated[str, typer.Option(help="e.g. mlp_out[3] or mlp_resid[3]")],
    out: Annotated[Path, typer.Option(help="directory for the SAE (SAELens format)")],
    model: ModelOpt = EMBEDDED,
    corpus: CorpusOpt = "embedded",
    tokens: Annotated[int, typer.Option(help="training tokens")] = 400_000,
    expansion: Annotated[int, typer.Option(help="width = expansion × d_model")] = 4,
    k: Annotated[int, typer.Option(help="active latents per token")] = 32,
    device: DeviceOpt = "cpu",
    seed: int = 0,
) -> None:
    """Train a TopK SAE on one site and save it in the SAELens format."""
    from coact import api

    sae = api.train_sae(
        site,
        model=model,
        corpus=corpus,
        tokens=tokens,
        expansion=expansion,
        k=k,
        device=device,
        seed=seed,
        out=out,
    )
    typer.echo(f"saved SAE for {site} (width {sae.width}, k {sae.k}) to {out}")


@app.command()
def collect(
    sae: Annotated[
        list[str], typer.Option(help="SITE=PATH, repeatable, e.g. mlp_out[3]=runs/x/sae/mlp_out.3")
    ],
    out: Annotated[Path, typer.Option(help="directory of the code store")],
    model: ModelOpt = EMBEDDED,
    corpus: CorpusOpt = "embedded",
    tokens: Annotated[int, typer.Option(help="tokens to encode")] = 100_000,
    device: DeviceOpt = "cpu",
    seed: int = 0,
) -> None:
    """Encode a corpus into sparse feature codes with the given SAEs (resumable)."""
    from coact import api
    from coact.models.sites import Site
    from coact.sae.base import Sae

    pairs: dict[str | Site, str | Path | Sae] = {}
    for item in sae:
        if "=" not in item:
            raise CoactError(f"--sae expects SITE=PATH, got {item!r}")
        site, path = item.split("=", 1)
        pairs[site] = path
    store = api.collect(
        pairs, model=model, corpus=corpus, tokens=tokens, device=device, seed=seed, out=out
    )
    typer.echo(json.dumps({"directory": str(store.directory), "tokens": store.n_tokens}))


def _run_config(run: Path) -> dict[str, object]:
    from coact.rundir.layout import read_run_config

    return read_run_config(run)


def _codes(run: Path) -> Path:
    from coact.rundir.layout import RunLayout

    return RunLayout.of(run).codes


@app.command()
def connect(
    run: Annotated[Path, typer.Argument(help="run directory written by `coact analyze`")],
    in_site: Annotated[str | None, typer.Option(help="default: mlp_resid[LAYER]")] = None,
    out_site: Annotated[str | None, typer.Option(help="default: mlp_out[LAYER]")] = None,
    n_alphas: Annotated[int, typer.Option(help="points on the α grid")] = 20,
    magnitude: Annotated[
        float, typer.Option(help="standardised |w| above which a weight counts as large")
    ] = 0.05,
    tau: Annotated[float, typer.Option(help="linearity threshold on d(j)")] = 0.001,
    form: Annotated[str, typer.Option(help="form of d(j) τ applies to: raw, fvu or seed")] = "seed",
    mlp_epochs: Annotated[
        int, typer.Option(help="most epochs of the mlp fit (it stops early)")
    ] = 10,
    no_stability: Annotated[bool, typer.Option(help="skip the two-halves refit")] = False,
    device: DeviceOpt = "cpu",
) -> None:
    """Sparse linear connectors (L1 path, frontier, elbow, stability) and the linearity
    table, from a run's feature codes; writes <run>/connect/."""
    from coact.connectors.exact import LassoPathConfig
    from coact.connectors.stage import ConnectConfig
    from coact.connectors.stage import connect as run_connect
    from coact.linearity.table import LinearityConfig

    cfg = _run_config(run)
    layer = cfg.get("layer")
    config = ConnectConfig(
        in_site=in_site or f"mlp_resid[{layer}]",
        out_site=out_site or f"mlp_out[{layer}]",
        path=LassoPathConfig(n_alphas=n_alphas),
        magnitude=magnitude,
        stability=not no_stability,
        mlp_epochs=mlp_epochs,
        linearity=LinearityConfig(tau=tau, form=_form(form)),
        seed=int(str(cfg.get("seed", 0))),
        device=device,
    )
    decode = None
    try:
        from coact.models.load import load_model

        tokenizer = load_model(str(cfg["model"])).tokenizer
        decode = lambda ids: str(tokenizer.decode(ids))  # noqa: E731
    except CoactError:
        typer.echo("model not available: top tokens are shown as ids", err=True)
    summary = run_connect(_codes(run), config, run / "connect", decode=decode)
    from coact.report.text import format_connect

    typer.echo(format_connect(summary))


@app.command()
def calibrate(
    run: Annotated[Path, typer.Argument(help="run directory written by `coact analyze`")],
    tolerance: Annotated[
        float, typer.Option(help="ε: extra ΔCE over the mlp splice allowed, nats per token")
    ] = 0.01,
    contexts: Annotated[int, typer.Option(help="held-out contexts to measure on")] = 16,
    form: Annotated[str, typer.Option(help="form of d(j) τ applies to: raw, fvu or seed")] = "seed",
    no_causal: Annotated[bool, typer.Option(help="skip the causal check of connections")] = False,
) -> None:
    """Calibrate τ against the model's next-token loss (noise curves, splices, causal
    check); everything else in the run is reused. Writes <run>/calibrate/."""
    import dataclasses

    from coact.pipeline.run import AnalyzeConfig
    from coact.pipeline.run import analyze as run_analyze
    from coact.report.text import format_calibrate

    config = AnalyzeConfig.from_dict(_run_config(run))
    settings = dataclasses.replace(
        config.calibrate_settings,
        tolerance=tolerance,
        contexts=contexts,
        form=_form(form),
        causal=not no_causal,
    )
    config = dataclasses.replace(
        config, run_dir=str(run), connect=True, calibrate=True, calibrate_settings=settings
    )
    summary = run_analyze(config)
    typer.echo(format_calibrate(summary["calibrate"]))


@app.command()
def logic(
    run: Annotated[Path, typer.Argument(help="run directory with connect/ results")],
    max_inputs: Annotated[int, typer.Option(help="inputs per feature (at most 4)")] = 3,
    no_sae_connector: Annotated[
        bool, typer.Option(help="skip the sae-connector's hidden latents")
    ] = False,
) -> None:
    """Label each output feature's computation (OR, AND, A-AND-NOT-B, WEIGHTED-SUM,
    UNEXPLAINED) with a confidence, from co-activation statistics; writes <run>/logic/."""
    import dataclasses

    from coact.logic.config import LogicConfig
    from coact.logic.stage import LabelsConfig, label_run
    from coact.report.text import format_logic

    cfg = _run_config(run)
    layer = cfg.get("layer")
    if not 1 <= max_inputs <= 4:
        raise CoactError(f"--max-inputs must be 1 to 4, got {max_inputs}")
    config = LabelsConfig(
        in_site=f"mlp_resid[{layer}]",
        out_site=f"mlp_out[{layer}]",
        logic=dataclasses.replace(LogicConfig(), max_inputs=max_inputs),
        sae_connector=not no_sae_connector,
        seed=int(str(cfg.get("seed", 0))),
    )
    summary = label_run(_codes(run), run / "connect", run / "logic", config)
    typer.echo(format_logic(summary))


@app.command()
def report(
    run: Annotated[
        Path, typer.Argument(help="run directory written by `coact analyze` (or a model run's)")
    ],
    out: Annotated[Path | None, typer.Option(help="default: <run>/report")] = None,
    features: Annotated[
        int | None,
        typer.Option(
            help="how many of the most interesting output features get a page (default 50; "
            "for a model run, its --report-features)"
        ),
    ] = None,
    feature: Annotated[
        list[int] | None,
        typer.Option(help="an output feature to give a page (repeatable; replaces --features)"),
    ] = None,
    keep_layer_reports: Annotated[
        bool,
        typer.Option(help="model run: reuse each layer's report that is newer than its results"),
    ] = False,
) -> None:
    """Markdown pages, altair charts and an offline mkdocs-material site from a run;
    prints the path of the built site's index.html. For a model run (`coact analyze
    --layers`) each layer's report is built and a model page links and compares them."""
    from coact.report.model import build_model_report, is_model_run

    chosen = list(feature) if feature else features
    if is_model_run(run):
        index = build_model_report(run, out, features=chosen, rebuild_layers=not keep_layer_reports)
        typer.echo(f"model report: {index}")
        return
    from coact.report.build import build_report

    index = build_report(run, out, features=chosen)
    typer.echo(f"report: {index}")


@app.command()
def ablate(
    run: Annotated[Path, typer.Argument(help="run directory written by `coact analyze`")],
    features: Annotated[
        int, typer.Option(help="ablate the report's N most interesting output features")
    ] = 50,
    feature: Annotated[
        list[int] | None,
        typer.Option(help="an output feature to ablate (repeatable; replaces --features)"),
    ] = None,
    contexts: Annotated[int, typer.Option(help="top contexts per output feature")] = 4,
    inputs: Annotated[int, typer.Option(help="top inputs of each output also ablated")] = 2,
    input_contexts: Annotated[int, typer.Option(help="top contexts per input")] = 2,
    window: Annotated[int, typer.Option(help="preceding tokens ablated, one at a time")] = 8,
    mode: Annotated[
        list[str] | None, typer.Option(help="remove and/or replace (repeatable; default both)")
    ] = None,
    filler: Annotated[str, typer.Option(help="replace mode's token (if it is one token)")] = " ",
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 64,
    device: DeviceOpt = "cpu",
) -> None:
    """Context ablation: remove or replace each token before a feature's top activations,
    rerun the model up to the site and re-encode; writes <run>/evidence/ablation.parquet."""
    from coact.evidence.ablation import MODES, AblationConfig
    from coact.pipeline.run import ablate_run
    from coact.report.text import format_ablation

    modes = tuple(mode or MODES)
    if bad := [m for m in modes if m not in MODES]:
        raise CoactError(f"unknown --mode {bad}; use remove or replace")
    settings = AblationConfig(
        contexts=contexts,
        input_contexts=input_contexts,
        inputs_per_feature=inputs,
        window=window,
        modes=modes,  # type: ignore[arg-type]
        filler=filler,
        batch_size=batch_size,
    )
    result = ablate_run(run, settings, list(feature) if feature else features, device=device)
    typer.echo(format_ablation(result))


@app.command()
def outliers(
    run: Annotated[Path, typer.Argument(help="run directory written by `coact analyze`")],
    first_positions: Annotated[
        int, typer.Option(help="positions below this are a context's first tokens")
    ] = 4,
    norm_factor: Annotated[
        float, typer.Option(help="a norm above this × the site's median is very high")
    ] = 10.0,
    share: Annotated[
        float, typer.Option(help="flag when at least this share of active tokens is one kind")
    ] = 0.5,
    min_active: Annotated[int, typer.Option(help="features active on fewer are not judged")] = 10,
) -> None:
    """Flag artefact features (firing mostly on the first tokens, the first delimiter or
    tokens of very high norm) of both sites; writes <run>/outliers/outliers.parquet."""
    from coact.evidence.outliers import OutlierConfig
    from coact.pipeline.run import outliers_run
    from coact.report.text import format_outliers

    settings = OutlierConfig(
        first_positions=first_positions,
        norm_factor=norm_factor,
        share=share,
        min_active=min_active,
    )
    typer.echo(format_outliers(outliers_run(run, settings)))


@app.command()
def linearity(
    run: Annotated[Path, typer.Argument(help="run directory with connect/ results")],
    tau: Annotated[
        float | None,
        typer.Option(help="threshold on d(j); default: the calibrated τ, else the seed's 0.001"),
    ] = None,
    form: Annotated[
        str | None, typer.Option(help="form of d(j) τ applies to: raw, fvu or seed")
    ] = None,
) -> None:
    """Re-read the linearity table at another τ or form (no refitting) and print the share."""
    from coact.linearity.table import SEED_TAU, LinearityConfig, percent_linear, relabel
    from coact.report.text import format_share

    path = run / "connect" / "features.parquet"
    if not path.is_file():
        raise CoactError(f"no linearity table at {path}; run `coact connect {run}` first")
    import polars as pl

    calibrated = run / "calibrate" / "calibrate.json"
    if tau is None and calibrated.is_file():
        headline = json.loads(calibrated.read_text())
        tau, form = float(headline["tau"]), form or str(headline["form"])
        typer.echo(f"calibrated τ = {tau:.4g} ({form} form), from {calibrated}")
    tau = SEED_TAU if tau is None else tau
    form = form or "seed"
    table = relabel(pl.read_parquet(path), LinearityConfig(tau=tau, form=_form(form)))
    typer.echo(format_share(percent_linear(table), tau, form).strip())


@app.command()
def graph(
    run: Annotated[Path, typer.Argument(help="a layer run with block results (--block)")],
    site: Annotated[str, typer.Argument(help="the chosen feature's site, e.g. 'mlp_out[3]'")],
    feature: Annotated[int, typer.Argument(help="the chosen feature's index at that site")],
    top: Annotated[int, typer.Option(help="strongest connections kept per feature and hop")] = 3,
    depth: Annotated[int, typer.Option(help="hops walked from the chosen feature")] = 2,
    direction: Annotated[
        str, typer.Option(help="in (what feeds it), out (what it feeds) or both")
    ] = "in",
    out: Annotated[Path | None, typer.Option(help="default: <run>/graph/")] = None,
) -> None:
    """The layer graph of one feature: the connections that feed it (or that it feeds)
    through the skip path, attention, the MLP and the composition of the next stream.
    Writes its edge and node tables (parquet and CSV) and the chart (SVG, PNG)."""
    from coact.block.graph import feature_graph, write_graph
    from coact.report import charts
    from coact.report.graph import graph_chart
    from coact.report.text import format_graph
    from coact.rundir.read import load_run

    data = load_run(run)
    tables = data.layer_tables()
    if tables is None:
        raise CoactError(
            f"{run} has no attention or composition results; run "
            f"`coact analyze --layer {data.layer} --block --run-dir {run}` first"
        )
    found = feature_graph(
        tables,
        site,
        feature,
        top=top,
        depth=depth,
        direction=direction,  # type: ignore[arg-type]
    )
    paths = write_graph(found, out or run / "graph")
    csv = paths["edges"].with_suffix(".csv")
    found.edges.write_csv(csv)
    chart, _ = graph_chart(found)
    drawn = charts.save(
        chart, paths["edges"].with_name(paths["edges"].name.replace("_edges.parquet", ""))
    )
    typer.echo(format_graph(found))
    typer.echo("wrote " + ", ".join(str(p) for p in [*paths.values(), csv, *drawn]))


def _form(form: str) -> Literal["raw", "fvu", "seed"]:
    if form not in ("raw", "fvu", "seed"):
        raise CoactError(f"unknown form {form!r}; use raw, fvu or seed")
    return form  # type: ignore[return-value]


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    try:
        app(standalone_mode=False)
    except CoactError as error:
        print(f"coact: error: {error}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("coact: interrupted; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # click usage errors carry their own exit code
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise


__all__ = ["app", "main"]
