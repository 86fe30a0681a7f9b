"""`analyze`: model → corpus → SAEs for the MLP's input and output → feature codes →
connectors and linearity → calibration of τ → logic labels → summary.

Each step reuses what an earlier run of the same configuration left in the run directory
(trained SAEs, finished code shards), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coact.ablation import AblationConfig, ablate
from coact.calibrate import CalibrateConfig, calibrate
from coact.collect import CollectConfig, collect_codes, sae_fingerprint
from coact.connect import ConnectConfig, connect
from coact.connectors.train import split_rows
from coact.corpus import Contexts, CorpusConfig, build_contexts
from coact.errors import CoactError
from coact.files import atomic_write
from coact.labels import LabelsConfig, label_run
from coact.models import EMBEDDED, LoadedModel, load_model
from coact.outliers import OutlierConfig, outliers
from coact.sae.base import Sae
from coact.sae.evaluate import SaeEvalConfig, SaeReport, check_sae_fits, evaluate_sae
from coact.sae.formats import load_sae, save_saelens
from coact.sae.train import SaeTrainConfig, train_saes
from coact.sites import Site
from coact.store import CodeStore


@dataclass(frozen=True)
class AnalyzeConfig:
    model: str = EMBEDDED
    layer: int = 3
    corpus: str = "embedded"
    tokens: int = 100_000  # tokens whose feature codes are stored
    sae_tokens: int = 400_000  # tokens each trained SAE sees (when none is given)
    eval_contexts: int = 32  # held-out contexts for FVE / L0 / CE recovered
    ctx_len: int = 128
    seed: int = 0
    device: str = "cpu"
    run_dir: str | None = None  # default: runs/<model>-L<layer>
    sae_in: str | None = None  # SAE for mlp_resid[layer]; trained when None
    sae_out: str | None = None  # SAE for mlp_out[layer]; trained when None
    sae: SaeTrainConfig = field(default_factory=SaeTrainConfig)
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
    outliers: bool = True  # flag artefact features of both sites (<run>/outliers/)
    outlier_settings: OutlierConfig = field(default_factory=OutlierConfig)
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
        return Path("runs") / f"{slug}-L{self.layer}"


def analyze(config: AnalyzeConfig) -> dict[str, Any]:
    """Run the pipeline and return (and write to summary.json) its headline figures."""
    started = time.perf_counter()
    lm = load_model(config.model, device=config.device, seed=config.seed)
    sites = [Site("mlp_resid", config.layer), Site("mlp_out", config.layer)]
    for site in sites:
        lm.adapter.check(site)
    given = {sites[0]: config.sae_in, sites[1]: config.sae_out}
    saes: dict[Site, Sae] = {}
    for site, source in given.items():
        if source is not None:
            saes[site] = load_sae(source, device=config.device)
            check_sae_fits(saes[site], site, lm.adapter.d_model, lm.adapter.mlp_resid_kind())
    to_train = [site for site in sites if site not in saes]

    train_part, code_part = run_contexts(config, lm)

    run_dir = config.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / "config.json", asdict(config))
    timings: dict[str, float] = {}

    trained_now: list[str] = []
    if to_train:
        t0 = time.perf_counter()
        trained, trained_now = _trained_saes(lm, train_part, to_train, config, run_dir)
        saes.update(trained)
        timings["train_saes_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    eval_tokens = code_part.tokens[: config.eval_contexts]
    reports, evaluated_now = _evaluations(lm, saes, eval_tokens, run_dir)
    timings["evaluate_saes_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    store = collect_codes(lm, code_part, saes, run_dir / "codes", config.collect)
    timings["collect_s"] = time.perf_counter() - t0

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
        decode = lambda ids: str(lm.tokenizer.decode(ids))  # noqa: E731
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
    flagged = None
    decode = lambda ids: str(lm.tokenizer.decode(ids))  # noqa: E731
    if config.outliers:
        t0 = time.perf_counter()
        by_slug = {site.slug: saes[site] for site in sites}
        flagged = outliers(
            store, run_dir / "outliers", config.outlier_settings, decode=decode, saes=by_slug
        )
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
        "saes_trained_now": trained_now,
        "saes_evaluated_now": evaluated_now,
        "sites": {
            str(site): {
                "sae": given[site] or str(run_dir / "sae" / site.slug),
                "width": saes[site].width,
                **reports[site].to_dict(),
            }
            for site in sites
        },
        "codes": {
            "directory": str(store.directory),
            "bytes_per_token": {slug: store.bytes_per_token(slug) for slug in store.sites},
        },
        "connect": connections,
        "calibrate": calibration,
        "logic": labelled,
        "outliers": flagged,
        "ablation": ablated,
        "timings": timings,
    }
    _write_json(run_dir / "summary.json", summary)
    if config.report:  # last: the report reads summary.json and every stage's tables
        from coact.report import build_report

        t0 = time.perf_counter()
        index = build_report(run_dir, decode=decode, features=config.report_features)
        summary["report"] = str(index)
        timings["report_s"] = time.perf_counter() - t0
        _write_json(run_dir / "summary.json", summary)
    return summary


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
    from coact.report.data import load_run
    from coact.report.select import ablation_targets, interesting_features

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
    from coact.outliers import run_saes

    settings = settings or AblationConfig()
    run = Path(run_dir)
    config = AnalyzeConfig.from_dict(_run_config(run))
    wanted = report_ablation_targets(run, features, settings)
    lm = load_model(config.model, device=device, seed=config.seed)
    store = CodeStore.open(run / "codes")
    found = run_saes(run, sorted({slug for slug, _ in wanted}), device=device)
    saes = {Site.parse(slug): sae for slug, sae in found.items()}
    decode = lambda ids: str(lm.tokenizer.decode(ids))  # noqa: E731
    return ablate(lm, saes, store, wanted, run / "evidence", settings, decode=decode)


def outliers_run(
    run_dir: str | Path, settings: OutlierConfig | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """`coact outliers`: flag a finished run's artefact features into <run>/outliers/."""
    import polars as pl

    from coact.outliers import run_saes
    from coact.report.evidence import default_decode

    settings = settings or OutlierConfig()
    run = Path(run_dir)
    _run_config(run)
    store = CodeStore.open(run / "codes")
    top = run / "connect" / "top_tokens.parquet"
    decode = default_decode(run, pl.read_parquet(top) if top.is_file() else None)
    saes = run_saes(run, list(store.sites), device=device)
    return outliers(store, run / "outliers", settings, decode=decode, saes=saes)


