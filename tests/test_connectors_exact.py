"""The exact linear connector path: Gram stats, the L1 path vs scikit-learn, held-out MSE."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import Lasso

from coact.codes.store import CodeStore
from coact.connectors import exact
from coact.connectors.exact import (
    GramStats,
    LassoPathConfig,
    heldout_nmse,
    lasso_path,
    linear_fit,
)


def _problem(
    n: int = 2000, n_in: int = 30, n_out: int = 5, noise: float = 0.1, seed: int = 0
) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """Sparse nonnegative X, Y = X W* + b + noise with 4 planted inputs per output."""
    rng = np.random.default_rng(seed)
    x = sp.random(n, n_in, density=0.15, format="csr", random_state=rng)
    x.data = rng.exponential(1.0, x.nnz)
    truth = np.zeros((n_in, n_out))
    for j in range(n_out):
        truth[rng.choice(n_in, 4, replace=False), j] = rng.normal(0, 1, 4) + np.sign(
            rng.normal(size=4)
        )
    y = x @ truth + 0.3 + noise * rng.standard_normal((n, n_out))
    return x, sp.csr_matrix(y), truth


def _stats(x: sp.spmatrix, y: sp.spmatrix) -> GramStats:
    return GramStats.empty(x.shape[1], y.shape[1]).add(x, y)


@pytest.fixture(params=["dense", "sparse"])
def gram_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both code paths of the Gram products, the path and the held-out errors: dense
    accumulators (small sites) and sparse ones (wide sites, forced here)."""
    if request.param == "sparse":
        monkeypatch.setattr(exact, "DENSE_GRAM_MAX", 0)
    return str(request.param)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_path_matches_sklearn_lasso(fit_intercept: bool, gram_kind: str) -> None:
    x, y, _ = _problem()
    config = LassoPathConfig(n_alphas=8, tol=1e-12, max_iter=20000, fit_intercept=fit_intercept)
    path = lasso_path(_stats(x, y), config)
    xd, yd = x.toarray(), y.toarray()
    for i in (0, 2, 4, 7):
        for j in range(yd.shape[1]):
            alpha = path.alphas[i] * yd[:, j].var() / 2  # λ_sk = α·var/2
            ref = Lasso(alpha=alpha, fit_intercept=fit_intercept, tol=1e-10, max_iter=100000)
            ref.fit(xd, yd[:, j])
            np.testing.assert_allclose(path.coef[i][:, j].toarray().ravel(), ref.coef_, atol=1e-5)
            np.testing.assert_allclose(path.intercepts[i, j], ref.intercept_, atol=1e-5)
            fvu = np.mean((yd[:, j] - ref.predict(xd)) ** 2) / yd[:, j].var()
            np.testing.assert_allclose(path.nmse[i, j], fvu, atol=1e-6)
    assert path.converged.all()


def test_stats_blocks_merge_and_brute_force(gram_kind: str) -> None:
    x, y, _ = _problem(n=600, seed=1)
    whole = _stats(x, y)
    blocks = GramStats.empty(30, 5)
    for lo in range(0, 600, 170):
        blocks.add(x[lo : lo + 170], y[lo : lo + 170])
    merged = _stats(x[:250], y[:250]).merge(_stats(x[250:], y[250:]))
    xd, yd = x.toarray(), y.toarray()
    for s in (whole, blocks, merged):
        assert s.n == 600 and sp.issparse(s.xtx) and sp.issparse(s.xty)
        np.testing.assert_allclose(s.xtx.toarray(), xd.T @ xd, rtol=1e-12)
        np.testing.assert_allclose(s.xty.toarray(), xd.T @ yd, rtol=1e-12)
        np.testing.assert_allclose(s.x_sum, xd.sum(0), rtol=1e-12)
        np.testing.assert_allclose(s.y_sum, yd.sum(0), rtol=1e-12)
        np.testing.assert_allclose(s.y_sq_sum, (yd**2).sum(0), rtol=1e-12)
        np.testing.assert_allclose(s.y_var(), yd.var(0), rtol=1e-10)
        mu, diag = s.gram()
        xc, yc = xd - xd.mean(0), yd - yd.mean(0)
        gram = s.xtx.toarray() / s.n - np.outer(mu, mu)
        np.testing.assert_allclose(gram, xc.T @ xc / 600, atol=1e-12)
        v = np.random.default_rng(0).standard_normal((30, 2))
        np.testing.assert_allclose(s.gram_matvec(v), xc.T @ (xc @ v) / 600, atol=1e-12)
        np.testing.assert_allclose(s.gram_matvec(v, center=False), xd.T @ (xd @ v) / 600)
        np.testing.assert_allclose(diag, (xc**2).mean(0), atol=1e-12)
        np.testing.assert_allclose(s.cross([4, 1]), xc.T @ yc[:, [4, 1]] / 600, atol=1e-12)


