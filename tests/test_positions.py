"""The positions stage: context summaries by hand, planted previous-token and position-local
attention, brute-force least squares, reuse and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from coact.block.position_fits import PositionsConfig, context_summaries, shift_operator
from coact.block.positions import positions
from coact.codes.store import CodeStore
from coact.connectors.train import split_rows
from coact.errors import CoactError
from coact.linearity.table import LinearityConfig
from coact.models.sites import SitePair

pytestmark = pytest.mark.usefixtures("one_thread")

LINEARITY = LinearityConfig(tau=1e-3, form="fvu", n_boot=200)


# -- summaries by hand --------------------------------------------------------------------


def _tiny_table() -> tuple[pl.DataFrame, sp.csr_matrix]:
    """Context 5 holds positions 1–4, context 7 holds 1, 2 and 4 (3 missing); BOS (0) is
    never stored. Row r's codes are (r + 1, 0) for even r, (0, 10(r + 1)) for odd r."""
    tokens = pl.DataFrame(
        {"context": [5, 5, 5, 5, 7, 7, 7], "position": [1, 2, 3, 4, 1, 2, 4]},
        schema={"context": pl.Int32, "position": pl.Int32},
    )
    x = np.zeros((7, 2))
    for r in range(7):
        x[r, r % 2] = (r + 1) * (1 if r % 2 == 0 else 10)
    return tokens, sp.csr_matrix(x)


def test_summaries_by_hand() -> None:
    tokens, x = _tiny_table()
    config = PositionsConfig(decay=0.5, window=2)
    got = context_summaries(x, tokens, config)
    assert set(got) == {"previous", "decayed"} and all(sp.isspmatrix_csr(m) for m in got.values())
    d = x.toarray()
    zero = np.zeros(2)
    previous = [zero, d[0], d[1], d[2], zero, d[4], zero]  # BOS, context start, missing t−1
    # decay^(m−1)·x[t−m] for m = 2, 3: weights 0.5 and 0.25
    decayed = [zero, zero, 0.5 * d[0], 0.5 * d[1] + 0.25 * d[0], zero, zero]
    decayed.append(0.5 * d[5] + 0.25 * d[4])  # position 4 of context 7: 2 and 1, not 3
    np.testing.assert_array_equal(got["previous"].toarray(), np.array(previous))
    np.testing.assert_array_equal(got["decayed"].toarray(), np.array(decayed))
    assert got["previous"].nnz == 4 and got["decayed"].nnz == 5  # no explicit zeros

    # Row order does not matter: the same values follow their tokens.
    order = np.array([6, 2, 0, 4, 1, 5, 3])
    shuffled = context_summaries(x[order], tokens[order], config)
    np.testing.assert_array_equal(shuffled["previous"].toarray(), np.array(previous)[order])
    np.testing.assert_array_equal(shuffled["decayed"].toarray(), np.array(decayed)[order])


def test_shift_operator_rejects_repeated_positions() -> None:
    with pytest.raises(CoactError, match="repeats"):
        shift_operator(np.array([0, 0]), np.array([1, 1]), {1: 1.0})


# -- planted attention --------------------------------------------------------------------


def _planted_result(kind: str, tmp_path) -> tuple[dict, pl.DataFrame]:
    from coact.codes.collect import CollectConfig, collect_codes
    from coact.codes.corpus import Contexts
    from tests.planted_model import planted_attention, random_tokens

    plant = planted_attention(kind)  # type: ignore[arg-type]
    tokens = random_tokens(160, 24, seed=1)
    contexts = Contexts(tokens, torch.zeros_like(tokens, dtype=torch.int32), "planted", kind, 160)
    site_in, site_out = plant.sites
    store = collect_codes(
        plant.lm, contexts, {site_in: plant.sae_in, site_out: plant.sae_out}, tmp_path / "codes",
        CollectConfig(forward_batch=32, shard_contexts=80),
    )  # fmt: skip
    # The store's out codes are the rule applied to its in codes, at the stored positions.
    x, y = store.read_site(site_in.slug).toarray(), store.read_site(site_out.slug).toarray()
    codes_in = torch.zeros(160, 24, x.shape[1])
    codes_in[:, 1:] = torch.from_numpy(x).reshape(160, 23, -1)
    expected = plant.rule(codes_in)[:, 1:].reshape(-1, y.shape[1]).numpy()
    np.testing.assert_allclose(y, expected, atol=1e-4)
    config = PositionsConfig(heldout_fraction=0.25, linearity=LINEARITY, progress=False)
    summary = positions(store, SitePair(site_in, site_out), tmp_path / "positions", config)
    return summary, pl.read_parquet(tmp_path / "positions" / "positions.parquet")


