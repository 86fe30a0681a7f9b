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

from coact.connectors.train import split_rows
from coact.errors import CoactError
from coact.linearity import LinearityConfig
from coact.positions import PositionsConfig, context_summaries, positions, shift_operator
from coact.store import CodeStore

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
    config = PositionsConfig("resid_pre[1]", "attn_out[1]", decay=0.5, window=2)
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
    from coact.collect import CollectConfig, collect_codes
    from coact.corpus import Contexts
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
    config = PositionsConfig(
        str(site_in), str(site_out), heldout_fraction=0.25, linearity=LINEARITY, progress=False
    )
    summary = positions(store, config, tmp_path / "positions")
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
    assert summary["percent_same_position"] == 0.0 and summary["needs_context"] == 32
    assert summary["confident_needs_context"] == 32 and summary["carriers"]["previous"] == 32
    assert summary["percent_same_position_confident"] == 0.0
    top = summary["top"]
    assert len(top) == 10 and top[0]["gain_fvu"] == pytest.approx(alive["gain_fvu"].max())
    assert [t["gain_fvu"] for t in top] == sorted((t["gain_fvu"] for t in top), reverse=True)


def test_position_local_attention_is_same_position(current) -> None:
    summary, table = current
    alive = table.filter(pl.col("status") != "dead")
    assert alive.height == 32
    assert (alive["gain_fvu"].abs() < 1e-6).all(), alive["gain_fvu"].abs().max()
    assert set(alive["verdict"]) == {"same_position"}
    assert alive["carrier"].null_count() == 32
    assert summary["percent_same_position"] == 100.0
    assert summary["percent_same_position_confident"] == 100.0
    assert summary["tokens"] == summary["tokens_train"] + summary["tokens_heldout"] == 160 * 23


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


SYNTHETIC = PositionsConfig(
    "resid_pre[2]", "attn_out[2]", heldout_fraction=0.2, window=3, linearity=LINEARITY,
    progress=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[CodeStore, dict, pl.DataFrame, object]:
    store = _synthetic_store(tmp_path_factory.mktemp("codes"))
    out = tmp_path_factory.mktemp("positions")
    summary = positions(store, SYNTHETIC, out)
    return store, summary, pl.read_parquet(out / "positions.parquet"), out


def _lstsq_heldout(z: np.ndarray, y: np.ndarray, train, held) -> np.ndarray:
    design = np.hstack([z, np.ones((len(z), 1))])
    w, *_ = np.linalg.lstsq(design[train], y[train], rcond=None)
    return ((design[held] @ w - y[held]) ** 2).mean(axis=0)


def test_fits_are_brute_force_least_squares(synthetic) -> None:
    store, summary, table, _ = synthetic
    x, y = store.read_site("resid_pre.2"), store.read_site("attn_out.2").toarray()
    tokens = store.read_tokens()
    parts = context_summaries(x, tokens, SYNTHETIC)
    dense = {"current": x.toarray(), **{k: v.toarray() for k, v in parts.items()}}
    train, held = split_rows(len(y), 0.2, 0, tokens["context"].to_numpy())
    alive = slice(0, 3)
    full = np.hstack(list(dense.values()))
    expected = {
        "mse_same": _lstsq_heldout(dense["current"], y, train, held),
        "mse_context": _lstsq_heldout(full, y, train, held),
        "mse_with_previous": _lstsq_heldout(
            np.hstack([dense["current"], dense["previous"]]), y, train, held
        ),
        "mse_with_decayed": _lstsq_heldout(
            np.hstack([dense["current"], dense["decayed"]]), y, train, held
        ),
    }
    for column, values in expected.items():
        np.testing.assert_allclose(table[column].to_numpy()[alive], values[alive], atol=1e-9)
    assert summary["tokens_heldout"] == len(held) and summary["inputs_context"] == 3 * N_IN
    # Known answers: 0 same-position, 1 the previous token, 2 further back, 3 dead.
    assert table["status"].to_list() == [
        "same_position", "needs_context", "needs_context", "dead",
    ]  # fmt: skip
    assert table["verdict"].to_list()[3] == "dead" and summary["dead"] == 1
    assert table["carrier"].to_list() == [None, "previous", "decayed", None]
    gain = table["gain"].to_numpy()
    np.testing.assert_allclose(gain, table["mse_same"] - table["mse_context"])
    assert (table["gain_low"] <= table["gain_high"]).fill_null(True).all()


def test_output_chunks_and_sparse_gram_give_the_same_table(
    synthetic, tmp_path, monkeypatch
) -> None:
    """Chunks of outputs, and the sparse Gram used above DENSE_GRAM inputs, change nothing."""
    import coact.positions as module

    store, _, table, _ = synthetic
    config = PositionsConfig(**{**SYNTHETIC.__dict__, "chunk_outputs": 1})
    summary = positions(store, config, tmp_path / "chunks")
    assert summary["output_chunks"] == N_OUT
    monkeypatch.setattr(module, "DENSE_GRAM", 0)
    positions(store, SYNTHETIC, tmp_path / "sparse")
    for name in ("chunks", "sparse"):
        again = pl.read_parquet(tmp_path / name / "positions.parquet")
        for column in ("mse_same", "mse_context", "mse_with_previous", "gain_low", "gain_high"):
            np.testing.assert_allclose(again[column], table[column], rtol=1e-9, atol=1e-12)


def test_a_finished_result_is_reused(synthetic, monkeypatch, tmp_path) -> None:
    store, summary, _, out = synthetic
    import coact.positions as module

    def refit(*args, **kwargs):
        raise AssertionError("refitted a finished result")

    monkeypatch.setattr(module, "linear_fit", refit)
    assert positions(store, SYNTHETIC, out) == summary
    assert json.loads((out / "positions.json").read_text())["key"] == summary["key"]
    copy = shutil.copytree(out, tmp_path / "copy")
    with pytest.raises(AssertionError, match="refitted"):  # another config is redone
        positions(store, PositionsConfig(**{**SYNTHETIC.__dict__, "decay": 0.25}), copy)
    assert not (copy / "positions.json").exists()  # the stale headline is gone


def test_bad_input_is_a_clear_error(synthetic, tmp_path) -> None:
    store = synthetic[0]
    with pytest.raises(CoactError, match=r"site mlp_out\.2 is not in the code store"):
        positions(store, PositionsConfig("resid_pre[2]", "mlp_out[2]"), tmp_path / "a")
    small = _synthetic_store(tmp_path / "small", n_contexts=3)
    with pytest.raises(CoactError, match="too few contexts"):
        positions(small, SYNTHETIC, tmp_path / "b")
    for bad in ({"summaries": ("next",)}, {"summaries": ()}, {"decay": 0.0}, {"window": 0}):
        with pytest.raises(CoactError):
            PositionsConfig("resid_pre[2]", "attn_out[2]", **bad)  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
