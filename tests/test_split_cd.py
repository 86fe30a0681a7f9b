"""The coordinate-descent kernels' helpers (`_cd`), and a path wide enough to use them all."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import Lasso

from coact.connectors import exact
from coact.connectors._cd import _join
from coact.connectors._csr import _csr_alloc
from coact.connectors.exact import GramStats, LassoPathConfig, lasso_path


def test_join_strong_rule_admits_ties_and_kkt_does_not() -> None:
    # centred gradients |rt + μ·s| = 1, 2, 2, 3 (s = 0); input 3 is unusable, 0 already active
    rt, mu = np.array([1.0, -2.0, 2.0, 3.0]), np.zeros(4)
    usable = np.array([True, True, True, False])
    for strict, joined in ((False, [1, 2]), (True, [])):
        act = np.array([True, False, False, False])
        order, where = np.array([0, -1, -1, -1]), np.array([0, -1, -1, -1])
        n_act = _join(usable, act, rt, mu, 0.0, 2.0, strict, order, where, 1)
        assert n_act == 1 + len(joined)
        assert list(order[1:n_act]) == joined and list(where[joined]) == list(range(1, n_act))
        assert list(np.flatnonzero(act)) == [0, *joined]


def test_csr_alloc_sizes_rows_from_counts() -> None:
    ptr, ind, val = _csr_alloc(np.array([0, 2, 0, 3], dtype=np.int64))
    assert list(ptr) == [0, 2, 2, 5] and len(ind) == len(val) == 5
    assert ind.dtype == np.int64 and val.dtype == np.float64


@pytest.mark.parametrize("dense_gram", [True, False])
def test_wide_support_path_matches_sklearn(
    dense_gram: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 planted inputs of 90 and no screening: every input joins through the KKT check,
    and the active set outgrows the solver's Gram buffer (growth keeps the rows built)."""
    if not dense_gram:
        monkeypatch.setattr(exact, "DENSE_GRAM_MAX", 0)
    rng = np.random.default_rng(1)
    x = sp.random(1200, 90, density=0.15, format="csr", random_state=rng)
    x.data = rng.exponential(1.0, x.nnz)
    truth = np.zeros((90, 3))
    for j in range(3):
        truth[rng.choice(90, 40, replace=False), j] = rng.normal(0, 1, 40) + 1.0
    y = x @ truth + 0.3 + 0.1 * rng.standard_normal((1200, 3))
    stats = GramStats.empty(90, 3).add(x, sp.csr_matrix(y))
    config = LassoPathConfig(
        n_alphas=6, alpha_min_ratio=1e-3, tol=1e-12, max_iter=20000, screening=False
    )
    path = lasso_path(stats, config)
    xd = x.toarray()
    assert path.converged.all() and path.coef[-1].getnnz(axis=0).min() > 16
    for i in (2, 5):
        for j in range(3):
            alpha = path.alphas[i] * y[:, j].var() / 2  # λ_sk = α·var/2
            ref = Lasso(alpha=alpha, tol=1e-10, max_iter=100000).fit(xd, y[:, j])
            np.testing.assert_allclose(path.coef[i][:, j].toarray().ravel(), ref.coef_, atol=1e-5)
            np.testing.assert_allclose(path.intercepts[i, j], ref.intercept_, atol=1e-5)
