"""Connector families and their SGD trainer, on planted data whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from coact.codes.store import CodeStore
from coact.connectors.families import (
    FAMILIES,
    SparseBatch,
    SparseConnector,
    csr_batch,
    loss_terms,
)
from coact.connectors.interface import Connector
from coact.connectors.train import (
    ConnectorTrainConfig,
    per_output_mse,
    seed_normalised_mse,
    split_rows,
    train_connector,
    train_connector_from_store,
)
from coact.errors import CoactError

FAST = {"lr": 3e-2, "batch_tokens": 128, "epochs": 20, "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted_linear() -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """y = W x exactly, x 5 % dense, each output reading 3 of 40 inputs."""
    rng = np.random.default_rng(0)
    x = sp.random(4000, 40, density=0.05, random_state=1, format="csr", dtype=np.float32)
    x.data += 0.5
    w = np.zeros((4, 40), np.float32)
    for j in range(4):
        support = rng.choice(40, 3, replace=False)
        w[j, support] = rng.uniform(0.5, 2, 3) * rng.choice([-1, 1], 3)
    return x, sp.csr_matrix(x @ w.T), w


@pytest.fixture(scope="module")
def planted_and() -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Binary-ish a, b, c, d and two noise inputs; outputs 0, 1 linear, 2, 3 AND-like."""
    rng = np.random.default_rng(2)
    n = 4000
    a = (rng.random((n, 4)) < 0.3) * (1 + rng.uniform(-0.05, 0.05, (n, 4)))
    noise = (rng.random((n, 2)) < 0.1) * rng.random((n, 2))
    y = [
        a[:, 0] + 0.5 * a[:, 1],
        2 * a[:, 2],
        np.maximum(a[:, 0] + a[:, 1] - 1, 0),
        np.maximum(a[:, 2] + a[:, 3] - 1, 0),
    ]
    return sp.csr_matrix(np.hstack([a, noise]), dtype=np.float32), sp.csr_matrix(np.stack(y, 1))


def test_linear_recovers_planted_sparse_weights(planted_linear) -> None:
    x, y, w = planted_linear
    fit = train_connector(x, y, ConnectorTrainConfig(**FAST))
    assert fit.heldout_nmse_total < 1e-4 and fit.train_nmse_total < 1e-4
    learned = fit.connector.first_layer_weight().numpy()
    np.testing.assert_array_equal(np.abs(learned) > 0.05, w != 0)
    np.testing.assert_allclose(learned, w, atol=1e-2)


def test_mlp_beats_linear_exactly_on_and_outputs(planted_and) -> None:
    x, y = planted_and
    fits = {
        f: train_connector(x, y, ConnectorTrainConfig(family=f, hidden=32, **{**FAST, "lr": 1e-2}))
        for f in ("linear", "mlp")
    }
    lin, mlp = fits["linear"].heldout_nmse, fits["mlp"].heldout_nmse
    assert np.all(lin[2:] > 0.3) and np.all(mlp[2:] < 0.05)  # AND: ~0.5 FVU left linearly
    assert np.all(lin[:2] < 0.03) and np.all(mlp[:2] < 0.03)
    np.testing.assert_allclose(lin[:2], mlp[:2], atol=0.03)


