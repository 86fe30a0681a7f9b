"""Residual composition: a planted sparse mix is recovered, the variance shares add up to
R², and the block's identity survives exact SAEs on real tiny models."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from coact.block.composition import (
    CompositionConfig,
    CompositionSites,
    compose,
    variance_shares,
)
from coact.block.decoded import CompositionConnector, decoded_check, least_squares_connector
from coact.codes.store import CodeStore
from coact.connectors.exact import GramStats, LassoPathConfig, linear_fit
from coact.connectors.train import split_rows
from coact.errors import CoactError
from coact.models.load import load_model
from coact.models.sites import Site
from coact.models.tracing import capture
from tests.exact_saes import exact_sae
from tests.planted_model import random_tokens

N, CTX, W = 6000, 20, 8
SOURCES = ("resid_pre.1", "attn_out.1", "mlp_out.1")
TARGET = "resid_pre.2"
SCALE = (1.0, 0.8, 1.5)  # identity block of each source: y_j gets SCALE[s]·x_s[j]
CROSS = {0: (1, 3, 1.0), 5: (2, 1, 1.0), 6: (0, 2, -1.0)}  # y_j += w·x_s[k]: (s, k, w)


def _truth() -> dict[int, dict[tuple[int, int], float]]:
    """Per output j < W: {(source, in feature): weight}. Output W is dead."""
    truth = {j: {(s, j): SCALE[s] for s in range(3)} for j in range(W)}
    for j, (s, k, w) in CROSS.items():
        truth[j][(s, k)] = w
    return truth


def _planted() -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    xs = [(rng.random((N, W)) < 0.25) * rng.uniform(0.5, 1.5, (N, W)) for _ in SOURCES]
    y = np.zeros((N, W + 1))
    for j, terms in _truth().items():
        y[:, j] = sum(w * xs[s][:, k] for (s, k), w in terms.items())
    return xs, y


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> CodeStore:
    xs, y = _planted()
    sites = {**dict.fromkeys(SOURCES, W), TARGET: W + 1}
    writer = CodeStore.open_for_writing(
        tmp_path_factory.mktemp("codes"), fingerprint="c", sites=sites
    )
    for shard in range(3):
        rows = np.arange(shard * N // 3, (shard + 1) * N // 3)
        tokens = {"context": rows // CTX, "position": rows % CTX + 1, "token_id": rows % 7,
                  "doc": rows // CTX}  # fmt: skip
        codes = {slug: sp.csr_matrix(x[rows]) for slug, x in zip(SOURCES, xs, strict=True)}
        writer.write_shard(shard, tokens, {**codes, TARGET: sp.csr_matrix(y[rows])})
    return CodeStore.open(writer.directory)


SITES = CompositionSites.of_layer(1)
CONFIG = CompositionConfig(path=LassoPathConfig(n_alphas=15), progress=False)


@pytest.fixture(scope="module")
def result(store, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("composition")
    return compose(store, SITES, out, CONFIG), out


def _split() -> tuple[np.ndarray, np.ndarray]:
    return split_rows(N, CONFIG.heldout_fraction, CONFIG.seed, np.arange(N) // CTX)


def test_writes_tables_and_headline(result) -> None:
    summary, out = result
    for name in ("composition", "composition_weights", "composition_sweep"):
        assert (out / f"{name}.parquet").is_file()
    assert json.loads((out / "composition.json").read_text()) == summary.to_dict()
    sweep = pl.read_parquet(out / "composition_sweep.parquet")
    assert sweep.height == 15 and sweep["chosen"].sum() == 1
    assert sweep.filter(pl.col("chosen"))["alpha"].item() == summary.alpha
    assert summary.sources == ["resid_pre[1]", "attn_out[1]", "mlp_out[1]"]
    assert summary.target == "resid_pre[2]" and (summary.alive, summary.dead) == (W, 1)
    assert summary.tokens_train + summary.tokens_heldout == N
    assert summary.r2_ls == pytest.approx(1.0, abs=1e-9)
    assert set(summary.variance_share_ls) == set(summary.sources)
    assert sum(summary.variance_share_ls.values()) == pytest.approx(1.0, abs=1e-9)


def test_recovers_planted_support_and_coefficients(result) -> None:
    summary, out = result
    weights = pl.read_parquet(out / "composition_weights.parquet")
    assert set(weights["target_site"].unique()) == {"resid_pre[2]"}
    names = ["resid_pre[1]", "attn_out[1]", "mlp_out[1]"]
    for j, terms in _truth().items():
        mine = weights.filter(pl.col("out_feature") == j)
        got = {
            (names.index(r["source_site"]), r["in_feature"]): r for r in mine.iter_rows(named=True)
        }
        assert set(got) == set(terms), f"output {j}"
        for term, w in terms.items():
            assert got[term]["weight_refit"] == pytest.approx(w, abs=1e-8)
            assert abs(got[term]["weight"]) < abs(w) + 1e-12  # L1 shrinks, the refit undoes it
    assert weights.filter(pl.col("out_feature") == W).height == 0  # dead: no weights
    features = pl.read_parquet(out / "composition.parquet")
    assert features["status"].to_list() == ["alive"] * W + ["dead"]
    alive = features.head(W)
    for column in ("r2_ls", "r2_refit", "r2_ls_train", "r2_refit_train"):
        np.testing.assert_allclose(alive[column].to_numpy(), 1.0, atol=1e-9)
    r2_sparse = alive["r2_sparse"].to_numpy()
    assert ((r2_sparse > 0) & (r2_sparse < 1)).all()  # the L1 weights are shrunk
    assert features.row(W, named=True)["r2_ls"] is None or np.isnan(features["r2_ls"][W])
    expected = {k: [sum(1 for s, _ in _truth()[j] if s == i) for j in range(W)] + [0]
                for i, k in enumerate(("resid_pre", "attn_out", "mlp_out"))}  # fmt: skip
    for key, counts in expected.items():
        assert features[f"weights_{key}"].to_list() == counts
    assert summary.weights_per_output == pytest.approx((3 * W + len(CROSS)) / W)


def test_variance_shares_equal_the_planted_ones(store, result) -> None:
    """cov(ŷ_s, y)/var(y) with the planted weights, by brute force on the training tokens
    (and, for least squares, on the held-out ones)."""
    _, out = result
    xs, y = _planted()
    features = pl.read_parquet(out / "composition.parquet")
    for rows, kinds in zip(_split(), (("ls", "refit"), ("ls_heldout",)), strict=True):
        for s, key in enumerate(("resid_pre", "attn_out", "mlp_out")):
            expected = []
            for j, terms in _truth().items():
                part = sum(w * xs[t][rows, k] for (t, k), w in terms.items() if t == s)
                yj = y[rows, j]
                expected.append(np.mean((part - part.mean()) * (yj - yj.mean())) / yj.var())
            for kind in kinds:
                got = features[f"share_{kind}_{key}"].to_numpy()
                np.testing.assert_allclose(got[:W], expected, atol=1e-9)
                assert np.isnan(got[W])
    # Independent sources with identity blocks: shares near SCALE²·var(x)/var(y) (output 1
    # has no cross term; every source's codes have the same distribution).
    share = [features[f"share_ls_{k}"][1] for k in ("resid_pre", "attn_out", "mlp_out")]
    np.testing.assert_allclose(share, np.square(SCALE) / np.square(SCALE).sum(), atol=0.05)


def test_hand_computed_variance_shares() -> None:
    """x1, x2 centred to (1, −1, 1, −1) and (1, 1, −1, −1): uncorrelated, variance 1 each;
    y = x1 + 2·x2 has variance 5, so the shares are 1/5 and 4/5."""
    x = np.array([[2.0, 2.0], [0.0, 2.0], [2.0, 0.0], [0.0, 0.0]])
    y = x[:, :1] + 2 * x[:, 1:]
    stats = GramStats.empty(2, 1).add(sp.csr_matrix(x), sp.csr_matrix(y))
    w, _ = linear_fit(stats)
    np.testing.assert_allclose(w.ravel(), [1.0, 2.0], atol=1e-9)
    shares = variance_shares(stats, w, [0, 1, 2])
    np.testing.assert_allclose(shares.ravel(), [0.2, 0.8], atol=1e-9)
    sparse = variance_shares(stats, sp.csr_matrix(w), [0, 1, 2])
    np.testing.assert_allclose(sparse, shares, atol=1e-12)


def test_shares_add_up_to_r2_of_least_squares_against_numpy() -> None:
    """Correlated sources and a noisy target: Σ_s share_s = R² of least squares with an
    intercept, each share matching numpy's brute force cov(X_s w_s, y)/var(y)."""
    rng = np.random.default_rng(3)
    n, widths = 500, (3, 4, 2)
    common = rng.normal(size=(n, 1))
    x = np.maximum(rng.normal(size=(n, sum(widths))) + common, 0)  # sparse-ish, correlated
    y = x @ rng.normal(size=(sum(widths), 3)) + np.sin(3 * x[:, :3]) + rng.normal(size=(n, 3))
    offsets = np.concatenate([[0], np.cumsum(widths)])
    stats = GramStats.empty(x.shape[1], 3).add(sp.csr_matrix(x), sp.csr_matrix(y))
    w, b = linear_fit(stats)
    shares = variance_shares(stats, w, offsets)

    design = np.hstack([x, np.ones((n, 1))])
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(w, coef[:-1], atol=1e-8)
    residual = y - design @ coef
    r2 = 1 - (residual**2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    brute = np.array(
        [
            [np.cov(x[:, lo:hi] @ coef[lo:hi, j], y[:, j], bias=True)[0, 1] / y[:, j].var()
             for j in range(3)]
            for lo, hi in pairwise(offsets)
        ]
    )  # fmt: skip
    np.testing.assert_allclose(shares, brute, atol=1e-9)
    np.testing.assert_allclose(shares.sum(0), r2, atol=1e-9)
    assert (shares.sum(0) < 0.999).all()  # a real test: the fit is not perfect
    # Held to the support of a sparse fit, the refit's shares still add up to its R².
    support = sp.csc_matrix(np.where(np.abs(w) > 0.3, w, 0.0))
    from coact.connectors.exact import mse, refit_support

    refit, refit_b = refit_support(stats, support)
    r2_refit = 1 - mse(stats, refit, refit_b) / stats.y_var()
    np.testing.assert_allclose(variance_shares(stats, refit, offsets).sum(0), r2_refit, atol=1e-9)
    assert b.shape == (3,)


def test_a_finished_result_is_reused(store, result) -> None:
    summary, out = result
    stamp = (out / "composition_weights.parquet").stat().st_mtime_ns
    assert compose(store, SITES, out, CONFIG) == summary
    assert (out / "composition_weights.parquet").stat().st_mtime_ns == stamp


def test_connector_loads_and_predicts_the_refit(store, result) -> None:
    _, out = result
    connector = CompositionConnector.load(out)
    assert connector.sources == tuple(Site.parse(s) for s in SOURCES)
    assert connector.layer == 1 and connector.widths == (W, W, W)
    xs, y = _planted()
    np.testing.assert_allclose(connector.predict(xs)[:, :W], y[:, :W], atol=1e-8)


def test_bad_sites_are_one_clear_error(store, tmp_path) -> None:
    missing = r"resid_pre\.4, attn_out\.4, mlp_out\.4, resid_pre\.5 are not in the code"
    with pytest.raises(CoactError, match=missing):
        compose(
            store, CompositionSites.of_layer(4), tmp_path / "c", CompositionConfig(progress=False)
        )
    assert not (tmp_path / "c").exists()
    with pytest.raises(CoactError, match="also one of its sources"):
        CompositionSites.of_layer(1, target="mlp_out[1]")


# ------------------------------------------------------- the decoded check, real models


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt-neox", "tiny-gpt-neox-sequential"])
def traced(request) -> tuple[str, dict[Site, torch.Tensor], dict[Site, object]]:
    lm = load_model(request.param)
    layer = 1
    sites = [Site("resid_pre", layer), Site("attn_out", layer), Site("mlp_out", layer),
             Site("resid_pre", layer + 1)]  # fmt: skip
    acts = capture(lm, random_tokens(40, 24, seed=5), sites)
    saes = {s: exact_sae(lm.adapter.d_model, s) for s in sites}
    return request.param, acts, saes


def _codes(acts, saes, rows: slice) -> dict[Site, np.ndarray]:
    return {
        s: saes[s].encode(a[rows, 1:].reshape(-1, a.shape[-1])).double().numpy()
        for s, a in acts.items()
    }


def test_decoded_identity_holds_through_exact_saes(traced) -> None:
    """(ii) raw identity ≈ 0 checks the sites; (i) and (iv) ≈ 0 as the SAEs lose nothing;
    (iii) ≈ 0 as least squares is linear in its target: the fits of ReLU(y) and ReLU(−y)
    differ by the fit of y, which is the exact linear identity of the sources' codes."""
    name, acts, saes = traced
    sources = [Site("resid_pre", 1), Site("attn_out", 1), Site("mlp_out", 1)]
    target = Site("resid_pre", 2)
    train = _codes(acts, saes, slice(0, 32))
    connector = least_squares_connector({s: train[s] for s in sources}, target, train[target])
    held = {s: a[32:] for s, a in acts.items()}
    table = decoded_check(held, saes, connector)
    fvu = dict(table.select("check", "fvu").iter_rows())
    assert table["tokens"][0] == 8 * 23
    assert set(fvu) == {"identity_raw", "identity_decoded", "composition_decoded", "target_sae"}
    assert fvu["identity_raw"] < 1e-10, name
    assert fvu["identity_decoded"] < 1e-10, name
    assert fvu["target_sae"] < 1e-12, name
    assert fvu["composition_decoded"] < 1e-6, name
    # A connector that ignores the attention source cannot give the stream back.
    broken = least_squares_connector({s: train[s] for s in sources[::2]}, target, train[target])
    worse = dict(decoded_check(held, saes, broken).select("check", "fvu").iter_rows())
    assert worse["composition_decoded"] > 1e-3 and worse["identity_raw"] < 1e-10


def test_decoded_check_names_missing_sites(traced) -> None:
    _, acts, saes = traced
    partial = {s: a for s, a in acts.items() if s.kind != "attn_out"}
    with pytest.raises(CoactError, match=r"no activations for attn_out\[1\]"):
        decoded_check(partial, saes, None, layer=1)
    table = decoded_check(acts, saes, None, layer=1)
    assert "composition_decoded" not in table["check"].to_list()


def test_compose_on_tiny_model_codes_feeds_the_decoded_check(traced, tmp_path) -> None:
    """The stage on each tiny model's codes, its chosen connector loaded and decoded."""
    _, acts, saes = traced
    codes = _codes(acts, saes, slice(0, 32))
    n = next(iter(codes.values())).shape[0]
    writer = CodeStore.open_for_writing(
        tmp_path / "codes", fingerprint="tiny", sites={s.slug: c.shape[1] for s, c in codes.items()}
    )
    rows = np.arange(n)
    tokens = {"context": rows // 23, "position": rows % 23 + 1, "token_id": rows % 7,
              "doc": rows // 23}  # fmt: skip
    writer.write_shard(0, tokens, {s.slug: sp.csr_matrix(c) for s, c in codes.items()})
    summary = compose(writer.directory, SITES, tmp_path / "o", CompositionConfig(progress=False))
    assert 0 < summary.r2_ls_train <= 1 and summary.weights_per_output > 0
    connector = CompositionConnector.load(tmp_path / "o")
    table = decoded_check({s: a[32:] for s, a in acts.items()}, saes, connector)
    fvu = dict(table.select("check", "fvu").iter_rows())
    assert np.isfinite(fvu["composition_decoded"]) and fvu["composition_decoded"] < 1
    assert fvu["identity_decoded"] < 1e-10
