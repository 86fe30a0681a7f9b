"""The connect stage on a planted code store: sparse linear outputs, an AND output, a dead one."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from coact.cli import app
from coact.codes.store import CodeStore
from coact.connectors.config import MLP_FIT, ConnectConfig
from coact.connectors.exact import LassoPathConfig
from coact.connectors.stage import connect
from coact.connectors.train import split_rows
from coact.errors import CoactError
from coact.models.sites import SitePair

N, CTX, N_IN = 8000, 20, 24
SUPPORT = {0: {0: 1.0, 5: 0.8}, 1: {6: 1.5, 7: -0.7, 8: 0.6}, 2: {9: 2.0}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _planted() -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Inputs 0–3 binary-ish and common (p 0.3), 4–23 sparse (p 0.05); outputs 0–2 exact
    sparse linear maps, 3 = ReLU(x0 + x1 − 1) (AND), 4 never active (dead)."""
    rng = np.random.default_rng(0)
    common = (rng.random((N, 4)) < 0.3) * (1 + rng.uniform(-0.05, 0.05, (N, 4)))
    rare = (rng.random((N, N_IN - 4)) < 0.05) * rng.uniform(0.5, 1.5, (N, N_IN - 4))
    x = np.hstack([common, rare])
    y = np.zeros((N, 5))
    for j, terms in SUPPORT.items():
        y[:, j] = sum(w * x[:, k] for k, w in terms.items())
    y[:, 3] = np.maximum(x[:, 0] + x[:, 1] - 1, 0)
    return sp.csr_matrix(x), sp.csr_matrix(y)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> CodeStore:
    x, y = _planted()
    directory = tmp_path_factory.mktemp("codes")
    writer = CodeStore.open_for_writing(
        directory, fingerprint="p", sites={"mlp_resid.1": N_IN, "mlp_out.1": 5}
    )
    for shard in range(2):
        rows = np.arange(shard * N // 2, (shard + 1) * N // 2)
        tokens = {
            "context": rows // CTX,
            "position": rows % CTX + 1,
            "token_id": rows % 7,
            "doc": rows // CTX,
        }
        writer.write_shard(shard, tokens, {"mlp_resid.1": x[rows], "mlp_out.1": y[rows]})
    return CodeStore.open(directory)


PAIR = SitePair.of("mlp_resid[1]", "mlp_out[1]")
CONFIG = ConnectConfig(
    path=LassoPathConfig(n_alphas=12),
    mlp=replace(MLP_FIT, hidden=32, epochs=15, lr=1e-2, batch_tokens=256),
    progress=False,
)


@pytest.fixture(scope="module")
def result(store, tmp_path_factory) -> tuple[object, object]:
    out = tmp_path_factory.mktemp("connect")
    return connect(store, PAIR, out, CONFIG, decode=lambda ids: f"t{ids[0]}"), out


def test_writes_every_table_and_the_headline(result) -> None:
    summary, out = result
    for name in ("sweep", "weights", "features", "top_tokens", "mlp_curve"):
        assert (out / f"{name}.parquet").is_file()
    assert json.loads((out / "connect.json").read_text())["alpha"] == summary.alpha
    sweep = pl.read_parquet(out / "sweep.parquet")
    assert sweep.height == 12 and sweep["chosen"].sum() == 1
    chosen = sweep.filter(pl.col("chosen"))
    assert chosen["on_frontier"].item() and chosen["alpha"].item() == summary.alpha
    assert summary.tokens_train + summary.tokens_heldout == N


def test_linearity_labels_planted_outputs(result) -> None:
    summary, out = result
    features = pl.read_parquet(out / "features.parquet")
    assert features["status"].to_list() == ["linear"] * 3 + ["nonlinear", "dead"]
    assert (summary.share.linear, summary.share.nonlinear, summary.share.dead) == (3, 1, 1)
    assert summary.share.percent_linear == pytest.approx(75.0)  # dead is not in the denominator
    d_fvu = features["d_fvu"].to_numpy()
    assert d_fvu[3] > 0.3 and np.all(np.abs(d_fvu[:3]) < 1e-3)


def test_linear_mse_is_brute_force_least_squares(store, result) -> None:
    _, out = result
    x, y = store.read_site("mlp_resid.1").toarray(), store.read_site("mlp_out.1").toarray()
    groups = store.read_tokens()["context"].to_numpy()
    train, held = split_rows(N, CONFIG.heldout_fraction, CONFIG.seed, groups)
    design = np.hstack([x, np.ones((N, 1))])
    coef = np.linalg.lstsq(design[train], y[train], rcond=None)[0]
    expected = ((y[held] - design[held] @ coef) ** 2).mean(0)
    got = pl.read_parquet(out / "features.parquet")["mse_linear"].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-8)


def test_chosen_connections_are_true_inputs_and_stable(result) -> None:
    _, out = result
    weights = pl.read_parquet(out / "weights.parquet").filter(pl.col("large"))
    for j, terms in SUPPORT.items():
        mine = weights.filter(pl.col("output") == j)
        # The elbow trades error for size, so it may drop the weakest true inputs, never
        # add false ones; the strongest is always kept.
        assert set(mine["input"].to_list()) <= set(terms) and len(mine) > 0
        assert max(terms, key=lambda k: abs(terms[k])) in mine["input"].to_list()
        assert mine["in_both"].all()
        assert (mine["relative_change"] < 0.1).all()
    features = pl.read_parquet(out / "features.parquet")
    # Formulas show the least-squares refit on the chosen inputs, not the shrunk L1 weight.
    assert features["formula"][2] == "out 2 = 2.00·in 9"