def test_from_store_equals_in_memory(tmp_path: Path) -> None:
    x, y, _ = _problem(n=90, n_in=12, n_out=3, seed=2)
    y = sp.csr_matrix(np.maximum(y.toarray(), 0))
    store = CodeStore.open_for_writing(tmp_path, fingerprint="fp", sites={"in": 12, "out": 3})
    for i, lo in enumerate(range(0, 90, 30)):
        tokens = {c: np.arange(30) for c in ("context", "position", "token_id", "doc")}
        store.write_shard(i, tokens, {"in": x[lo : lo + 30], "out": y[lo : lo + 30]})
    x32, y32 = (sp.csr_matrix(m.toarray().astype(np.float32)) for m in (x, y))
    ref = _stats(x32, y32)
    for got in (
        GramStats.from_store(store, "in", "out"),
        GramStats.from_store(store, "in", "out", iter([0, 1, 2])),
    ):
        assert got.n == 90
        np.testing.assert_allclose(got.xtx.toarray(), ref.xtx.toarray(), rtol=1e-12)
        np.testing.assert_allclose(got.xty.toarray(), ref.xty.toarray(), rtol=1e-12)
        np.testing.assert_allclose(got.y_sq_sum, ref.y_sq_sum, rtol=1e-12)
    assert GramStats.from_store(store, "in", "out", shards=[1]).n == 30


def test_planted_exact_support_recovered() -> None:
    x, y, truth = _problem(noise=0.0, seed=3)
    path = lasso_path(_stats(x, y), LassoPathConfig(alphas=(1e-6,), tol=1e-10))
    coef = path.coef[0].toarray()
    np.testing.assert_array_equal(np.abs(coef) > 1e-3, truth != 0)
    np.testing.assert_allclose(coef, truth, atol=1e-3)
    np.testing.assert_allclose(path.intercepts[0], 0.3, atol=1e-3)
    assert path.nmse[0].max() < 1e-6


def test_dead_output_flagged_with_zero_weights() -> None:
    x, y, _ = _problem(seed=4)
    yd = y.toarray()
    yd[:, 2] = 0.0
    stats = _stats(x, sp.csr_matrix(yd))
    path = lasso_path(stats, LassoPathConfig(n_alphas=5))
    assert path.dead.tolist() == [False, False, True, False, False]
    assert all(c[:, 2].nnz == 0 for c in path.coef)
    assert np.all(path.intercepts[:, 2] == 0) and np.isnan(path.nmse[:, 2]).all()
    assert not np.isnan(path.nmse[:, [0, 1, 3, 4]]).any()
    w, b = linear_fit(stats)
    assert np.all(w[:, 2] == 0) and b[2] == 0
    subset = lasso_path(stats, LassoPathConfig(n_alphas=5), outputs=[2])
    assert subset.dead.tolist() == [True] and subset.coef[0].shape == (30, 1)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_heldout_nmse_brute_force(gram_kind: str, fit_intercept: bool) -> None:
    """The held-out error of every α from held-out sums alone (tr WᵀAW − 2 tr WᵀC + ‖Y‖²
    with the intercepts) equals predicting the held-out tokens and measuring it."""
    x, y, _ = _problem(n=3000, seed=5)
    yd = y.toarray()
    yd[2000:, 1] = 0.7  # constant on the held-out tokens: NaN there
    y = sp.csr_matrix(yd)
    config = LassoPathConfig(n_alphas=6, fit_intercept=fit_intercept)
    path = lasso_path(_stats(x[:2000], y[:2000]), config, outputs=[3, 0, 4, 1])
    got = heldout_nmse(path, _stats(x[2000:], y[2000:]))
    xh, yh = x[2000:].toarray(), yd[2000:][:, [3, 0, 4]]
    for i in range(6):
        pred = xh @ path.coef[i].toarray()[:, :3] + path.intercepts[i, :3]
        np.testing.assert_allclose(got[i, :3], ((yh - pred) ** 2).mean(0) / yh.var(0), rtol=1e-8)
    assert np.isnan(got[:, 3]).all()
    assert heldout_nmse(path, _stats(x[2000:], y[2000:])).shape == (6, 4)
    assert path.coef[-1].nnz > path.coef[0].nnz  # weights at several α were evaluated


