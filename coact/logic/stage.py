"""`labels`: name the computation behind every feature of a layer (the logic stage).

Targets are the output features (their inputs: their connections in `connect`'s sparse
linear connector, completed and pruned from co-activation counts; see `coact.logic`) and,
optionally, the hidden latents of an sae-connector fitted here (inputs: their strongest
first-layer weights; outputs: their strongest second-layer weights). Everything lands in
`<run>/logic/`:

    features.parquet       per output feature: label (and NONLINEAR kind), confidence, rule,
                           inputs and how each was found, negated input, coverage, held-out
                           AUC, inputs needed for `coverage_target`, counts, mutual
                           information, clusters
    truth_tables.parquet   per output feature and input pattern: tokens, P(active), mean
    clusters.parquet       co-activation modes where it fires and where it is suppressed
    supernodes.parquet     groups of features sharing inputs and computation
    hidden.parquet         the same per hidden latent of the sae-connector, with outputs
    logic.json             the headline (`LogicResult`, written last): counts per label,
                           the most confident features per label
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.codes.store import CodeStore
from coact.connectors.train import ConnectorTrainConfig, train_connector
from coact.errors import CoactError
from coact.logic.config import LABELS, NONLINEAR_KINDS, LogicConfig
from coact.logic.coverage import CoverageSummary
from coact.logic.hidden import hidden_targets
from coact.logic.layer import label_layer
from coact.logic.supernodes import SupernodeConfig, supernodes
from coact.models.sites import SitePair
from coact.rundir.files import atomic_write
from coact.rundir.layout import ConnectFiles, JacobianFiles, LogicFiles
from coact.rundir.results import Result, Timings, pair_head, result_key
from coact.settings import setting

RESULT_VERSION = 3


SAE_CONNECTOR = ConnectorTrainConfig(
    family="sae-connector", hidden=512, alpha_hidden=1e-3, epochs=3
)


@dataclass(frozen=True)
class LabelsConfig:
    logic: LogicConfig = field(default_factory=LogicConfig)
    # an mlp with L1 on its hidden activation; None: none (its seed and device: the stage's)
    sae_connector: ConnectorTrainConfig | None = setting(
        SAE_CONNECTOR, "also fit an sae-connector and label its hidden latents"
    )
    sae_outputs: int = 3  # strongest second-layer weights listed per hidden latent
    supernodes: SupernodeConfig = field(default_factory=SupernodeConfig)
    top_per_label: int = 5  # most confident features per label in the headline
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class LogicResult(Result):
    """Features (and sae-connector latents) per label, and the most confident per label."""

    key: str
    in_site: str
    out_site: str
    directory: str
    tokens: int
    counts: dict[str, int]
    hidden_counts: dict[str, int] | None
    most_confident: dict[str, list[str]]  # per label, formulas such as `out 3 = in 1 OR in 2`
    config: LabelsConfig
    timings: dict[str, float]
    coverage: CoverageSummary | None = None  # how much of the features the labels explain
    kinds: dict[str, int] = field(default_factory=dict)  # NONLINEAR features per kind
    supernodes: int = 0  # groups of features sharing inputs and computation
    jacobian_inputs: bool = False  # the Jacobian's connections were among the candidates


def label_run(
    store: CodeStore | str | Path,
    pair: SitePair,
    connect_dir: str | Path,
    out_dir: str | Path,
    config: LabelsConfig = LabelsConfig(),
    jacobian_dir: str | Path | None = None,
) -> LogicResult:
    """Label every output feature (and hidden latent); write the tables; return the headline.
    With `jacobian_dir` holding the jacobian stage's connections, those join the candidates."""
    store = CodeStore.of(store)
    connected, files = ConnectFiles(Path(connect_dir)), LogicFiles(Path(out_dir))
    if not connected.weights.is_file():
        raise CoactError(f"no connections at {connected.weights}; run `coact connect` first")
    store.require(pair.slugs)
    digest = hashlib.sha256(connected.weights.read_bytes()).hexdigest()
    grounded = JacobianFiles(Path(jacobian_dir)).connections if jacobian_dir else None
    grounded = grounded if grounded is not None and grounded.is_file() else None
    inputs = [store.fingerprint, digest, str(pair.in_site), str(pair.out_site)]
    if grounded is not None:
        inputs.append(hashlib.sha256(grounded.read_bytes()).hexdigest())
    key = result_key(inputs, config, RESULT_VERSION)
    if (previous := LogicResult.finished(files, key)) is not None:
        return previous
    files.path.mkdir(parents=True, exist_ok=True)
    timings = Timings()

    with timings.part("label_outputs"):
        x, y = store.read_site(pair.in_site.slug), store.read_site(pair.out_site.slug)
        weights = pl.read_parquet(connected.weights)
        jacobian = pl.read_parquet(grounded) if grounded is not None else None
        contexts = store.read_tokens()["context"].to_numpy()
        labels = label_layer(x, y, weights, config.logic, progress=config.progress,
                             contexts=contexts, jacobian=jacobian)  # fmt: skip
    with timings.part("supernodes"):
        groups = supernodes(labels.features, y, config.supernodes)
    tables = (labels.features, labels.truth_tables, labels.clusters, groups)
    for path, frame in zip(files.tables, tables, strict=True):
        atomic_write(path, frame.write_parquet)

    hidden_counts = None
    if config.sae_connector is not None:
        with timings.part("label_hidden"):
            hidden = _hidden_labels(store, x, y, config)
            atomic_write(files.hidden, hidden.write_parquet)
            hidden_counts = label_counts(hidden)
    result = LogicResult(
        **pair_head(key, pair, files),
        tokens=int(x.shape[0]),
        counts=label_counts(labels.features),
        hidden_counts=hidden_counts,
        most_confident=_most_confident(labels.features, config.top_per_label),
        config=config,
        timings=timings,
        coverage=CoverageSummary.of(labels.features, config.logic),
        kinds=_kinds(labels.features),
        supernodes=groups.height,
        jacobian_inputs=jacobian is not None,
    )
    result.write(files.result)
    return result