def test_dead_outputs_are_flagged_and_never_nan(planted_and) -> None:
    x, y = planted_and
    with_dead = sp.hstack([y, sp.csr_matrix((y.shape[0], 2))], format="csr")
    fit = train_connector(
        x, with_dead, ConnectorTrainConfig("mlp", hidden=16, steps=20, progress=False)
    )
    np.testing.assert_array_equal(fit.dead_outputs, [False] * 4 + [True] * 2)
    assert np.all(np.isfinite(fit.loss_nmse)) and np.all(np.isnan(fit.heldout_nmse[4:]))
    assert np.all(np.isfinite(fit.heldout_nmse[:4]))
    assert fit.heldout_nmse_total == pytest.approx(fit.heldout_nmse[:4].mean())
    all_dead = train_connector(
        x, sp.csr_matrix(y.shape), ConnectorTrainConfig(steps=5, progress=False)
    )
    assert all_dead.loss_nmse == [0.0] * 5 and math.isnan(all_dead.heldout_nmse_total)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_first_layer_equals_dense_reference(family: str) -> None:
    x = sp.random(64, 300, density=0.01, random_state=3, format="csr", dtype=np.float32)
    x = sp.csr_matrix(sp.diags((np.arange(64) % 5 > 0).astype(np.float32)) @ x)
    x.eliminate_zeros()
    x.sort_indices()
    assert np.diff(x.indptr).min() == 0  # some rows are empty: their bags must sum to 0
    net = SparseConnector(family, 300, 7, hidden=11, seed=4)
    assert isinstance(net, Connector)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    batch = csr_batch(x, np.arange(64))
    assert batch.indices.numel() == x.nnz  # only the nonzeros travel
    w1, b1 = net.first_layer_weight().detach().numpy(), net.bias_in.detach().numpy()
    z = x.toarray() @ w1.T + b1
    first = net.first_layer(batch)
    np.testing.assert_allclose(first.detach().numpy(), z, rtol=1e-5, atol=1e-5)
    grad = torch.randn(first.shape, generator=torch.Generator().manual_seed(5))
    first.backward(grad)  # the custom backward gathers over Xᵀ: it must equal Xᵀ · grad
    expected_grad = x.T @ grad.numpy()
    np.testing.assert_allclose(net.weight_in.grad.numpy(), expected_grad, rtol=1e-5, atol=1e-5)
    if net.weight_out is not None:
        w2, b2 = net.weight_out.detach().numpy(), net.bias_out.detach().numpy()
        z = np.maximum(z, 0) @ w2.T + b2
    expected = np.maximum(z, 0) if family in ("relu", "two-relu") else z
    crow, col, val = (torch.from_numpy(a) for a in (x.indptr, x.indices, x.data))
    as_torch = torch.sparse_csr_tensor(crow, col, val, size=x.shape, check_invariants=True)
    for given in (batch, as_torch, tuple(batch)):
        out = net(given).detach().numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_output_and_input_subsets_train_only_those(planted_linear) -> None:
    x, y, w = planted_linear
    outputs = (2, 0)
    inputs = tuple(int(i) for i in np.flatnonzero(w[list(outputs)].any(0)))
    config = ConnectorTrainConfig(outputs=outputs, inputs=inputs, **FAST)
    fit = train_connector(x, y, config)
    assert (fit.connector.n_in, fit.connector.n_out) == (len(inputs), 2)
    assert fit.heldout_mse.shape == (2,) and list(fit.outputs) == [2, 0]
    learned = fit.connector.first_layer_weight().numpy()
    np.testing.assert_allclose(learned, w[np.ix_(outputs, inputs)], atol=1e-2)
    x_sub, y_sub = x[:, list(inputs)], y[:, list(outputs)]
    again = per_output_mse(fit.connector, x_sub, y_sub, fit.heldout_rows)
    np.testing.assert_allclose(again, fit.heldout_mse, rtol=1e-6)


def test_loss_curves_have_one_entry_per_step_and_fall(planted_linear) -> None:
    x, y, _ = planted_linear
    fit = train_connector(x, y, ConnectorTrainConfig(steps=37, alpha=1e-4, **FAST))
    assert len(fit.loss_nmse) == len(fit.loss_l1) == 37
    assert np.mean(fit.loss_nmse[-5:]) < 0.2 * fit.loss_nmse[0]
    assert fit.loss_l1[0] < fit.loss_l1[-1]  # weights grow from zero to the planted ones
    by_epoch = train_connector(x, y, ConnectorTrainConfig(epochs=2, batch_tokens=500))
    assert len(by_epoch.loss_nmse) == 2 * math.ceil(len(by_epoch.train_rows) / 500)


def test_sae_connector_reports_hidden_sparsity(planted_and) -> None:
    x, y = planted_and
    l0 = {}
    for alpha_hidden in (0.0, 0.05):
        settings = {**FAST, "lr": 1e-2, "epochs": 5}
        config = ConnectorTrainConfig(
            "sae-connector", hidden=32, alpha_hidden=alpha_hidden, **settings
        )
        fit = train_connector(x, y, config)
        assert fit.hidden_l0 is not None and fit.hidden_l0 > 0
        assert fit.dead_hidden is not None and 0 <= fit.dead_hidden < 32
        assert fit.dead_hidden == int((fit.hidden_fired == 0).sum())
        l0[alpha_hidden] = fit.hidden_l0
    assert l0[0.05] < 0.5 * l0[0.0]
    assert train_connector(x, y, ConnectorTrainConfig(steps=2, progress=False)).hidden_l0 is None


def test_loss_by_hand() -> None:
    """x = [1,0], [0,1], [1,1]; W = diag(1, 2): ŷ = [1,0], [0,2], [1,2].
    y = [1,0], [0,1], [2,1] (+ an all-zero column). Errors [0,0], [0,1], [-1,1]:
    MSE = 1/3 and 2/3; var(y) = 2/3 and 2/9; normalised = 1/2 and 3, mean 7/4.
    ‖W‖₁ = 3. For the sae-connector with W1 = diag(1, 2), h = ŷ, mean ‖h‖₁ = (1+2+3)/3 = 2."""
    x = sp.csr_matrix(np.array([[1, 0], [0, 1], [1, 1]], np.float32))
    y = torch.tensor([[1, 0, 0], [0, 1, 0], [2, 1, 0]], dtype=torch.float32)
    weights = torch.tensor([1 / (2 / 3), 1 / (2 / 9), 0.0])  # the dead column counts for 0
    linear = SparseConnector("linear", 2, 3, bias=False)
    with torch.no_grad():
        linear.weight_in.copy_(torch.tensor([[1.0, 0, 0], [0, 2, 0]]))
    nmse, l1 = (t.item() for t in loss_terms(linear, csr_batch(x), y, weights, alpha=0.1))
    assert nmse == pytest.approx(1.75) and l1 == pytest.approx(0.3)
    sae = SparseConnector("sae-connector", 2, 3, hidden=2, bias=False)
    with torch.no_grad():
        sae.weight_in.copy_(torch.tensor([[1.0, 0], [0, 2]]))
        sae.weight_out.copy_(torch.tensor([[1.0, 0], [0, 1], [0, 0]]))
    terms = loss_terms(sae, csr_batch(x), y, weights, alpha=0.1, alpha_hidden=0.5)
    nmse, l1 = (t.item() for t in terms)
    assert nmse == pytest.approx(1.75) and l1 == pytest.approx(0.3 + 0.5 * 2)
    assert sae.l1_penalty().item() == pytest.approx(3 + 2)
    assert seed_normalised_mse(0.5, layer_norm=2.0, min_layer_norm=1.0) == pytest.approx(0.125)