@pytest.mark.parametrize("dense_limit", [8192, 0])  # Cholesky, and conjugate gradients
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_linear_fit_equals_lstsq(fit_intercept: bool, dense_limit: int) -> None:
    x, y, _ = _problem(seed=6)
    w, b = linear_fit(_stats(x, y), fit_intercept=fit_intercept, dense_limit=dense_limit)
    xd = np.hstack([x.toarray(), np.ones((x.shape[0], 1))]) if fit_intercept else x.toarray()
    ref = np.linalg.lstsq(xd, y.toarray(), rcond=None)[0]
    np.testing.assert_allclose(w, ref[:30], atol=1e-7)
    np.testing.assert_allclose(b, ref[30] if fit_intercept else 0.0, atol=1e-7)


def test_auto_grid_starts_empty_and_ends_dense() -> None:
    x, y, truth = _problem(noise=1.0, seed=7)
    stats = _stats(x, y)
    path = lasso_path(stats, LassoPathConfig(top_quantile=1.0))
    assert len(path.alphas) == 20 and np.all(np.diff(path.alphas) < 0)
    assert path.coef[0].nnz == 0
    assert path.coef[-1].nnz > 0.5 * 30 * 5
    assert np.all(path.coef[-1].toarray()[truth != 0] != 0)
    np.testing.assert_allclose(path.alphas[-1] / path.alphas[0], 1e-2)
    below = lasso_path(stats, LassoPathConfig(alphas=(path.alphas[0] * 0.99,)))
    assert below.coef[0].nnz > 0  # alpha_max is the smallest all-zero α
    # The default grid starts at the 99th percentile of the outputs' own all-zero α.
    tops = 2 * np.abs(stats.cross()).max(axis=0) / stats.y_var()
    np.testing.assert_allclose(lasso_path(stats).alphas[0], np.quantile(tops, 0.99), rtol=1e-8)


def test_screening_does_not_change_path(gram_kind: str) -> None:
    x, y, _ = _problem(n_in=60, seed=8)
    stats = _stats(x, y)
    on = lasso_path(stats, LassoPathConfig(n_alphas=10, tol=1e-11, chunk_outputs=2))
    off = lasso_path(stats, LassoPathConfig(n_alphas=10, tol=1e-11, screening=False))
    for a, b in zip(on.coef, off.coef, strict=True):
        np.testing.assert_allclose(a.toarray(), b.toarray(), atol=1e-8)
    np.testing.assert_allclose(on.intercepts, off.intercepts, atol=1e-8)
    np.testing.assert_allclose(on.nmse, off.nmse, atol=1e-8)