@pytest.fixture(scope="module")
def previous(tmp_path_factory) -> tuple[dict, pl.DataFrame]:
    return _planted_result("previous", tmp_path_factory.mktemp("previous"))


@pytest.fixture(scope="module")
def current(tmp_path_factory) -> tuple[dict, pl.DataFrame]:
    return _planted_result("current", tmp_path_factory.mktemp("current"))


def test_previous_token_copy_needs_context(previous) -> None:
    summary, table = previous
    alive = table.filter(pl.col("status") != "dead")
    assert alive.height == table.height == 32
    assert (alive["gain_fvu"] > 0.5).all(), alive["gain_fvu"].min()
    assert (alive["mse_context"] / alive["variance"] < 1e-6).all()  # the copy is exact
    assert set(alive["verdict"]) == {"needs_context"} and set(alive["status"]) == {"needs_context"}
    assert set(alive["carrier"]) == {"previous"}
    # The previous token alone carries it; the decayed summary alone adds next to nothing.
    np.testing.assert_allclose(alive["gain_previous_alone_fvu"], alive["gain_fvu"], atol=1e-6)
    assert (alive["gain_decayed_alone_fvu"] < 0.1 * alive["gain_fvu"]).all()
    assert summary.share.percent_same_position == 0.0 and summary.share.needs_context == 32
    assert summary.share.confident_needs_context == 32 and summary.carriers["previous"] == 32
    assert summary.share.percent_same_position_confident == 0.0
    top = summary.top
    assert len(top) == 10 and top[0]["gain_fvu"] == pytest.approx(alive["gain_fvu"].max())
    assert [t["gain_fvu"] for t in top] == sorted((t["gain_fvu"] for t in top), reverse=True)


def test_position_local_attention_is_same_position(current) -> None:
    summary, table = current
    alive = table.filter(pl.col("status") != "dead")
    assert alive.height == 32
    assert (alive["gain_fvu"].abs() < 1e-6).all(), alive["gain_fvu"].abs().max()
    assert set(alive["verdict"]) == {"same_position"}
    assert alive["carrier"].null_count() == 32
    assert summary.share.percent_same_position == 100.0
    assert summary.share.percent_same_position_confident == 100.0
    assert summary.tokens == summary.tokens_train + summary.tokens_heldout == 160 * 23


# -- brute force, reuse, bad input ----------------------------------------------------------

N_CTX, LEN, N_IN, N_OUT = 60, 12, 5, 4


def _synthetic_store(directory, n_contexts: int = N_CTX) -> CodeStore:
    """Sparse inputs; outputs: 0 reads the current token, 1 the previous one, 2 two back,
    3 never active (dead). Positions 1..LEN per context, BOS not stored."""
    rng = np.random.default_rng(3)
    n = n_contexts * LEN
    x = (rng.random((n, N_IN)) < 0.3) * rng.uniform(0.5, 1.5, (n, N_IN))

    def back(m: int) -> np.ndarray:  # x[t − m], zero before the context starts
        shifted = np.vstack([np.zeros((m, N_IN)), x[:-m]])
        return shifted * (np.arange(n) % LEN >= m)[:, None]

    y = np.zeros((n, N_OUT))
    y[:, 0] = x[:, 0] + 0.5 * x[:, 1]
    y[:, 1] = np.maximum(back(1)[:, 2] - 0.3 * x[:, 3], 0)
    y[:, 2] = back(2)[:, 4] + 0.2 * rng.random(n) * (x[:, 0] > 0)
    writer = CodeStore.open_for_writing(
        directory, fingerprint="s", sites={"resid_pre.2": N_IN, "attn_out.2": N_OUT}
    )
    rows = np.arange(n)
    tokens = {
        "context": rows // LEN,
        "position": rows % LEN + 1,
        "token_id": rows % 7,
        "doc": rows // LEN,
    }
    writer.write_shard(0, tokens, {"resid_pre.2": sp.csr_matrix(x), "attn_out.2": sp.csr_matrix(y)})
    return CodeStore.open(directory)