def test_heldout_split_takes_whole_contexts_deterministically() -> None:
    groups = np.repeat(np.arange(20), 7)
    train, held = split_rows(len(groups), 0.2, seed=5, groups=groups)
    assert not set(groups[train]) & set(groups[held]) and len(set(groups[held])) == 4
    again = split_rows(len(groups), 0.2, seed=5, groups=groups)
    np.testing.assert_array_equal(held, again[1])
    assert not np.array_equal(held, split_rows(len(groups), 0.2, seed=6, groups=groups)[1])
    with pytest.raises(CoactError, match="unknown connector family"):
        ConnectorTrainConfig(family="cubic")


def test_train_from_store_holds_out_contexts(tmp_path, planted_linear) -> None:
    x, y, _ = planted_linear
    store = CodeStore.open_for_writing(tmp_path, fingerprint="f", sites={"in": 40, "out": 4})
    for shard in range(2):
        rows = slice(shard * 2000, (shard + 1) * 2000)
        n = 2000
        context = shard * 100 + np.arange(n) // 20
        tokens = {"context": context, "position": np.arange(n) % 20, "token_id": np.zeros(n)}
        store.write_shard(shard, {**tokens, "doc": context}, {"in": x[rows], "out": y[rows]})
    fit = train_connector_from_store(
        CodeStore.open(tmp_path), "in", "out", ConnectorTrainConfig(progress=False)
    )
    context = store.read_tokens()["context"].to_numpy()
    assert not set(context[fit.train_rows]) & set(context[fit.heldout_rows])
    assert len(set(context[fit.heldout_rows])) == 20  # 10 % of 200 contexts
    assert isinstance(csr_batch(x, fit.heldout_rows[:3]), SparseBatch)


def test_linear_skip_starts_at_the_linear_fit_and_adds_only_the_nonlinear_part(
    planted_and,
) -> None:
    from coact.connectors.exact import GramStats, linear_fit

    x, y = planted_and
    w, b = linear_fit(GramStats.empty(x.shape[1], y.shape[1]).add(x, y))
    start = train_connector(
        x, y, ConnectorTrainConfig("mlp", hidden=32, steps=0, progress=False), skip=(w, b)
    )
    # With no steps the model is exactly the least-squares map.
    expected = ((y.toarray() - (x @ w + b)) ** 2).mean(0)
    both = np.concatenate([start.train_rows, start.heldout_rows])
    got = start.train_mse * len(start.train_rows) + start.heldout_mse * len(start.heldout_rows)
    np.testing.assert_allclose(got / len(both), expected, rtol=1e-4, atol=1e-7)
    fit = train_connector(
        x, y, ConnectorTrainConfig("mlp", hidden=32, **{**FAST, "lr": 1e-2}), skip=(w, b)
    )
    lin = ((y.toarray()[fit.heldout_rows] - (x[fit.heldout_rows] @ w + b)) ** 2).mean(0)
    assert np.all(fit.heldout_mse[2:] < 0.2 * lin[2:])  # the AND outputs gain
    np.testing.assert_allclose(fit.heldout_mse[:2], lin[:2], atol=1e-3)  # linear ones stay
    with pytest.raises(ValueError, match="skip weight"):
        train_connector(x, y, ConnectorTrainConfig(steps=1, progress=False), skip=(w.T, b))


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience(planted_and) -> None:
    x, y = planted_and
    config = ConnectorTrainConfig(
        family="mlp", hidden=64, lr=0.05, epochs=40, patience=2, batch_tokens=64, progress=False
    )
    fit = train_connector(x, y, config)
    watched = fit.validation_nmse
    assert fit.best_epoch == int(np.argmin(watched))
    assert len(watched) == min(40, fit.best_epoch + 3) and len(watched) < 40  # it stopped
    # The weights kept are the best epoch's: recompute its loss on the watched contexts.
    keep, seen = split_rows(len(fit.train_rows), 0.1, 1)
    watch = fit.train_rows[seen]
    mse = per_output_mse(fit.connector, x, y, watch)
    assert np.nanmean(mse / np.where(fit.train_variance > 0, fit.train_variance, np.nan)) == (
        pytest.approx(watched[fit.best_epoch], rel=1e-5)
    )
    assert len(np.intersect1d(watch, fit.train_rows[keep])) == 0


def test_patience_needs_epochs_not_steps() -> None:
    with pytest.raises(CoactError, match="patience"):
        ConnectorTrainConfig(family="mlp", patience=2, steps=10)