def label_counts(features: pl.DataFrame) -> dict[str, int]:
    """Features per label, every label named (0 where none): the headline's counts."""
    counts = dict(features.group_by("label").len().iter_rows())
    return {label: int(counts.get(label, 0)) for label in LABELS}


def _kinds(features: pl.DataFrame) -> dict[str, int]:
    counts = dict(
        features.filter(pl.col("label") == "NONLINEAR").group_by("kind").len().iter_rows()
    )
    return {kind: int(counts.get(kind, 0)) for kind in NONLINEAR_KINDS}


def describe(row: dict[str, Any]) -> str:
    """One line for a labelled feature, e.g. `out 30 = in 12 OR in 40 (confidence 0.98)`."""
    inputs = [f"in {i}" for i in row["inputs"]]
    label = row["label"]
    if label in ("OR", "AND", "WEIGHTED-SUM"):
        joiner = {"OR": " OR ", "AND": " AND ", "WEIGHTED-SUM": " + "}[label]
        text = joiner.join(inputs)
    elif label == "A-AND-NOT-B":
        negated = row.get("negated")
        rest = [f"in {i}" for i in row["inputs"] if i != negated]
        text = " AND ".join(rest) + (f" AND NOT in {negated}" if negated is not None else "")
    elif label == "NONLINEAR":
        text = f"NONLINEAR ({row.get('kind')}) of " + ", ".join(inputs)
    else:
        text = label
    return f"out {row['output']} = {text} (confidence {row['confidence']:.2f})"


def _most_confident(features: pl.DataFrame, k: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for label in LABELS:
        if label == "DEAD":
            continue
        rows = features.filter(pl.col("label") == label).sort(
            ["confidence", "n_active"], descending=True
        )
        out[label] = [describe(r) for r in rows.head(k).iter_rows(named=True)]
    return out


def _hidden_labels(
    store: CodeStore, x: sp.csr_matrix, y: sp.csr_matrix, config: LabelsConfig
) -> pl.DataFrame:
    """Fit an sae-connector (mlp with L1 on its hidden activation) and label its latents."""
    groups = store.read_tokens()["context"].to_numpy()
    assert config.sae_connector is not None
    settings = replace(
        config.sae_connector, seed=config.seed, device=config.device, progress=config.progress
    )
    fit = train_connector(
        x,
        y,
        settings,
        groups=groups,
    )
    hidden, table = hidden_targets(fit.connector, x)
    alive = np.flatnonzero(np.diff(hidden.tocsc().indptr) > 0)
    labels = label_layer(
        x, hidden, table, config.logic, outputs=alive, progress=config.progress, contexts=groups
    )
    assert fit.connector.weight_out is not None
    w2 = fit.connector.weight_out.detach().cpu().numpy()  # n_out × hidden
    top = np.argsort(-np.abs(w2), axis=0)[: config.sae_outputs]  # per hidden unit
    outputs = [top[:, unit].tolist() for unit in labels.features["output"].to_list()]
    out_w = [w2[top[:, unit], unit].tolist() for unit in labels.features["output"].to_list()]
    return labels.features.with_columns(
        pl.Series("outputs", outputs, dtype=pl.List(pl.Int64)),
        pl.Series("output_weights", out_w, dtype=pl.List(pl.Float64)),
        pl.lit(fit.heldout_nmse_total).alias("connector_heldout_nmse"),
    )