PAIR = SitePair.of("resid_pre[2]", "attn_out[2]")
SYNTHETIC = PositionsConfig(heldout_fraction=0.2, window=3, linearity=LINEARITY, progress=False)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[CodeStore, dict, pl.DataFrame, object]:
    store = _synthetic_store(tmp_path_factory.mktemp("codes"))
    out = tmp_path_factory.mktemp("positions")
    summary = positions(store, PAIR, out, SYNTHETIC)
    return store, summary, pl.read_parquet(out / "positions.parquet"), out


def _ridge_heldout(
    z: np.ndarray, y: np.ndarray, fit: np.ndarray, held: np.ndarray, rel: float
) -> np.ndarray:
    """Per-output MSE on `held` of ridge on `fit` (intercept unpenalised), λ = rel × the
    mean variance of z's columns on `fit`; rel = 0 is minimum-norm least squares."""
    if rel == 0:  # least squares with an intercept column, minimum norm where singular
        design = np.hstack([z, np.ones((len(z), 1))])
        w = np.linalg.lstsq(design[fit], y[fit], rcond=None)[0]
        return ((design[held] @ w - y[held]) ** 2).mean(axis=0)
    mu, ybar = z[fit].mean(axis=0), y[fit].mean(axis=0)
    zc, yc = z[fit] - mu, y[fit] - ybar
    lam = rel * zc.var(axis=0).mean()
    # ‖Zc w − Yc‖²/n + λ‖w‖² as one stacked least-squares problem (no normal equations)
    stacked = np.vstack([zc, np.sqrt(len(fit) * lam) * np.eye(z.shape[1])])
    padded = np.vstack([yc, np.zeros((z.shape[1], y.shape[1]))])
    w = np.linalg.lstsq(stacked, padded, rcond=None)[0]
    return (((z[held] - mu) @ w + ybar - y[held]) ** 2).mean(axis=0)


def _designs(store: CodeStore, config: PositionsConfig) -> tuple[dict[str, np.ndarray], np.ndarray]:
    x, y = store.read_site("resid_pre.2"), store.read_site("attn_out.2").toarray()
    parts = context_summaries(x, store.read_tokens(), config)
    dense = {"current": x.toarray(), **{k: v.toarray() for k, v in parts.items()}}
    designs = {
        "same": dense["current"],
        "context": np.hstack(list(dense.values())),
        "previous": np.hstack([dense["current"], dense["previous"]]),
        "decayed": np.hstack([dense["current"], dense["decayed"]]),
    }
    return designs, y


def test_least_squares_without_ridge_is_brute_force_lstsq(synthetic, tmp_path) -> None:
    """With one candidate, λ = 0: the fits are plain least squares on all training contexts."""
    store = synthetic[0]
    config = PositionsConfig(**{**SYNTHETIC.__dict__, "ridge": (0.0,)})
    summary = positions(store, PAIR, tmp_path / "ls", config)
    table = pl.read_parquet(tmp_path / "ls" / "positions.parquet")
    designs, y = _designs(store, config)
    train, held = split_rows(len(y), 0.2, 0, store.read_tokens()["context"].to_numpy())
    for name, column in (
        ("same", "mse_same"),
        ("context", "mse_context"),
        ("previous", "mse_with_previous"),
        ("decayed", "mse_with_decayed"),
    ):
        expected = _ridge_heldout(designs[name], y, train, held, 0.0)
        np.testing.assert_allclose(table[column].to_numpy()[:3], expected[:3], atol=1e-9)
    assert summary.ridge.validation_tokens == 0
    assert (table["ridge_same"] == 0).all() and (table["ridge_context"] == 0).all()


