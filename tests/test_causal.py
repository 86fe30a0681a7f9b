"""Causal check of connections on a tiny model whose MLP computes a planted rule on SAE
features: exactly linear (every prediction must hold), or with thresholds (AND-like
outputs whose size the linear formula must get wrong)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from coact.calibrate import causal
from coact.calibrate.causal import CausalConfig, causal_check, causal_summary, sample_connections
from coact.connectors.families import SparseConnector
from coact.errors import CoactError
from coact.models.tracing import capture
from tests.planted_model import PlantedModel, planted_model, random_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = CausalConfig(batch_size=4, progress=False)
DEAD = 47  # the last input feature of the plants below never fires


def _weights(plant: PlantedModel) -> pl.DataFrame:
    """A weights table as `connect` writes it, from the planted B, plus one connection
    from the dead input (its weight is what a fit on little data might produce)."""
    B = plant.B.numpy().astype(np.float64)
    out, inp = np.nonzero(B)
    out, inp = np.append(out, 0), np.append(inp, DEAD)
    w = np.append(B[out[:-1], inp[:-1]], 0.3)
    return pl.DataFrame(
        {
            "output": out.astype(np.int64),
            "input": inp.astype(np.int64),
            "weight": w,
            "weight_refit": w,
            "standardised": w,
            "large": np.ones(len(w), dtype=bool),
        }
    )


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return random_tokens(12, 24, seed=7)


@pytest.fixture(scope="module")
def linear(device) -> PlantedModel:
    return planted_model("linear", dead_inputs=1, device=device)


@pytest.fixture(scope="module")
def threshold(device) -> PlantedModel:
    return planted_model("threshold", dead_inputs=1, device=device)


@pytest.fixture(scope="module")
def linear_table(linear, tokens) -> pl.DataFrame:
    return causal_check(
        linear.lm, linear.layer, linear.sae_in, linear.sae_out, tokens, _weights(linear),
        config=CONFIG,
    )  # fmt: skip


@pytest.fixture(scope="module")
def threshold_table(threshold, tokens) -> pl.DataFrame:
    return causal_check(
        threshold.lm, threshold.layer, threshold.sae_in, threshold.sae_out, tokens,
        _weights(threshold), config=CONFIG,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "in_kind"), [("linear", "exact"), ("threshold", "exact"), ("linear", "random")]
)
def test_planted_identity_holds(kind, in_kind, tokens, device) -> None:
    """The out-site codes read from the model are the rule applied to the in-site codes."""
    plant = planted_model(kind, in_kind=in_kind, device=device)
    site_in, site_out = plant.sites
    acts = capture(plant.lm, tokens, [site_in, site_out])
    codes_in = plant.sae_in.encode(acts[site_in])
    codes_out = plant.sae_out.encode(acts[site_out])
    torch.testing.assert_close(codes_out, plant.rule(codes_in), atol=1e-5, rtol=0)
    rates = (codes_in[:, 1:] > 0).float().mean((0, 1))
    assert 0.05 <= rates.median() <= 0.3 and (rates > 0).all()
    assert plant.sae_in.site == "mlp_resid[1]" and plant.sae_out.site == "mlp_out[1]"
    if kind == "threshold":
        assert (plant.B < 0).any() and plant.theta is not None and (plant.theta > 0).any()


def test_linear_plant_every_judged_connection_agrees(linear, linear_table) -> None:
    """An exactly linear MLP and an input SAE whose encoder inverts its decoder: ablating
    feature i changes output j by exactly −B[j, i]·code_i on every token."""
    judged = linear_table.filter(pl.col("judged"))
    assert judged.height == int((linear.B != 0).sum())
    assert judged["sign_agrees"].all() and judged["size_agrees"].all()
    np.testing.assert_allclose(judged["actual_mean"], judged["predicted_mean"], rtol=1e-4)
    np.testing.assert_allclose(judged["corr"], 1.0, atol=1e-6)
    summary = causal_summary(linear_table)
    assert summary.connections == linear_table.height == judged.height + 1
    assert summary.share_both_agree == 1.0
    assert linear_table["predicted_mlp_mean"].is_nan().all()


def test_dead_input_is_reported_not_judged(linear_table) -> None:
    dead = linear_table.filter(pl.col("input") == DEAD)
    assert dead.height == 1 and dead["n_tokens"].item() == 0
    assert not dead["judged"].item() and not dead["sign_agrees"].item()
    assert np.isnan(dead["actual_mean"].item()) and np.isnan(dead["corr"].item())


def test_threshold_plant_fails_size_for_and_outputs(threshold, threshold_table) -> None:
    theta = threshold.theta
    assert theta is not None
    is_and = pl.Series(theta.numpy()[threshold_table["output"].to_numpy()] > 0)
    ands = threshold_table.filter(is_and & pl.col("judged"))
    assert ands.height > 0 and not ands["size_agrees"].all()
    # Ablating one input of an AND removes less than the linear formula says.
    failed = ands.filter(~pl.col("size_agrees"))
    assert (failed["actual_mean"].abs() < 0.5 * failed["predicted_mean"].abs()).all()
    assert causal_summary(threshold_table).share_size_agrees < 1.0


def test_actual_change_by_brute_force(threshold, threshold_table, tokens) -> None:
    """Call the planted MLP directly on the ablated stream for one AND connection."""
    theta = threshold.theta
    assert theta is not None
    row = threshold_table.filter(
        pl.Series(theta.numpy()[threshold_table["output"].to_numpy()] > 0) & pl.col("judged")
    ).row(0, named=True)
    j, i = row["output"], row["input"]
    site_in = threshold.sites[0]
    x = capture(threshold.lm, tokens, [site_in])[site_in][:, 1:].reshape(-1, 64)
    code = threshold.sae_in.encode(x)[:, i]
    fires = code > 0
    edited = x[fires] - code[fires, None] * threshold.sae_in.W_dec[i]
    with torch.no_grad():
        after = threshold.sae_out.encode(threshold.mlp(edited))[:, j]
        before = threshold.sae_out.encode(threshold.mlp(x[fires]))[:, j]
    assert row["n_tokens"] == int(fires.sum())
    assert row["actual_mean"] == pytest.approx(float((after - before).mean()), abs=1e-5)
    assert row["predicted_mean"] == pytest.approx(-row["weight_refit"] * float(code[fires].mean()))


def test_connector_predictions_per_chunk(linear, tokens) -> None:
    """Least-squares (skip) and mlp predictions, read from the right chunk and column."""
    n_in, n_out = linear.sae_in.width, linear.sae_out.width
    chunks = [np.arange(0, n_out, 2), np.arange(1, n_out, 2)]  # interleaved outputs
    connectors = []
    for outputs in chunks:
        connector = SparseConnector("mlp", n_in, len(outputs), hidden=3)
        connector.set_linear_skip(linear.B[outputs].T, torch.zeros(len(outputs)))
        connectors.append((outputs, connector.eval().requires_grad_(False)))
    second = connectors[1][1].weight_out
    assert second is not None
    with torch.no_grad():  # the mlp part of chunk 1 adds 0.5·ReLU(W1 x) to its outputs
        second.fill_(0.5)
    weights = _weights(linear).filter(pl.col("input") != DEAD).head(12)
    table = causal_check(
        linear.lm, linear.layer, linear.sae_in, linear.sae_out, tokens, weights, connectors,
        CONFIG,
    )  # fmt: skip
    np.testing.assert_allclose(table["predicted_lsq_mean"], table["predicted_mean"], rtol=1e-5)
    even = table.filter(pl.col("output") % 2 == 0)
    np.testing.assert_allclose(even["predicted_mlp_mean"], even["predicted_mean"], rtol=1e-5)
    odd = table.filter(pl.col("output") % 2 == 1).row(0, named=True)
    site = linear.sites[0]
    codes = linear.sae_in.encode(capture(linear.lm, tokens, [site])[site][:, 1:]).reshape(-1, n_in)
    codes = codes[codes[:, odd["input"]] > 0]
    ablated = codes.clone()
    ablated[:, odd["input"]] = 0
    w1 = connectors[1][1].weight_in.to(codes.device)  # the connectors stay on the CPU
    hidden_change = torch.relu(ablated @ w1) - torch.relu(codes @ w1)
    expected = odd["predicted_mean"] + 0.5 * float(hidden_change.sum(1).mean())
    assert odd["predicted_mlp_mean"] == pytest.approx(expected, rel=1e-4)
    assert odd["predicted_mlp_mean"] != pytest.approx(odd["predicted_mean"], rel=1e-2)


def test_edits_run_only_on_contexts_that_contain_the_input(linear, tokens, monkeypatch) -> None:
    calls: list[int] = []
    real = causal.mlp_output_after_edit

    def spy(lm, batch, layer, edit):
        calls.append(batch.shape[0])
        return real(lm, batch, layer, edit)

    monkeypatch.setattr(causal, "mlp_output_after_edit", spy)
    weights = _weights(linear).filter(pl.col("input") == 0)
    table = causal_check(
        linear.lm, linear.layer, linear.sae_in, linear.sae_out, tokens, weights, config=CONFIG
    )
    site = linear.sites[0]
    codes = linear.sae_in.encode(capture(linear.lm, tokens, [site])[site][:, 1:])[..., 0]
    containing = int((codes > 0).any(dim=1).sum())
    assert sum(calls) == containing and max(calls) <= CONFIG.batch_size
    assert len(calls) == -(-containing // CONFIG.batch_size)
    assert (table["n_tokens"] == int((codes > 0).sum())).all()


def test_sampling_takes_stable_then_strongest_large_connections() -> None:
    weights = pl.DataFrame(
        {
            "output": [0, 1, 2, 3, 4],
            "input": [0, 0, 1, 1, 2],
            "weight_refit": [1.0, -3.0, 2.0, 5.0, 9.0],
            "standardised": [0.1, -0.9, 0.5, 0.8, 2.0],
            "large": [True, True, True, True, False],
            "in_both": [True, True, True, False, True],
        }
    )
    assert sample_connections(weights, 3)["output"].to_list() == [1, 2, 0]
    no_halves = sample_connections(weights.drop("in_both"), 2)
    assert no_halves["output"].to_list() == [1, 3]


def test_bad_tables_are_one_clear_error(linear, tokens) -> None:
    weights = _weights(linear)
    args = (linear.lm, linear.layer, linear.sae_in, linear.sae_out, tokens)
    unknown = weights.with_columns(pl.lit(48, dtype=pl.Int64).alias("input"))
    with pytest.raises(CoactError, match="names input feature 48, but the input SAE has 48"):
        causal_check(*args, unknown, config=CONFIG)
    with pytest.raises(CoactError, match=r"lacks column\(s\) weight_refit"):
        causal_check(*args, weights.drop("weight_refit"), config=CONFIG)