def test_width_32k_stays_sparse() -> None:
    rng = np.random.default_rng(9)
    n, width, n_out = 20_000, 32_768, 8
    cols = rng.integers(0, width, size=(n, 20))
    x = sp.csr_matrix(
        (rng.exponential(1.0, n * 20), cols.ravel(), np.arange(0, n * 20 + 1, 20)), shape=(n, width)
    )
    truth = sp.random(width, n_out, density=10 / width, random_state=rng, format="csr")
    y = sp.csr_matrix(np.maximum(x @ truth.toarray(), 0))  # sparse outputs, noisy where active
    y.data = np.maximum(y.data + 0.05 * rng.standard_normal(y.nnz), 0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = _stats(x, y)
    path = lasso_path(stats, LassoPathConfig(n_alphas=10, top_quantile=1.0))
    assert sp.issparse(stats.xtx) and stats.xtx.nnz < 0.01 * width**2
    assert all(sp.issparse(c) and c.shape == (width, n_out) for c in path.coef)
    assert path.coef[0].nnz == 0 and path.coef[-1].nnz > 0 and path.converged.all()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 1024  # a dense 32768² float64 Gram alone would be 8 GiB


def test_refit_support_is_least_squares_on_the_chosen_inputs() -> None:
    from coact.connectors.exact import refit_support

    x, y, _ = _problem(noise=0.3, seed=11)
    stats = _stats(x, y)
    coef = lasso_path(stats, LassoPathConfig(alphas=(0.05,))).coef[0].tocsc()
    refit, intercepts = refit_support(stats, coef)
    xd, yd = x.toarray(), y.toarray()
    for j in range(y.shape[1]):
        support = coef.indices[coef.indptr[j] : coef.indptr[j + 1]]
        design = np.hstack([xd[:, support], np.ones((xd.shape[0], 1))])
        ref = np.linalg.lstsq(design, yd[:, j], rcond=None)[0]
        np.testing.assert_allclose(refit[:, j].toarray().ravel()[support], ref[:-1], atol=1e-8)
        np.testing.assert_allclose(intercepts[j], ref[-1], atol=1e-8)


@pytest.mark.usefixtures("one_thread")
def test_path_agrees_with_sgd_on_a_larger_problem() -> None:
    """The exact solver and the SGD trainer minimise the same objective: per output
    NMSE_j + α‖w_j‖₁ is, summed, n_alive × (the trainer's mean NMSE + (α/n_alive)‖W‖₁)."""
    from coact.connectors.train import ConnectorTrainConfig, split_rows, train_connector

    x, y, truth = _problem(n=20_000, n_in=200, n_out=12, noise=0.3, seed=12)
    train, held = split_rows(x.shape[0], 0.1, 0, block=100)
    stats = _stats(x[train], y[train])
    alpha = 0.02
    exact = lasso_path(stats, LassoPathConfig(alphas=(alpha,), tol=1e-10))
    config = ConnectorTrainConfig(
        alpha=alpha / y.shape[1], lr=1e-2, batch_tokens=512, epochs=40, block_tokens=100,
        progress=False,
    )  # fmt: skip
    sgd = train_connector(x, y, config)
    np.testing.assert_array_equal(sgd.heldout_rows, held)
    w_sgd = sgd.connector.first_layer_weight().numpy().T
    w_exact = exact.coef[0].toarray()
    assert np.abs(w_sgd - w_exact).max() < 0.05  # Adam hovers near zero instead of at it
    assert np.all(np.abs(w_sgd[w_exact == 0]) < 0.05)  # no weight the exact path zeroes
    big = np.abs(w_exact) > 0.1
    assert np.all(np.sign(w_sgd[big]) == np.sign(w_exact[big]))
    exact_held = heldout_nmse(exact, _stats(x[held], y[held]))[0]
    np.testing.assert_allclose(sgd.heldout_nmse, exact_held, atol=5e-3)
    assert np.all((w_exact != 0)[np.abs(truth) > 0.5])  # the clearly planted inputs are found


def _lasso_objective(g: np.ndarray, c: np.ndarray, w: np.ndarray, lam: float) -> float:
    return float(0.5 * w @ g @ w - c @ w + lam * np.abs(w).sum())


def test_newton_jump_never_raises_the_objective_on_nearly_collinear_inputs() -> None:
    """The sign-fixed solve on a nearly singular Gram can land far off; the jump must then
    be refused (on SmolLM2 codes one output's path diverged before this guard)."""
    from coact.connectors._cd import _newton

    rng = np.random.default_rng(0)
    lam, n = 0.01, 6
    refused = 0
    for _ in range(300):
        base = rng.exponential(1, (n, 200)) * (rng.random((n, 200)) < 0.3)
        base[1] = base[0] * (1 + 1e-7 * rng.standard_normal(200))  # near copies of input 0
        base[2] = base[0] * (1 + 1e-7 * rng.standard_normal(200))
        g = np.cov(base, bias=True)
        c = g @ rng.normal(0, 1, n) + 0.01 * rng.standard_normal(n)
        w = np.abs(rng.normal(0, 1, n)) * rng.choice([-1, 1], n)
        start = w.copy()
        r = c - g @ w
        before = _lasso_objective(g, c, w, lam)
        _newton(g, r, w, np.arange(n), n, lam)
        assert _lasso_objective(g, c, w, lam) <= before + 1e-12 * abs(before)
        scale = np.abs(c).max() + np.abs(g).max() * np.abs(w).sum()  # rounding of G w
        np.testing.assert_allclose(r, c - g @ w, atol=1e-7 * scale)
        refused += np.array_equal(w, start)
    assert refused < 300  # most jumps are taken: the guard refuses only bad ones


def test_newton_jump_stops_where_an_input_leaves() -> None:
    """Input 1 holds the wrong sign and must leave; input 2 must stay. The solve with the
    start's signs fixed flips both, so dropping every flip and solving again loses input 2
    and raises the objective (a refused jump: on SmolLM2 codes one output then crawled
    for 400 sweeps); stopping where input 1 reaches zero and solving again lands on the
    optimum in one jump."""
    from coact.connectors._cd import _newton

    lam = 0.05
    g = np.array([[1.0, 0.95, 0.0], [0.95, 1.0, -0.26], [0.0, -0.26, 1.0]])
    best = np.array([0.7, 0.0, 0.1])  # the optimum, by its KKT conditions:
    c = g @ best + np.array([lam, 0.5 * lam, lam])  # r = c − G w*: λ·sign on the support, < λ off
    w = np.array([0.63, 0.02, 0.11])  # the start: all positive
    orthant = np.linalg.solve(g, c - lam)  # the minimiser with those signs fixed
    assert orthant[0] > 0 and orthant[1] < 0 and orthant[2] < 0  # flips inputs 1 and 2
    drop_all = np.array([(c[0] - lam) / g[0, 0], 0.0, 0.0])
    before = _lasso_objective(g, c, w, lam)
    assert _lasso_objective(g, c, drop_all, lam) > before
    res = c - g @ w
    _newton(g, res, w, np.arange(3), 3, lam)
    np.testing.assert_allclose(w, best, atol=1e-12)
    np.testing.assert_allclose(res, c - g @ w, atol=1e-12)
    assert _lasso_objective(g, c, w, lam) < before


@pytest.mark.parametrize("quadratic", ["dense", "sparse"])
@pytest.mark.parametrize("map_kind", ["dense", "sparse"])
def test_mse_from_sums_is_the_brute_force_mse(
    quadratic: str, map_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-output MSE of ŷ = Xw + b from the Gram sums alone equals averaging (ŷ − y)² over
    tokens, for dense and sparse maps and both ways of forming wᵀXᵀXw."""
    if quadratic == "sparse":
        monkeypatch.setattr(exact, "DENSE_QUADRATIC_MAX", 0)
    x, y, _ = _problem()
    rng = np.random.default_rng(4)
    outputs = np.array([3, 0, 2])
    w = rng.standard_normal((x.shape[1], len(outputs))) * (rng.random((x.shape[1], 3)) < 0.3)
    b = rng.standard_normal(len(outputs))
    coef = sp.csc_matrix(w) if map_kind == "sparse" else w
    got = exact.mse(_stats(x, y), coef, b, outputs)
    brute = ((x.toarray() @ w + b - y.toarray()[:, outputs]) ** 2).mean(axis=0)
    np.testing.assert_allclose(got, brute, rtol=1e-9)