def test_top_tokens_are_the_largest_activations(store, result) -> None:
    _, out = result
    top = pl.read_parquet(out / "top_tokens.parquet")
    y = store.read_site("mlp_out.1").toarray()
    first = top.filter((pl.col("site") == "mlp_out.1") & (pl.col("feature") == 3))
    np.testing.assert_allclose(first["activation"].to_numpy(), np.sort(y[:, 3])[::-1][:5])
    assert first["token"][0] == f"t{first['token_id'][0]}"
    assert top.filter((pl.col("site") == "mlp_out.1") & (pl.col("feature") == 4)).height == 0


def test_a_finished_result_is_reused(store, result) -> None:
    summary, out = result
    stamp = (out / "weights.parquet").stat().st_mtime_ns
    again = connect(store, PAIR, out, CONFIG)
    assert again == summary and (out / "weights.parquet").stat().st_mtime_ns == stamp


def test_unknown_site_is_one_clear_error(store, tmp_path) -> None:
    with pytest.raises(CoactError, match=r"attn_out\.1 is not in the code store"):
        connect(store, SitePair.of("attn_out[1]", "mlp_out[1]"), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_cli_linearity_relabels_without_refitting(store, result, tmp_path) -> None:
    _, out = result
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"layer": 1, "model": "tiny-llama"}))
    shutil.copytree(out, run / "connect")  # the stage's files as it wrote and stamped them
    runner = CliRunner()
    loose = runner.invoke(app, ["linearity", str(run), "--tau", "10", "--form", "fvu"])
    assert loose.exit_code == 0 and "100.0% of 4 alive" in loose.output
    strict = runner.invoke(app, ["linearity", str(run), "--tau", "-1", "--form", "fvu"])
    assert "0.0% of 4 alive" in strict.output and "1 dead" in strict.output
    # Verdicts beyond d's noise, from the stored interval.
    assert "0 linear, 4 nonlinear, 0 undecided, so 0.0–0.0% linear" in strict.output


def test_heldout_contexts_add_up_to_d_and_bound_it(result) -> None:
    from coact.linearity.table import HeldoutContexts

    summary, out = result
    features = pl.read_parquet(out / "features.parquet")
    contexts = HeldoutContexts.load(out / "linearity_contexts.npz")
    assert contexts.tokens.sum() == summary.tokens_heldout
    assert len(contexts.tokens) == summary.heldout_contexts
    # One pass over the held-out tokens gives the same d as the two separate MSEs.
    d = contexts.diff.sum(0) / contexts.tokens.sum()
    np.testing.assert_allclose(d, features["d"].to_numpy(), atol=1e-5)
    alive = features.filter(pl.col("status") != "dead")
    assert (alive["d_low"] <= alive["d"] + 1e-9).all() and (
        alive["d"] <= alive["d_high"] + 1e-9
    ).all()
    # The AND output's gain is far beyond the noise; the exact-linear ones carry none.
    assert features["verdict"].to_list()[3:] == ["nonlinear", "dead"]
    assert summary.share.mlp_gain_beyond_noise >= 1
    low, high = summary.share.percent_linear_confident, summary.share.percent_linear_possible
    assert low <= summary.share.percent_linear <= high


def test_linearity_by_chunks_of_outputs_matches_one_chunk(store, result, tmp_path) -> None:
    from dataclasses import replace

    summary, out = result
    chunked = connect(store, PAIR, tmp_path / "chunked", replace(CONFIG, linearity_chunk_outputs=2))
    assert chunked.linearity_output_chunks == 3 and summary.linearity_output_chunks == 1
    one, many = (pl.read_parquet(d / "features.parquet") for d in (out, tmp_path / "chunked"))
    np.testing.assert_allclose(many["mse_linear"], one["mse_linear"], rtol=1e-9, atol=1e-12)
    assert many["status"].to_list() == one["status"].to_list()
    curve = pl.read_parquet(tmp_path / "chunked" / "mlp_curve.parquet")
    assert sorted(curve["chunk"].unique().to_list()) == [0, 1, 2]


def test_saved_connectors_predict_what_the_table_measured(store, result) -> None:
    from coact.connectors.families import csr_batch
    from coact.linearity.fits import load_linearity_connectors

    _, out = result
    (outputs, mlp), *rest = load_linearity_connectors(out / "linearity_connectors.safetensors")
    assert rest == [] and outputs.tolist() == list(range(5))
    x, y = store.read_site("mlp_resid.1"), store.read_site("mlp_out.1").toarray()
    groups = store.read_tokens()["context"].to_numpy()
    _, held = split_rows(N, CONFIG.heldout_fraction, CONFIG.seed, groups)
    batch = csr_batch(sp.csr_matrix(x, dtype=np.float32), held)
    features = pl.read_parquet(out / "features.parquet")
    for predict, column in ((mlp.skip_prediction, "mse_linear"), (mlp, "mse_mlp")):
        mse = ((predict(batch).numpy() - y[held]) ** 2).mean(0)
        np.testing.assert_allclose(mse, features[column].to_numpy(), rtol=1e-3, atol=1e-6)


def test_a_result_missing_a_file_is_redone(store, result, tmp_path) -> None:
    import shutil

    _, out = result
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "linearity_connectors.safetensors").unlink()
    stamp = (copy / "weights.parquet").stat().st_mtime_ns
    connect(store, PAIR, copy, CONFIG)
    assert (copy / "linearity_connectors.safetensors").is_file()
    assert (copy / "weights.parquet").stat().st_mtime_ns != stamp
