"""The logic stage end to end: planted circuits → code store → connect → label_run."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from coact.cli import app
from coact.codes.store import CodeStore
from coact.connectors.config import MLP_FIT, ConnectConfig
from coact.connectors.exact import LassoPathConfig
from coact.connectors.stage import connect
from coact.errors import CoactError
from coact.logic.planted import PlantedConfig, planted_circuits, score_labels
from coact.logic.stage import SAE_CONNECTOR, LabelsConfig, describe, label_run
from coact.models.sites import SitePair
from coact.report.charts import logic as logic_charts
from coact.report.charts.base import save
from coact.report.text import format_logic

pytestmark = pytest.mark.usefixtures("one_thread")
PLANT = PlantedConfig(n_tokens=30_000, n_inputs=96, seed=3)
PAIR = SitePair.of("mlp_resid[1]", "mlp_out[1]")
SETTINGS = LabelsConfig(sae_connector=replace(SAE_CONNECTOR, hidden=32, epochs=1), progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    circuits = planted_circuits(PLANT)
    root = tmp_path_factory.mktemp("run")
    n_in, n_out = circuits.x.shape[1], circuits.y.shape[1]
    writer = CodeStore.open_for_writing(
        root / "codes", fingerprint="planted", sites={"mlp_resid.1": n_in, "mlp_out.1": n_out}
    )
    rows = np.arange(circuits.x.shape[0])
    tokens = {"context": circuits.context_ids, "position": rows % PLANT.context_length + 1,
              "token_id": rows % 11, "doc": circuits.context_ids}  # fmt: skip
    writer.write_shard(0, tokens, {"mlp_resid.1": circuits.x, "mlp_out.1": circuits.y})
    store = CodeStore.open(root / "codes")
    linking = ConnectConfig(
        path=LassoPathConfig(n_alphas=12), stability=False,
        mlp=replace(MLP_FIT, hidden=16, epochs=1),
        progress=False,
    )  # fmt: skip
    connect(store, PAIR, root / "connect", linking)
    summary = label_run(store, PAIR, root / "connect", root / "logic", SETTINGS)
    return circuits, store, root, summary


def test_planted_labels_through_the_stage(run) -> None:
    circuits, _, root, summary = run
    features = pl.read_parquet(root / "logic" / "features.parquet")
    score = score_labels(circuits, features)
    assert score.accuracy >= 0.95 and score.f1 >= 0.95
    truth = dict(circuits.truth.select("output", "label").iter_rows())
    assert summary.counts["DEAD"] == sum(v == "DEAD" for v in truth.values())
    assert sum(summary.counts.values()) == circuits.y.shape[1]
    for name in ("truth_tables", "clusters", "hidden"):
        assert (root / "logic" / f"{name}.parquet").is_file()
    hidden = pl.read_parquet(root / "logic" / "hidden.parquet")
    assert hidden.height > 0 and hidden["outputs"].list.len().max() == SETTINGS.sae_outputs
    # the report draws the most confident feature's truth table from the stage's tables
    tables = pl.read_parquet(root / "logic" / "truth_tables.parquet")
    for label in summary.most_confident:
        best = features.filter(pl.col("label") == label).sort("confidence", descending=True)
        if best.height and best["inputs"].list.len()[0] >= 1:
            j = int(best["output"][0])
            chart = logic_charts.truth_table(tables.filter(pl.col("output") == j), label)
            assert save(chart, root / f"truth-{j}")[1].stat().st_size > 1_000
    assert json.loads((root / "logic" / "logic.json").read_text())["counts"] == summary.counts


def test_describe_reads_like_the_seed() -> None:
    row = {"output": 505, "label": "A-AND-NOT-B", "inputs": [12, 40], "negated": 40,
           "confidence": 0.93}  # fmt: skip
    assert describe(row) == "out 505 = in 12 AND NOT in 40 (confidence 0.93)"
    row = {"output": 30, "label": "OR", "inputs": [1, 2, 3], "negated": None, "confidence": 1.0}
    assert describe(row) == "out 30 = in 1 OR in 2 OR in 3 (confidence 1.00)"


def test_a_finished_result_is_reused_and_the_cli_prints_it(run, tmp_path) -> None:
    _, store, root, summary = run
    stamp = (root / "logic" / "features.parquet").stat().st_mtime_ns
    assert label_run(store, PAIR, root / "connect", root / "logic", SETTINGS) == summary
    assert (root / "logic" / "features.parquet").stat().st_mtime_ns == stamp
    with pytest.raises(CoactError, match="no connections"):
        label_run(store, PAIR, tmp_path / "nothing", tmp_path / "logic", SETTINGS)
    bad = CliRunner().invoke(app, ["logic", str(root), "--max-inputs", "7"])
    assert bad.exit_code != 0


def test_the_jacobian_s_connections_join_the_candidates(run, tmp_path) -> None:
    """A jacobian table naming each planted output's true inputs: the stage reads it, and
    the inputs it labels carry (nearly) all of that attribution; coverage is summarised."""
    circuits, store, root, _ = run
    rows = [(o, i) for o, inputs in circuits.true_inputs().items() for i in sorted(inputs)]
    table = pl.DataFrame(
        {"output": [o for o, _ in rows], "input": [i for _, i in rows],
         "n_tokens": [50] * len(rows), "attribution_mean": [1.0] * len(rows)},
    )  # fmt: skip
    (tmp_path / "jacobian").mkdir()
    table.write_parquet(tmp_path / "jacobian" / "connections.parquet")
    settings = replace(SETTINGS, sae_connector=None)
    result = label_run(store, PAIR, root / "connect", tmp_path / "logic", settings,
                       jacobian_dir=tmp_path / "jacobian")  # fmt: skip
    assert result.jacobian_inputs and result.coverage is not None
    features = pl.read_parquet(tmp_path / "logic" / "features.parquet")
    labelled = features.filter(pl.col("label").is_in(["OR", "AND", "WEIGHTED-SUM"]))
    assert labelled["jacobian_share"].median() == pytest.approx(1.0)
    alive = features.filter(pl.col("label") != "DEAD")
    assert result.coverage.alive == alive.height
    explained = alive.filter((pl.col("label") != "UNEXPLAINED") & (pl.col("coverage") >= 0.8))
    assert result.coverage.explained == explained.height
    assert sum(result.coverage.inputs_needed_histogram.values()) == alive.height
    assert (tmp_path / "logic" / "supernodes.parquet").is_file()
    assert sum(result.kinds.values()) == result.counts["NONLINEAR"] > 0
    text = format_logic(result)
    assert f"{result.coverage.explained:,} of {result.coverage.alive:,}" in text
