"""`labels`: name the computation behind every feature of a layer (the logic stage).

Targets are the output features (their inputs: their connections in `connect`'s sparse
linear connector, completed and pruned from co-activation counts; see `coact.logic`) and,
optionally, the hidden latents of an sae-connector fitted here (inputs: their strongest
first-layer weights; outputs: their strongest second-layer weights). Everything lands in
`<run>/logic/`:

    features.parquet       per output feature: label, confidence, rule, inputs, negated
                           input, counts, mutual information, clusters
    truth_tables.parquet   per output feature and input pattern: tokens, P(active), mean
    clusters.parquet       co-activation modes where it fires and where it is suppressed
    hidden.parquet         the same per hidden latent of the sae-connector, with outputs
    charts/                for the most confident feature of each label: co-activation
                           scatter, truth-table heat map and co-activation modes (PNG +
                           vega-lite)
    logic.json             the headline (written last): counts per label, the most
                           confident features per label
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.codes.store import CodeStore
from coact.connectors.train import ConnectorTrainConfig, train_connector
from coact.errors import CoactError
from coact.logic.config import LABELS, LogicConfig
from coact.logic.hidden import hidden_targets
from coact.logic.layer import label_layer
from coact.models.sites import Site
from coact.report import charts
from coact.rundir.files import atomic_write, finished_result

RESULT_VERSION = 1


@dataclass(frozen=True)
class LabelsConfig:
    in_site: str  # e.g. "mlp_resid[3]"
    out_site: str  # e.g. "mlp_out[3]"
    logic: LogicConfig = field(default_factory=LogicConfig)
    sae_connector: bool = True  # also fit an sae-connector and label its hidden latents
    sae_hidden: int = 512
    sae_alpha_hidden: float = 1e-3  # L1 on the hidden activation
    sae_epochs: int = 3
    sae_outputs: int = 3  # strongest second-layer weights listed per hidden latent
    top_per_label: int = 5  # most confident features per label in the headline
    charts_per_label: int = 1
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


def label_run(
    store: CodeStore | str | Path,
    connect_dir: str | Path,
    out_dir: str | Path,
    config: LabelsConfig,
) -> dict[str, Any]:
    """Label every output feature (and hidden latent); write the tables; return the headline."""
    store = store if isinstance(store, CodeStore) else CodeStore.open(store)
    connect_dir, out_dir = Path(connect_dir), Path(out_dir)
    weights_path = connect_dir / "weights.parquet"
    if not weights_path.is_file():
        raise CoactError(f"no connections at {weights_path}; run `coact connect` first")
    in_slug, out_slug = Site.parse(config.in_site).slug, Site.parse(config.out_site).slug
    for slug in (in_slug, out_slug):
        if slug not in store.sites:
            raise CoactError(f"site {slug} is not in the code store {store.directory}")
    key = _key(store, weights_path, config)
    done = out_dir / "logic.json"
    if (previous := finished_result(done, key)) is not None:
        return previous
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    clock = time.perf_counter()
    x, y = store.read_site(in_slug), store.read_site(out_slug)
    weights = pl.read_parquet(weights_path)
    labels = label_layer(x, y, weights, config.logic, progress=config.progress)
    timings["label_outputs_s"] = time.perf_counter() - clock
    for name in ("features", "truth_tables", "clusters"):
        frame = getattr(labels, name)
        atomic_write(out_dir / f"{name}.parquet", frame.write_parquet)

    hidden_counts = None
    if config.sae_connector:
        clock = time.perf_counter()
        hidden = _hidden_labels(store, x, y, config)
        atomic_write(out_dir / "hidden.parquet", hidden.write_parquet)
        hidden_counts = _counts(hidden)
        timings["label_hidden_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    drawn = _charts(labels, x, y, out_dir / "charts", config)
    timings["charts_s"] = time.perf_counter() - clock
    summary = {
        "key": key,
        "in_site": config.in_site,
        "out_site": config.out_site,
        "directory": str(out_dir),
        "tokens": int(x.shape[0]),
        "counts": _counts(labels.features),
        "hidden_counts": hidden_counts,
        "most_confident": _most_confident(labels.features, config.top_per_label),
        "charts": drawn,
        "config": asdict(config),
        "timings": timings,
    }
    atomic_write(done, lambda tmp: tmp.write_text(json.dumps(summary, indent=2, default=str)))
    return summary


def _key(store: CodeStore, weights: Path, config: LabelsConfig) -> str:
    settings = {k: v for k, v in asdict(config).items() if k != "progress"}
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    text = json.dumps(
        [store.fingerprint, digest, settings, RESULT_VERSION], sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _counts(features: pl.DataFrame) -> dict[str, int]:
    counts = dict(features.group_by("label").len().iter_rows())
    return {label: int(counts.get(label, 0)) for label in LABELS}


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
    fit = train_connector(
        x,
        y,
        ConnectorTrainConfig(
            family="sae-connector",
            hidden=config.sae_hidden,
            alpha_hidden=config.sae_alpha_hidden,
            epochs=config.sae_epochs,
            seed=config.seed,
            device=config.device,
            progress=config.progress,
        ),
        groups=groups,
    )
    hidden, table = hidden_targets(fit.connector, x)
    alive = np.flatnonzero(np.diff(hidden.tocsc().indptr) > 0)
    labels = label_layer(x, hidden, table, config.logic, outputs=alive, progress=config.progress)
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


def _charts(
    labels: Any, x: sp.csr_matrix, y: sp.csr_matrix, out_dir: Path, config: LabelsConfig
) -> dict[str, list[str]]:
    """Co-activation scatter and truth-table heat map for the most confident features."""
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn: dict[str, list[str]] = {}
    xc, yc = x.tocsc(), y.tocsc()
    for label in LABELS:
        if label == "DEAD":
            continue
        rows = (
            labels.features.filter((pl.col("label") == label) & (pl.col("inputs").list.len() >= 1))
            .sort(["confidence", "n_active"], descending=True)
            .head(config.charts_per_label)
        )
        for row in rows.iter_rows(named=True):
            j, inputs = int(row["output"]), [int(i) for i in row["inputs"]]
            stem = out_dir / f"{label.lower()}-out{j}"
            table = labels.truth_tables.filter(pl.col("output") == j)
            title = describe(row)
            paths = charts.save(
                charts.coactivation(_coactive(xc, yc, inputs, j), inputs, j, title), stem
            )
            paths += charts.save(
                charts.truth_table(table, title), stem.with_name(stem.name + "-truth")
            )
            modes = labels.clusters.filter(pl.col("output") == j)
            if modes.filter(pl.col("cluster") >= 0).height:
                paths += charts.save(
                    charts.cluster_summary(modes, title), stem.with_name(stem.name + "-modes")
                )
            drawn.setdefault(label, []).extend(str(p) for p in paths if p.suffix == ".png")
    return drawn


def _coactive(xc: sp.csc_matrix, yc: sp.csc_matrix, inputs: list[int], j: int) -> pl.DataFrame:
    """Tokens where any input or the target is active: the inputs' and target's values
    (at most 4,000, evenly spaced, so the scatter stays readable)."""
    cols = sp.hstack([xc[:, inputs], yc[:, [j]]]).tocsr()
    rows = np.flatnonzero(np.diff(cols.indptr) > 0)
    if len(rows) > 4000:
        rows = rows[np.linspace(0, len(rows) - 1, 4000).astype(int)]
    dense = cols[rows].toarray()
    data = {f"in {i}": dense[:, k] for k, i in enumerate(inputs)}
    data[f"out {j}"] = dense[:, -1]
    return pl.DataFrame(data)
