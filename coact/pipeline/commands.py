"""Stages rerun on a finished run directory by their own command (`coact ablate`,
`coact outliers`): the run's config says which model, codes and SAEs. Every stage command
writes under the claim `coact analyze` takes for that stage (`stage_claim`), so a command
and an analyze resuming the same run never write one stage at once."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from coact.codes.store import CodeStore
from coact.errors import CoactError
from coact.evidence.ablation import AblationConfig, AblationResult, ablate
from coact.evidence.outliers import OutlierConfig, OutliersResult, outliers, run_saes
from coact.models.sites import Site
from coact.pipeline.config import AnalyzeConfig, run_model
from coact.pipeline.shared import layer_sites
from coact.rundir.claims import SUMMARY, claimed
from coact.rundir.layout import CONFIG, RunLayout, read_run_config
from coact.rundir.verify import guarded, require, require_codes

GRAPH_CLAIM = "graph"  # `coact graph`'s tables and charts in <run>/graph/ (no analyze stage)
CLAIMED = {SUMMARY: "the summary and report", GRAPH_CLAIM: "the feature graphs"}


def stage_claim(
    run_dir: str | Path, name: str, *, wait: bool = True
) -> AbstractContextManager[object]:
    """The claim `coact analyze` holds while it writes stage `name` of `run_dir` (SUMMARY:
    summary.json and the report), for a stage command to write under; `wait` as analyze's
    --wait/--no-wait. A path that is no run directory (no config.json) has nothing to
    claim and gets nothing written: the command's own checks say what is wrong with it."""
    run = Path(run_dir)
    if not (run / CONFIG).is_file():
        return nullcontext()
    what = f"{CLAIMED.get(name, f'stage {name}')} of {run}"
    return claimed(RunLayout(run, run).claims, name, what, wait=wait)


def report_ablation_targets(
    run_dir: Path, features: int | list[int], settings: AblationConfig
) -> dict[tuple[str, int], int]:
    """(site slug, feature) → top contexts to ablate: the output features the report gives
    a page (the `features` most interesting ones, or these ids) and their top inputs."""
    from coact.report.select import ablation_targets, interesting_features
    from coact.rundir.read import load_run, output_width

    data = load_run(run_dir)
    if isinstance(features, int):
        if data.features is None:
            raise CoactError(f"{run_dir} has no linearity table: run `coact connect` first")
        outputs = list(interesting_features(data, features))
    else:
        outputs = [int(j) for j in features]
        width = output_width(run_dir)
        if width is not None and (bad := [j for j in outputs if not 0 <= j < width]):
            raise CoactError(
                f"--feature {bad[0]} is out of range: the output SAE has {width} features "
                f"(0..{width - 1})"
            )
    return ablation_targets(
        data,
        outputs,
        settings.contexts,
        settings.inputs_per_feature,
        settings.input_contexts,
    )


def ablate_run(
    run_dir: str | Path,
    settings: AblationConfig | None = None,
    features: int | list[int] = 50,
    device: str = "cpu",
    *,
    wait: bool = True,
) -> AblationResult:
    """`coact ablate`: context ablation of a finished run's report features (or the given
    output features) and their top inputs, into <run>/evidence/, under the stage's claim."""
    layout = RunLayout.of(run_dir)
    config = AnalyzeConfig.from_dict(read_run_config(layout.run_dir))
    with stage_claim(layout.run_dir, "ablate", wait=wait):
        return _ablated(layout, config, settings or AblationConfig(), features, device)


def _ablated(
    layout: RunLayout,
    config: AnalyzeConfig,
    settings: AblationConfig,
    features: int | list[int],
    device: str,
) -> AblationResult:
    """The ablation, under the claim: the codes and connectors it reads are checked there."""
    require_codes(layout.codes)
    require(layout.connect, f"`coact connect {layout.run_dir}`")
    wanted = report_ablation_targets(layout.run_dir, features, settings)
    lm = run_model(config, device)
    store = CodeStore.open(layout.codes)
    require_saes(layout, config, sorted({slug for slug, _ in wanted}))
    found = run_saes(layout.run_dir, sorted({slug for slug, _ in wanted}), device=device)
    saes = {Site.parse(slug): sae for slug, sae in found.items()}
    decode = lambda ids: str(lm.tokenizer.decode(ids))  # noqa: E731
    with guarded(layout.ablation):  # earlier results stay until these land
        return ablate(lm, saes, store, wanted, layout.ablation.path, settings, decode=decode)


def require_saes(layout: RunLayout, config: AnalyzeConfig, slugs: list[str]) -> None:
    """An SAE the run has on this machine must be readable: a damaged one stops the
    command (a missing one is left out by `run_saes`, its norms unknown)."""
    from coact.sae.formats import load_sae

    given = {
        Site("mlp_resid", config.layer).slug: config.sae_in,
        Site("mlp_out", config.layer).slug: config.sae_out,
    }
    for slug in slugs:
        source = Path(given.get(slug) or layout.sae_dir(slug))
        if source.exists():
            try:
                load_sae(source)
            except CoactError as error:
                raise CoactError(
                    f"{error}; restore the SAE or rerun `coact analyze` with the run's settings"
                ) from None


def outliers_run(
    run_dir: str | Path,
    settings: OutlierConfig | None = None,
    device: str = "cpu",
    *,
    wait: bool = True,
) -> OutliersResult:
    """`coact outliers`: flag a finished run's artefact features into <run>/outliers/,
    under the stage's claim."""
    layout = RunLayout.of(run_dir)
    config = AnalyzeConfig.from_dict(read_run_config(layout.run_dir))
    with stage_claim(layout.run_dir, "outliers", wait=wait):
        return _flagged(layout, config, settings or OutlierConfig(), device)


def _flagged(
    layout: RunLayout, config: AnalyzeConfig, settings: OutlierConfig, device: str
) -> OutliersResult:
    """The flags, under the claim: the codes and SAEs they read are checked there."""
    import polars as pl

    from coact.report.evidence import default_decode

    require_codes(layout.codes)
    store = CodeStore.open(layout.codes)
    slugs = [site.slug for site in layer_sites(config, config.layer)]
    top = layout.connect.top_tokens
    decode = default_decode(layout.run_dir, pl.read_parquet(top) if top.is_file() else None)
    require_saes(layout, config, slugs)
    saes = run_saes(layout.run_dir, slugs, device=device)
    with guarded(layout.outliers):  # earlier results stay until these land
        return outliers(
            store, layout.outliers.path, settings, sites=slugs, decode=decode, saes=saes,
        )  # fmt: skip