def test_fits_are_brute_force_ridge_at_the_validated_lambda(synthetic) -> None:
    """Per fit and output, λ is the candidate with the lowest validation NMSE (validation: a
    fifth of the training contexts), refitted on every training context; the held-out
    errors, gains and verdicts follow from those fits."""
    store, summary, table, _ = synthetic
    designs, y = _designs(store, SYNTHETIC)
    groups = store.read_tokens()["context"].to_numpy()
    train, held = split_rows(len(y), 0.2, 0, groups)
    a, b = split_rows(len(train), SYNTHETIC.validation_fraction, SYNTHETIC.seed + 2, groups[train])
    fit, val = train[a], train[b]
    alive = [0, 1, 2]  # 3 is dead
    grid = np.array(SYNTHETIC.ridge)
    chosen = {}
    for name in ("same", "context"):
        nmse = np.stack(
            [_ridge_heldout(designs[name], y, fit, val, rel)[alive] for rel in grid]
        ) / y[val][:, alive].var(axis=0)
        chosen[name] = grid[np.argmin(nmse, axis=0)]
        np.testing.assert_allclose(table[f"ridge_{name}"].to_numpy()[alive], chosen[name])
        # the dead output takes the candidate best on average over the others
        assert table[f"ridge_{name}"][3] == grid[np.argmin(nmse.mean(axis=1))]
        counts = summary.ridge.outputs_per_candidate[name]
        assert sum(counts.values()) == N_OUT
        np.testing.assert_allclose(
            summary.ridge.validation_nmse_per_candidate[name], nmse.mean(axis=1), rtol=1e-6
        )
    assert summary.ridge.validation_tokens == len(val)

    def refit(name: str, rel: np.ndarray) -> np.ndarray:
        return np.array(
            [
                _ridge_heldout(designs[name], y, train, held, r)[j]
                for j, r in zip(alive, rel, strict=True)
            ]
        )

    expected = {
        "mse_same": refit("same", chosen["same"]),
        "mse_context": refit("context", chosen["context"]),
        "mse_with_previous": refit("previous", chosen["context"]),
        "mse_with_decayed": refit("decayed", chosen["context"]),
    }
    for column, values in expected.items():
        np.testing.assert_allclose(table[column].to_numpy()[alive], values, rtol=1e-6, atol=1e-9)
    assert summary.tokens_heldout == len(held) and summary.inputs_context == 3 * N_IN
    # Known answers: 0 same-position, 1 the previous token, 2 further back, 3 dead.
    assert table["status"].to_list() == [
        "same_position", "needs_context", "needs_context", "dead",
    ]  # fmt: skip
    assert table["verdict"].to_list()[3] == "dead" and summary.share.dead == 1
    assert table["carrier"].to_list() == [None, "previous", "decayed", None]
    gain = table["gain"].to_numpy()
    np.testing.assert_allclose(gain, table["mse_same"] - table["mse_context"])
    assert (table["gain_low"] <= table["gain_high"]).fill_null(True).all()


