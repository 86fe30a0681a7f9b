"""`analyze`: model → corpus → SAEs → feature codes → connectors and linearity →
calibration of τ → logic labels → outliers and context ablation → (with `block`, attention
connectors, position scores and residual composition) → summary → report.

One layer (`layer`) or several (`layers`): the layers of a model run share one set of SAEs
and one code store (`coact.rundir.layout`), so every SAE is trained once and every activation is
encoded in one forward pass; each layer's stages then write into `<run>/L<layer>/`.
Each step reuses what an earlier run of the same configuration left behind (trained SAEs,
finished code shards, finished stage results), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from coact.block.stage import BlockConfig, analyze_block, block_sites
from coact.calibrate.stage import CalibrateConfig, calibrate
from coact.codes.collect import CollectConfig, collect_codes, sae_fingerprint
from coact.codes.corpus import Contexts, CorpusConfig, build_contexts
from coact.codes.store import CodeStore
from coact.connectors.stage import ConnectConfig, connect
from coact.connectors.train import split_rows
from coact.errors import CoactError
from coact.evidence.ablation import AblationConfig, ablate
from coact.evidence.outliers import OutlierConfig, outliers
from coact.linearity.table import SEED_TAU, LinearityConfig
from coact.logic.stage import LabelsConfig, label_run
from coact.models.load import EMBEDDED, LoadedModel, load_model
from coact.models.sites import Site
from coact.rundir.files import atomic_write
from coact.rundir.layout import RunLayout, read_run_config
from coact.sae.base import Sae
from coact.sae.evaluate import SaeEvalConfig, SaeReport, check_sae_fits, evaluate_saes
from coact.sae.formats import load_sae, save_saelens
from coact.sae.train import SaeTrainConfig, train_saes


@dataclass(frozen=True)
class AnalyzeConfig:
    model: str = EMBEDDED
    layer: int = 3
    layers: tuple[int, ...] | str | None = None  # a model run over these layers, or "all"
    corpus: str = "embedded"
    tokens: int = 100_000  # tokens whose feature codes are stored
    sae_tokens: int = 400_000  # tokens each trained SAE sees (when none is given)
    eval_contexts: int = 32  # held-out contexts for FVE / L0 / CE recovered
    ctx_len: int = 128
    seed: int = 0
    device: str = "cpu"
    run_dir: str | None = None  # default: runs/<model>-L<layer> (or -L<first>-<last>)
    shared_dir: str | None = None  # set on a model run's layers: where sae/ and codes/ live
    sae_in: str | None = None  # SAE for mlp_resid[layer]; trained when None
    sae_out: str | None = None  # SAE for mlp_out[layer]; trained when None
    sae: SaeTrainConfig = field(default_factory=SaeTrainConfig)
    sae_group: int = 16  # SAEs trained together in one pass over the model (bounds memory)
    collect: CollectConfig = field(default_factory=CollectConfig)
    connect: bool = True  # fit connectors and the linearity table after collecting
    connect_settings: ConnectConfig = field(
        default_factory=lambda: ConnectConfig(in_site="", out_site="")
    )  # its sites are set from `layer`
    calibrate: bool = True  # calibrate τ against the model's loss (needs `connect`)
    calibrate_settings: CalibrateConfig = field(default_factory=lambda: CalibrateConfig(layer=-1))
    labels: bool = True  # label each feature's computation (needs `connect`)
    labels_settings: LabelsConfig = field(
        default_factory=lambda: LabelsConfig(in_site="", out_site="")
    )  # its sites are set from `layer`
    outliers: bool = True  # flag artefact features of the layer's sites (<run>/outliers/)
    outlier_settings: OutlierConfig = field(default_factory=OutlierConfig)
    block: bool = False  # also attention connectors, position scores, residual composition
    block_settings: BlockConfig = field(default_factory=BlockConfig)
    report: bool = True  # write the report and build its site (<run>/report/site/)
    report_features: int = 50  # output features that get a page of their own
    ablate: bool = True  # with the report: context ablation of its features (<run>/evidence/)
    ablation_settings: AblationConfig = field(default_factory=AblationConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalyzeConfig:
        """The config a run wrote to config.json (keys it lacks take today's defaults)."""
        return _from_dict(cls, data)

    def resolved_run_dir(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        slug = self.model.strip("/").replace("/", "--").replace(".", "_")
        if self.layers == "all":
            return Path("runs") / f"{slug}-all"
        if self.layers:
            first, last = min(self.layers), max(self.layers)
            return Path("runs") / (f"{slug}-L{first}" + (f"-{last}" if last != first else ""))
        return Path("runs") / f"{slug}-L{self.layer}"


BUDGETS = ("full", "survey")
EVAL_GROUP = 16  # SAEs evaluated per shared capture and clean pass (a killed run loses ≤ one group)


def with_budget(config: AnalyzeConfig, budget: str) -> AnalyzeConfig:
    """`full`: the config as given. `survey`: budgets that fit every layer of a small
    model on a laptop CPU in a few hours: fewer code and SAE tokens, smaller SAE batches
    (so the SAEs still take a few hundred steps), 64 SAEs per pass over the model (each
    pass is a forward to its deepest site: with 16, SmolLM2's 121 SAEs cost five whole
    forward passes over the training tokens, with 64 one and a half; about 5 GB; a
    `sae_group` set by hand is kept), fewer evaluation and calibration contexts, noise
    strengths (isotropic noise only) and candidate τ, two contexts per feature for the
    report's context ablation (and one top input each), a shorter composition path (10 α
    down to 0.05 × the largest: its 6912 inputs make the small α the costly ones), no
    sae-connector, no two-halves refit of the sparse connectors, three ridge λ for the
    position score, 8 × 8 resampled attention contexts (each a forward pass to the layer:
    the deepest layers' costliest stage at 16 × 16), and pages for the top 10 features of
    each layer."""
    if budget not in BUDGETS:
        raise CoactError(f"unknown budget {budget!r}: choose one of {', '.join(BUDGETS)}")
    if budget == "full":
        return config
    composition = config.block_settings.composition_settings
    return dataclasses.replace(
        config,
        tokens=40_000,
        sae_tokens=120_000,
        eval_contexts=8,
        sae=dataclasses.replace(config.sae, batch_tokens=512, dead_after_tokens=50_000),
        sae_group=64 if config.sae_group == AnalyzeConfig.sae_group else config.sae_group,
        calibrate_settings=dataclasses.replace(
            config.calibrate_settings,
            contexts=8,
            strengths=(0.0, 0.03, 0.3, 1.0),
            noise_kinds=("isotropic",),
            n_taus=4,
        ),
        ablation_settings=dataclasses.replace(
            config.ablation_settings, contexts=2, input_contexts=1, inputs_per_feature=1
        ),
        connect_settings=dataclasses.replace(config.connect_settings, stability=False),
        labels_settings=dataclasses.replace(config.labels_settings, sae_connector=False),
        block_settings=dataclasses.replace(
            config.block_settings,
            decoded_contexts=8,
            causal_contexts=8,
            resample=dataclasses.replace(config.block_settings.resample, targets=8),
            positions=dataclasses.replace(config.block_settings.positions, ridge=(0.3, 3.0, 30.0)),
            composition_settings=dataclasses.replace(
                composition,
                path=dataclasses.replace(composition.path, n_alphas=10, alpha_min_ratio=0.05),
            ),
        ),
        report_features=10,
    )


def parse_layers(text: str) -> tuple[int, ...] | str:
    """'all', '0-5' or '1,3,5' (ranges and lists may mix: '0-2,7')."""
    text = text.strip()
    if text == "all":
        return "all"
    layers: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, sep, hi = part.partition("-")
            layers += range(int(lo), int(hi) + 1) if sep else [int(lo)]
    except ValueError:
        raise CoactError(f"cannot read layers {text!r}: write 'all', '0-5' or '1,3,5'") from None
    if not layers:
        raise CoactError(f"no layers in {text!r}: write 'all', '0-5' or '1,3,5'")
    return tuple(sorted(set(layers)))


def layer_sites(layer: int, block: bool) -> list[Site]:
    """The sites a layer's stages read: the MLP's input and output, and with `block` also
    attention's input and output and the next residual stream."""
    sites = [Site("mlp_resid", layer), Site("mlp_out", layer)]
    if block:
        sites += [s for s in block_sites(layer).values() if s not in sites]
    return sites


@dataclass
class _Shared:
    """What the layers of a run share: SAEs, their evaluations, the code store."""

    layout: RunLayout
    saes: dict[Site, Sae]
    given: dict[Site, str | None]
    reports: dict[Site, SaeReport]
    store: CodeStore
    code_part: Contexts
    trained_now: list[str]
    evaluated_now: list[str]
    timings: dict[str, float]


def analyze(config: AnalyzeConfig) -> dict[str, Any]:
    """Run the pipeline and return (and write to summary.json) its headline figures; with
    `layers`, run every one of them (see `analyze_layers`)."""
    if config.layers:
        return analyze_layers(config)
    started = time.perf_counter()
    lm = load_model(config.model, device=config.device, seed=config.seed)
    run_dir = config.resolved_run_dir()
    sites = layer_sites(config.layer, config.block)
    given = {sites[0]: config.sae_in, sites[1]: config.sae_out}
    shared = _prepare(config, lm, sites, given, RunLayout(run_dir, run_dir))
    return _analyze_layer(config, lm, shared, started)


def analyze_layers(config: AnalyzeConfig) -> dict[str, Any]:
    """Every layer of `config.layers` with the block stages, from one set of SAEs and one
    code store in the model run's directory; each layer's results land in `<run>/L<ℓ>/`
    (an ordinary run directory), the per-layer headline in `<run>/layers.parquet`."""
    started = time.perf_counter()
    if config.sae_in or config.sae_out:
        raise CoactError("--sae-in / --sae-out name one layer's SAEs; give them with --layer")
    lm = load_model(config.model, device=config.device, seed=config.seed)
    every = range(lm.adapter.n_layers)
    wanted = every if config.layers == "all" else config.layers or ()
    layers = sorted({int(layer) for layer in wanted})
    if not layers:
        raise CoactError("no layers to analyse")
    config = dataclasses.replace(config, layers=tuple(layers), block=True)
    for layer in layers:
        if not 0 <= layer < lm.adapter.n_layers:
            raise CoactError(
                f"layer {layer} is out of range: the model has {lm.adapter.n_layers} layers "
                f"(0..{lm.adapter.n_layers - 1})"
            )
    model_dir = config.resolved_run_dir()
    sites = list(dict.fromkeys(s for layer in layers for s in layer_sites(layer, True)))
    shared = _prepare(config, lm, sites, dict.fromkeys(sites), RunLayout(model_dir, model_dir))
    # a layer finished with these settings (report included when one is asked for) is
    # read back, not rerun: resuming a long run costs nothing for its finished layers
    done = {
        layer: summary
        for layer, summary in finished_layers(model_dir).items()
        if not config.report or "report" in summary
    }
    per_layer = {}
    for layer in layers:
        if layer in done:
            per_layer[layer] = done[layer]
            continue
        layer_config = dataclasses.replace(
            config, layer=layer, layers=None, run_dir=str(model_dir / f"L{layer}"),
            shared_dir="..",
        )  # fmt: skip
        per_layer[layer] = _analyze_layer(layer_config, lm, shared, time.perf_counter())
        # after every layer, so a run stopped part-way has the table of the finished ones
        atomic_write(model_dir / "layers.parquet", layers_table(per_layer).write_parquet)
    summary: dict[str, Any] = {
        "model": lm.name,
        "layers": layers,
        "run_dir": str(model_dir),
        "tokens": shared.store.n_tokens,
        "saes_trained_now": shared.trained_now,
        "layers_finished_before": sorted(done),  # finished_layers lists only `layers`
        "layer_runs": {str(layer): str(model_dir / f"L{layer}") for layer in layers},
        "timings": {**shared.timings, "total_s": time.perf_counter() - started},
    }
    _write_json(model_dir / "summary.json", summary)
    if config.report:
        from coact.report.model import build_model_report

        summary["report"] = str(build_model_report(model_dir))
        _write_json(model_dir / "summary.json", summary)
    return summary


LAYER_OWN_KEYS = ("layer", "layers", "run_dir", "shared_dir")  # what a layer's config sets


def finished_layers(model_dir: str | Path) -> dict[int, dict[str, Any]]:
    """The summary.json of every layer of a model run that finished with the run's own
    settings, by layer: a layer stopped part-way has none, and one left by a run with other
    settings is not this run's. Layers finished by another process (or an earlier run of
    the same settings) count too, which layers.parquet, written by one process, can miss."""
    model_dir = Path(model_dir)
    config = read_run_config(model_dir)
    settings = {k: v for k, v in config.items() if k not in LAYER_OWN_KEYS}
    found: dict[int, dict[str, Any]] = {}
    for layer in config.get("layers") or []:
        layer_dir = model_dir / f"L{layer}"
        summary, own = layer_dir / "summary.json", layer_dir / "config.json"
        if not (summary.is_file() and own.is_file()):
            continue
        own_settings = json.loads(own.read_text())
        if {k: v for k, v in own_settings.items() if k not in LAYER_OWN_KEYS} == settings:
            found[int(layer)] = json.loads(summary.read_text())
    return found


def layers_table(per_layer: dict[int, dict[str, Any]]) -> pl.DataFrame:
    """One row per layer: the MLP's and attention's linear shares and attention's
    same-position share, each at its own site's calibrated τ and at the seed's τ (calibrated
    τ differ between sites and layers, so only the seed's compares them on one threshold), and the
    composition's fit, source shares and decoded checks."""
    rows = []
    for layer, s in sorted(per_layer.items()):
        block = s.get("block") or {}
        mlp = (s.get("calibrate") or {}).get("linear_calibrated") or s.get("connect") or {}
        attention = block.get("attention") or {}
        scored = block.get("positions") or {}
        causal = block.get("attention_causal") or {}
        composed = block.get("composition") or {}
        decoded = composed.get("decoded_fvu") or {}
        shares = {
            Site.parse(site).kind: v
            for site, v in (composed.get("variance_share_ls") or {}).items()
        }
        run = Path(s["run_dir"])
        rows.append(
            {
                "layer": layer,
                "mlp_tau": (s.get("calibrate") or {}).get("tau"),
                "attention_tau": block.get("tau"),
                "form": block.get("form"),
                "mlp_percent_linear": mlp.get("percent_linear"),
                "attention_percent_linear": attention.get("percent_linear"),
                "attention_percent_same_position": scored.get("percent_same_position"),
                "attention_percent_context_free": (causal.get("resample") or {}).get(
                    "percent_context_free"
                ),
                "attention_percent_self_only": (causal.get("self_only") or {}).get(
                    "percent_self_only"
                ),
                "mlp_percent_linear_seed_tau": _share_at_seed_tau(
                    run / "connect" / "features.parquet", "d_seed"
                ),
                "attention_percent_linear_seed_tau": _share_at_seed_tau(
                    run / "attention" / "connect" / "features.parquet", "d_seed"
                ),
                "attention_percent_same_position_seed_tau": _share_at_seed_tau(
                    run / "attention" / "positions" / "positions.parquet", "gain_seed"
                ),
                **_fit_quality("mlp", s.get("connect") or {}),
                **_fit_quality("attention", attention),
                "attention_nmse_same_position": scored.get("heldout_nmse_same"),
                "attention_nmse_with_context": scored.get("heldout_nmse_context"),
                "composition_r2_sparse": composed.get("r2_sparse"),
                "composition_r2_ls": composed.get("r2_ls"),
                **{f"composition_share_{k}": v for k, v in shares.items()},
                **{f"decoded_fvu_{k}": v for k, v in decoded.items()},
            }
        )
    return pl.DataFrame(rows)


def _fit_quality(name: str, fitted: dict[str, Any]) -> dict[str, float | None]:
    """How much the connectors explain, and how often the mlp beats least squares beyond
    d's noise floor: a linear share means little where neither fits or the mlp never wins."""
    alive, gain = fitted.get("alive"), fitted.get("mlp_gain_beyond_noise")
    return {
        f"{name}_nmse_linear": fitted.get("heldout_nmse_linear"),
        f"{name}_nmse_mlp": fitted.get("heldout_nmse_mlp"),
        f"{name}_percent_mlp_gain": 100.0 * gain / alive if alive and gain is not None else None,
    }


def _share_at_seed_tau(table: Path, column: str) -> float | None:
    """Percent of alive features whose `column` (d or the position gain, seed form) is at
    most the seed's τ; None when the table is missing."""
    if not table.is_file():
        return None
    values = pl.read_parquet(table, columns=["status", column])
    alive = values.filter(pl.col("status") != "dead")[column].to_numpy()
    return 100.0 * float((alive <= SEED_TAU).mean()) if len(alive) else None


def _prepare(
    config: AnalyzeConfig,
    lm: LoadedModel,
    sites: Sequence[Site],
    given: dict[Site, str | None],
    layout: RunLayout,
) -> _Shared:
    """SAEs (given, reused or trained), their evaluations and the code store of `sites`.
    For parallel-residual models mlp_resid[ℓ] is resid_pre[ℓ]: both names get one SAE."""
    for site in sites:
        lm.adapter.check(site)
    alias = {
        s: Site("resid_pre", s.layer)
        for s in sites
        if s.kind == "mlp_resid" and lm.adapter.parallel and Site("resid_pre", s.layer) in sites
    }
    saes: dict[Site, Sae] = {}
    for site, source in given.items():
        if source is not None:
            saes[site] = load_sae(source, device=config.device)
            check_sae_fits(saes[site], site, lm.adapter.d_model, lm.adapter.mlp_resid_kind())
    to_train = [s for s in sites if s not in saes and s not in alias]

    train_part, code_part = run_contexts(config, lm)
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(layout.run_dir / "config.json", asdict(config))
    timings: dict[str, float] = {}
    trained_now: list[str] = []
    if to_train:
        t0 = time.perf_counter()
        trained, trained_now = _trained_saes(lm, train_part, to_train, config, layout.sae)
        saes.update(trained)
        timings["train_saes_s"] = time.perf_counter() - t0
    for site, same in alias.items():
        if site not in saes:
            saes[site] = saes[same]

    t0 = time.perf_counter()
    eval_tokens = code_part.tokens[: config.eval_contexts]
    reports, evaluated_now = _evaluations(lm, saes, eval_tokens, layout.sae_eval)
    timings["evaluate_saes_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ordered = {site: saes[site] for site in sites}
    store = collect_codes(lm, code_part, ordered, layout.codes, config.collect)
    timings["collect_s"] = time.perf_counter() - t0
    return _Shared(
        layout, saes, given, reports, store, code_part, trained_now, evaluated_now, timings
    )


def _analyze_layer(
    config: AnalyzeConfig, lm: LoadedModel, shared: _Shared, started: float
) -> dict[str, Any]:
    """The stages of one layer on the shared codes, its summary.json and its report."""
    run_dir = config.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.shared_dir is not None:  # a model run's layer: its own config names the share
        _write_json(run_dir / "config.json", asdict(config))
    store, saes, code_part = shared.store, shared.saes, shared.code_part
    sites = layer_sites(config.layer, config.block)
    timings = dict(shared.timings) if config.shared_dir is None else {}
    decode = lambda ids: str(lm.tokenizer.decode(ids))  # noqa: E731

    connections = None
    if config.connect:
        t0 = time.perf_counter()
        settings = dataclasses.replace(
            config.connect_settings,
            in_site=str(sites[0]),
            out_site=str(sites[1]),
            seed=config.seed,
            device=config.device,
        )
        connections = connect(store, settings, run_dir / "connect", decode=decode)
        connections.pop("key", None)
        timings["connect_s"] = time.perf_counter() - t0
    calibration = None
    if config.connect and config.calibrate:
        t0 = time.perf_counter()
        calibration = run_calibration(config, lm, saes, code_part, store, run_dir)
        timings["calibrate_s"] = time.perf_counter() - t0
    labelled = None
    if config.connect and config.labels:
        t0 = time.perf_counter()
        settings_l = dataclasses.replace(
            config.labels_settings,
            in_site=str(sites[0]),
            out_site=str(sites[1]),
            seed=config.seed,
            device=config.device,
        )
        labelled = label_run(store, run_dir / "connect", run_dir / "logic", settings_l)
        labelled.pop("key", None)
        labelled.pop("config", None)
        timings["logic_s"] = time.perf_counter() - t0
    block = None
    if config.block:
        t0 = time.perf_counter()
        block = analyze_block(
            lm,
            saes,
            store,
            calibration_tokens(
                code_part, store, dataclasses.replace(config.connect_settings, seed=config.seed)
            ),
            config.layer,
            run_dir,
            config.block_settings,
            linearity=_calibrated_linearity(config, calibration),
            connect_settings=config.connect_settings,
            calibrate_settings=config.calibrate_settings if config.calibrate else None,
            seed=config.seed,
            device=config.device,
            decode=decode,
        )
        timings["block_s"] = time.perf_counter() - t0
    flagged = None
    if config.outliers:
        t0 = time.perf_counter()
        by_slug = {site.slug: saes[site] for site in sites}
        settings_o = dataclasses.replace(
            config.outlier_settings, sites=tuple(site.slug for site in sites)
        )
        flagged = outliers(store, run_dir / "outliers", settings_o, decode=decode, saes=by_slug)
        flagged = {k: v for k, v in flagged.items() if k not in ("key", "config")}
        timings["outliers_s"] = time.perf_counter() - t0
    ablated = None
    if config.ablate and config.report and config.connect:
        t0 = time.perf_counter()
        wanted = report_ablation_targets(run_dir, config.report_features, config.ablation_settings)
        ablated = ablate(
            lm,
            saes,
            store,
            wanted,
            run_dir / "evidence",
            config.ablation_settings,
            tokens=code_part.tokens,
            decode=decode,
        )
        ablated = {k: v for k, v in ablated.items() if k not in ("key", "config")}
        timings["ablate_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started

    summary = {
        "model": lm.name,
        "layer": config.layer,
        "corpus": config.corpus,
        "run_dir": str(run_dir),
        "tokens": store.n_tokens,
        "saes_trained_now": [s for s in shared.trained_now if Site.parse(s) in sites],
        "saes_evaluated_now": [s for s in shared.evaluated_now if Site.parse(s) in sites],
        "sites": {
            str(site): {
                "sae": shared.given.get(site) or str(shared.layout.sae / site.slug),
                "width": saes[site].width,
                **shared.reports[site].to_dict(),
            }
            for site in sites
        },
        "codes": {
            "directory": str(store.directory),
            "bytes_per_token": {site.slug: store.bytes_per_token(site.slug) for site in sites},
        },
        "connect": connections,
        "calibrate": calibration,
        "logic": labelled,
        "block": block,
        "outliers": flagged,
        "ablation": ablated,
        "timings": timings,
    }
    _write_json(run_dir / "summary.json", summary)
    if config.report:  # last: the report reads summary.json and every stage's tables
        from coact.report.build import build_report

        t0 = time.perf_counter()
        index = build_report(run_dir, decode=decode, features=config.report_features)
        summary["report"] = str(index)
        timings["report_s"] = time.perf_counter() - t0
        _write_json(run_dir / "summary.json", summary)
    return summary


def _calibrated_linearity(
    config: AnalyzeConfig, calibration: dict[str, Any] | None
) -> LinearityConfig:
    """The MLP's calibrated τ in its form, else the connect stage's (the seed's) τ."""
    base = config.connect_settings.linearity
    if calibration is None or calibration.get("tau") is None:
        return base
    form = calibration.get("form", base.form)
    return dataclasses.replace(base, tau=float(calibration["tau"]), form=form)


def run_contexts(config: AnalyzeConfig, lm: LoadedModel) -> tuple[Contexts, Contexts]:
    """(contexts that train the SAEs, contexts whose codes are stored): the same corpus
    slices on every call, so a later stage (calibration) can rebuild them."""
    per_context = config.ctx_len - 1
    n_code_ctx = -(-config.tokens // per_context)
    training = config.sae_in is None or config.sae_out is None
    n_train_ctx = -(-config.sae_tokens // per_context) if training else 0
    contexts = build_contexts(
        CorpusConfig(
            source=config.corpus,
            ctx_len=config.ctx_len,
            n_tokens=(n_train_ctx + n_code_ctx) * per_context,
            seed=config.seed,
        ),
        lm.tokenizer,
    )
    if contexts.tokens.shape[0] <= n_train_ctx:
        raise CoactError(
            f"corpus {config.corpus!r} gave {contexts.n_tokens} tokens, all needed to train the "
            f"SAEs ({config.sae_tokens}); lower --sae-tokens or use a larger corpus"
        )
    return _slice(contexts, 0, n_train_ctx), _slice(contexts, n_train_ctx, contexts.tokens.shape[0])


def _from_dict(cls: Any, data: dict[str, Any]) -> Any:
    """A (nested) dataclass from its asdict() form; lists become tuples where typed so."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _from_dict(hint, value)
        elif isinstance(value, list) and (
            typing.get_origin(hint) is tuple
            or any(typing.get_origin(a) is tuple for a in typing.get_args(hint))
        ):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def calibration_tokens(code_part: Contexts, store: CodeStore, connect: ConnectConfig) -> Any:
    """The contexts the connectors held out (the same split `connect` used), as tokens."""
    groups = store.read_tokens()["context"].to_numpy()
    _, held = split_rows(len(groups), connect.heldout_fraction, connect.seed, groups)
    return code_part.tokens[np.unique(groups[held])]


def run_calibration(
    config: AnalyzeConfig,
    lm: LoadedModel,
    saes: dict[Site, Sae],
    code_part: Contexts,
    store: CodeStore,
    run_dir: Path,
) -> dict[str, Any]:
    """Calibrate τ on the connectors' held-out contexts with the run's two SAEs."""
    connect_settings = dataclasses.replace(config.connect_settings, seed=config.seed)
    tokens = calibration_tokens(code_part, store, connect_settings)
    settings = dataclasses.replace(config.calibrate_settings, layer=config.layer, seed=config.seed)
    sae_in, sae_out = saes[Site("mlp_resid", config.layer)], saes[Site("mlp_out", config.layer)]
    return calibrate(
        lm, sae_in, sae_out, tokens, run_dir / "connect", run_dir / "calibrate", settings
    )


def report_ablation_targets(
    run_dir: Path, features: int | list[int], settings: AblationConfig
) -> dict[tuple[str, int], int]:
    """(site slug, feature) → top contexts to ablate: the output features the report gives
    a page (the `features` most interesting ones, or these ids) and their top inputs."""
    from coact.report.select import ablation_targets, interesting_features
    from coact.rundir.read import load_run

    data = load_run(run_dir)
    if isinstance(features, int):
        if data.features is None:
            raise CoactError(f"{run_dir} has no linearity table: run `coact connect` first")
        outputs = list(interesting_features(data, features))
    else:
        outputs = [int(j) for j in features]
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
) -> dict[str, Any]:
    """`coact ablate`: context ablation of a finished run's report features (or the given
    output features) and their top inputs, into <run>/evidence/."""
    from coact.evidence.outliers import run_saes

    settings = settings or AblationConfig()
    run = Path(run_dir)
    config = AnalyzeConfig.from_dict(read_run_config(run))
    wanted = report_ablation_targets(run, features, settings)
    lm = load_model(config.model, device=device, seed=config.seed)
    store = CodeStore.open(RunLayout.of(run).codes)
    found = run_saes(run, sorted({slug for slug, _ in wanted}), device=device)
    saes = {Site.parse(slug): sae for slug, sae in found.items()}
    decode = lambda ids: str(lm.tokenizer.decode(ids))  # noqa: E731
    return ablate(lm, saes, store, wanted, run / "evidence", settings, decode=decode)


def outliers_run(
    run_dir: str | Path, settings: OutlierConfig | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """`coact outliers`: flag a finished run's artefact features into <run>/outliers/."""
    from coact.evidence.outliers import run_saes
    from coact.report.evidence import default_decode

    run = Path(run_dir)
    config = AnalyzeConfig.from_dict(read_run_config(run))
    store = CodeStore.open(RunLayout.of(run).codes)
    slugs = [site.slug for site in layer_sites(config.layer, config.block)]
    settings = dataclasses.replace(settings or OutlierConfig(), sites=tuple(slugs))
    top = run / "connect" / "top_tokens.parquet"
    decode = default_decode(run, pl.read_parquet(top) if top.is_file() else None)
    saes = run_saes(run, slugs, device=device)
    return outliers(store, run / "outliers", settings, decode=decode, saes=saes)


def _slice(contexts: Contexts, lo: int, hi: int) -> Contexts:
    digest = hashlib.sha256(f"{contexts.fingerprint}:{lo}:{hi}".encode()).hexdigest()
    return dataclasses.replace(
        contexts,
        tokens=contexts.tokens[lo:hi],
        doc_ids=contexts.doc_ids[lo:hi],
        fingerprint=digest,
    )


def _evaluations(
    lm: LoadedModel, saes: dict[Site, Sae], tokens: Any, directory: Path
) -> tuple[dict[Site, SaeReport], list[str]]:
    """Each SAE's report, reused when the model, the SAE's weights and the evaluation
    tokens are those of a finished earlier evaluation (its file carries their key)."""
    reports: dict[Site, SaeReport] = {}
    evaluated: list[str] = []
    eval_config = SaeEvalConfig()
    token_digest = hashlib.sha256(np.ascontiguousarray(np.asarray(tokens)).tobytes()).hexdigest()
    keys: dict[Site, str] = {}
    for site, sae in saes.items():
        keys[site] = hashlib.sha256(
            json.dumps(
                [lm.fingerprint(), sae_fingerprint(sae), token_digest, str(site),
                 asdict(eval_config)], sort_keys=True,
            ).encode()
        ).hexdigest()  # fmt: skip
        path = directory / f"{site.slug}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == keys[site]:
                reports[site] = SaeReport(**saved["report"])
    # the rest together, a group at a time (each one's report is saved as it lands)
    todo = [site for site in saes if site not in reports]
    if todo:
        directory.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), EVAL_GROUP):
        group = todo[start : start + EVAL_GROUP]
        for site, report in evaluate_saes(
            lm, {s: saes[s] for s in group}, tokens, eval_config
        ).items():
            reports[site] = report
            saved_report = {k: v for k, v in report.to_dict().items() if k != "ce_recovered"}
            _write_json(
                directory / f"{site.slug}.json", {"key": keys[site], "report": saved_report}
            )
            evaluated.append(str(site))
    return reports, evaluated


def _trained_saes(
    lm: LoadedModel, contexts: Contexts, sites: list[Site], config: AnalyzeConfig, directory: Path
) -> tuple[dict[Site, Sae], list[str]]:
    """Reuse SAEs an earlier run trained with the same recipe; train the rest together, at
    most `config.sae_group` per pass over the model (each is saved when its pass ends)."""
    recipe = {
        "model": lm.fingerprint(),
        "corpus": contexts.fingerprint,
        "train": asdict(config.sae),
    }
    recipe_id = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    found: dict[Site, Sae] = {}
    for site in sites:
        path = directory / site.slug
        if (path / "cfg.json").is_file():
            sae = load_sae(path, device=config.device)
            if sae.metadata.get("recipe") == recipe_id:
                found[site] = sae
    missing = [site for site in sites if site not in found]
    group = max(1, config.sae_group)
    for start in range(0, len(missing), group):
        part = missing[start : start + group]
        for site, (sae, log) in train_saes(lm, contexts.tokens, part, config.sae).items():
            sae.metadata.update({"recipe": recipe_id, "final_fvu": log.fvu[-1]})
            save_saelens(sae, directory / site.slug)
            _write_json(directory / site.slug / "train_log.json", asdict(log))
            found[site] = sae
    return found, [str(site) for site in missing]


def _write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, default=str)
    atomic_write(path, lambda tmp: tmp.write_text(text))
