"""One interface for every connector: the exact path's linear connector and the SGD
families predict, expose weights, save and load alike; hand-computed and planted checks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from coact.connectors.exact import GramStats, LassoPathConfig
from coact.connectors.families import SparseConnector, csr_batch
from coact.connectors.interface import Connector, LinearConnector, load_connector
from coact.connectors.sparse import fit_sparse
from coact.errors import CoactError


def test_linear_connector_by_hand(tmp_path) -> None:
    weight = sp.csc_matrix(np.array([[2.0, 0.0], [0.0, -1.0], [1.0, 1.0]]))
    connector = LinearConnector(weight, np.array([0.5, -0.5]))
    x = sp.csr_matrix(np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]]))
    # row 0: 2·1 + 0.5, 0 − 0.5; row 1: 0 + 1 + 0.5, −2 + 1 − 0.5
    np.testing.assert_allclose(connector.predict(x), [[2.5, -0.5], [1.5, -1.5]])
    assert isinstance(connector, Connector) and (connector.n_in, connector.n_out) == (3, 2)
    connector.save(tmp_path / "linear.safetensors")
    loaded = load_connector(tmp_path / "linear.safetensors")
    assert isinstance(loaded, LinearConnector)
    np.testing.assert_array_equal(loaded.predict(x), connector.predict(x))
    assert (sp.csc_matrix(loaded.weights()) != weight).nnz == 0
    with pytest.raises(CoactError, match="intercepts"):
        LinearConnector(weight, np.zeros(3))


@pytest.mark.parametrize("family", ["linear", "relu", "mlp", "two-relu", "sae-connector"])
def test_sparse_connector_predicts_what_it_computes_and_round_trips(tmp_path, family) -> None:
    rng = np.random.default_rng(0)
    x = sp.random(50, 12, density=0.2, format="csr", random_state=1, dtype=np.float32)
    connector = SparseConnector(family, 12, 5, hidden=7, seed=3)
    with torch.no_grad():  # non-zero weights everywhere, so every term is exercised
        for p in connector.parameters():
            p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape)).astype(np.float32)))
    if family == "mlp":
        connector.set_linear_skip(torch.randn(12, 5), torch.randn(5))
        with torch.no_grad():
            connector.weight_out.normal_()  # type: ignore[union-attr]
    with torch.no_grad():
        direct = connector(csr_batch(x)).numpy()
    np.testing.assert_allclose(connector.predict(x, batch=7), direct, rtol=1e-6, atol=1e-6)
    assert isinstance(connector, Connector)
    assert connector.weights().shape == (12, 7 if connector.hidden else 5)
    connector.save(tmp_path / "c.safetensors")
    loaded = load_connector(tmp_path / "c.safetensors")
    assert isinstance(loaded, SparseConnector) and loaded.family == family
    np.testing.assert_array_equal(loaded.predict(x), connector.predict(x))


def test_exact_path_connector_recovers_a_planted_map() -> None:
    rng = np.random.default_rng(4)
    x = sp.random(4000, 30, density=0.1, format="csr", random_state=5)
    true = np.zeros((30, 4))
    true[[1, 7, 20], [0, 1, 3]] = [1.5, -2.0, 0.8]
    y = sp.csr_matrix(x @ true + 0.01 * rng.normal(size=(4000, 4)) * (x @ true != 0))
    stats = GramStats.empty(30, 4).add(x[:3000], y[:3000])
    held = GramStats.empty(30, 4).add(x[3000:], y[3000:])
    fit = fit_sparse(stats, held, LassoPathConfig(n_alphas=12), magnitude=0.05)
    connector = fit.connector
    assert isinstance(connector, Connector)
    found = sp.csc_matrix(connector.weights()).toarray()
    np.testing.assert_allclose(found[[1, 7, 20], [0, 1, 3]], [1.5, -2.0, 0.8], rtol=0.05)
    predicted = connector.predict(x[3000:])
    error = ((predicted - y[3000:].toarray()) ** 2).mean(0)
    alive = y[3000:].toarray().var(0) > 0
    assert (error[alive] / y[3000:].toarray().var(0)[alive] < 0.05).all()


def test_a_file_that_is_no_connector_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(CoactError, match="no saved connector"):
        load_connector(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CoactError, match="not a saved connector"):
        load_connector(tmp_path / "other.safetensors")