def test_ridge_keeps_a_weak_earlier_position_signal_that_least_squares_overfits(
    tmp_path,
) -> None:
    """A planted weak read of the previous token among many inputs and few tokens: least
    squares with the summaries overfits more than it gains, so it calls most features
    same-position; the validated ridge recovers that they need context."""
    rng = np.random.default_rng(5)
    n_ctx, length, n_in, n_out = 30, 16, 40, 12
    n = n_ctx * length
    x = (rng.random((n, n_in)) < 0.15) * rng.uniform(0.5, 1.5, (n, n_in))
    previous = np.vstack([np.zeros((1, n_in)), x[:-1]]) * (np.arange(n) % length >= 1)[:, None]
    y = x[:, :n_out] + 0.6 * previous[:, n_out : 2 * n_out] + 0.6 * rng.standard_normal((n, n_out))
    writer = CodeStore.open_for_writing(
        tmp_path / "codes", fingerprint="weak", sites={"resid_pre.2": n_in, "attn_out.2": n_out}
    )
    rows = np.arange(n)
    tokens = {"context": rows // length, "position": rows % length + 1, "token_id": rows % 7,
              "doc": rows // length}  # fmt: skip
    writer.write_shard(0, tokens, {"resid_pre.2": sp.csr_matrix(x), "attn_out.2": sp.csr_matrix(y)})
    store = CodeStore.open(tmp_path / "codes")
    base = {**SYNTHETIC.__dict__, "linearity": LinearityConfig(tau=0.0, form="fvu", n_boot=100)}
    plain = positions(store, PAIR, tmp_path / "ls", PositionsConfig(**{**base, "ridge": (0.0,)}))
    ridged = positions(store, PAIR, tmp_path / "ridge", PositionsConfig(**base))
    assert ridged.ridge.outputs_per_candidate["context"]["0"] < n_out
    assert plain.share.needs_context <= n_out // 2 < ridged.share.needs_context
    assert ridged.heldout_nmse_context < ridged.heldout_nmse_same
    assert plain.heldout_nmse_context > ridged.heldout_nmse_context


def test_output_chunks_and_sparse_gram_give_the_same_table(
    synthetic, tmp_path, monkeypatch
) -> None:
    """Chunks of outputs, and the sparse Gram used above DENSE_GRAM inputs, change nothing."""
    import coact.block.position_fits as module

    store, _, table, _ = synthetic
    config = PositionsConfig(**{**SYNTHETIC.__dict__, "chunk_outputs": 1})
    summary = positions(store, PAIR, tmp_path / "chunks", config)
    assert summary.output_chunks == N_OUT
    monkeypatch.setattr(module, "DENSE_GRAM", 0)
    positions(store, PAIR, tmp_path / "sparse", SYNTHETIC)
    for name in ("chunks", "sparse"):
        again = pl.read_parquet(tmp_path / name / "positions.parquet")
        for column in ("mse_same", "mse_context", "mse_with_previous", "gain_low", "gain_high"):
            np.testing.assert_allclose(again[column], table[column], rtol=1e-9, atol=1e-12)


def test_a_finished_result_is_reused(synthetic, monkeypatch, tmp_path) -> None:
    store, summary, _, out = synthetic
    import coact.block.position_fits as module

    def refit(*args, **kwargs):
        raise AssertionError("refitted a finished result")

    monkeypatch.setattr(module, "linear_fit", refit)
    assert positions(store, PAIR, out, SYNTHETIC) == summary
    assert json.loads((out / "positions.json").read_text())["key"] == summary.key
    copy = shutil.copytree(out, tmp_path / "copy")
    with pytest.raises(AssertionError, match="refitted"):  # another config is redone
        positions(store, PAIR, copy, PositionsConfig(**{**SYNTHETIC.__dict__, "decay": 0.25}))
    assert not (copy / "positions.json").exists()  # the stale headline is gone


def test_bad_input_is_a_clear_error(synthetic, tmp_path) -> None:
    store = synthetic[0]
    with pytest.raises(CoactError, match=r"site mlp_out\.2 is not in the code store"):
        positions(store, SitePair.of("resid_pre[2]", "mlp_out[2]"), tmp_path / "a")
    small = _synthetic_store(tmp_path / "small", n_contexts=3)
    with pytest.raises(CoactError, match="too few contexts"):
        positions(small, PAIR, tmp_path / "b", SYNTHETIC)
    for bad in ({"summaries": ("next",)}, {"summaries": ()}, {"decay": 0.0}, {"window": 0},
                {"ridge": ()}, {"ridge": (-1.0,)}, {"validation_fraction": 1.0}):  # fmt: skip
        with pytest.raises(CoactError):
            PositionsConfig(**bad)  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