def _run_config(run: Path) -> dict[str, Any]:
    path = run / "config.json"
    if not path.is_file():
        raise CoactError(f"{run} is not a run directory (no config.json); run `coact analyze`")
    return dict(json.loads(path.read_text()))


def _slice(contexts: Contexts, lo: int, hi: int) -> Contexts:
    digest = hashlib.sha256(f"{contexts.fingerprint}:{lo}:{hi}".encode()).hexdigest()
    return dataclasses.replace(
        contexts,
        tokens=contexts.tokens[lo:hi],
        doc_ids=contexts.doc_ids[lo:hi],
        fingerprint=digest,
    )


def _evaluations(
    lm: LoadedModel, saes: dict[Site, Sae], tokens: Any, run_dir: Path
) -> tuple[dict[Site, SaeReport], list[str]]:
    """Each SAE's report, reused when the model, the SAE's weights and the evaluation
    tokens are those of a finished earlier evaluation (its file carries their key)."""
    reports: dict[Site, SaeReport] = {}
    evaluated: list[str] = []
    eval_config = SaeEvalConfig()
    token_digest = hashlib.sha256(np.ascontiguousarray(np.asarray(tokens)).tobytes()).hexdigest()
    for site, sae in saes.items():
        key = hashlib.sha256(
            json.dumps(
                [lm.fingerprint(), sae_fingerprint(sae), token_digest, str(site),
                 asdict(eval_config)], sort_keys=True,
            ).encode()
        ).hexdigest()  # fmt: skip
        path = run_dir / "sae_eval" / f"{site.slug}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                reports[site] = SaeReport(**saved["report"])
                continue
        reports[site] = evaluate_sae(lm, sae, site, tokens, eval_config)
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {k: v for k, v in reports[site].to_dict().items() if k != "ce_recovered"}
        _write_json(path, {"key": key, "report": report})
        evaluated.append(str(site))
    return reports, evaluated


def _trained_saes(
    lm: LoadedModel, contexts: Contexts, sites: list[Site], config: AnalyzeConfig, run_dir: Path
) -> tuple[dict[Site, Sae], list[str]]:
    """Reuse SAEs an earlier run trained with the same recipe; train the rest together."""
    recipe = {
        "model": lm.fingerprint(),
        "corpus": contexts.fingerprint,
        "train": asdict(config.sae),
    }
    recipe_id = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    found: dict[Site, Sae] = {}
    for site in sites:
        path = run_dir / "sae" / site.slug
        if (path / "cfg.json").is_file():
            sae = load_sae(path, device=config.device)
            if sae.metadata.get("recipe") == recipe_id:
                found[site] = sae
    missing = [site for site in sites if site not in found]
    if missing:
        for site, (sae, log) in train_saes(lm, contexts.tokens, missing, config.sae).items():
            sae.metadata.update({"recipe": recipe_id, "final_fvu": log.fvu[-1]})
            save_saelens(sae, run_dir / "sae" / site.slug)
            _write_json(run_dir / "sae" / site.slug / "train_log.json", asdict(log))
            found[site] = sae
    return found, [str(site) for site in missing]


def _write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, default=str)
    atomic_write(path, lambda tmp: tmp.write_text(text))
