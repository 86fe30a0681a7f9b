"""Outlier features on a tiny synthetic store whose shares are counted by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from coact.codes.store import CodeStore
from coact.evidence.outliers import (
    OutlierConfig,
    find_outliers,
    first_delimiters,
    is_delimiter,
    outliers,
    reconstruction_norms,
)
from coact.sae.base import Sae

# Two contexts of 8 stored tokens (positions 1..8). Token texts: id 0 'a', 1 '\n', 2 '.',
# 3 ' ,', 4 'b'. Context 0: a a \n a . a a a  → first delimiter at position 3 (row 2).
# Context 1: a a a a a , b .             → first delimiter at position 6 (row 13).
TEXT = {0: "a", 1: "\n", 2: ".", 3: " ,", 4: "b"}
IDS = [*(0, 0, 1, 0, 2, 0, 0, 0), *(0, 0, 0, 0, 0, 3, 4, 2)]  # context 0, context 1
WIDTH = 5


def _decode(ids: list[int]) -> str:
    return "".join(TEXT[i] for i in ids)


def _codes() -> sp.csr_matrix:
    """16 tokens × 5 features (row r = context r // 8, position r % 8 + 1)."""
    x = np.zeros((16, WIDTH), dtype=np.float32)
    x[[0, 1, 2, 8, 9], 0] = 1.0  # feature 0: positions 1, 2, 3, 1, 2 → first tokens 5/5
    x[[0, 5], 0] = 2.0
    x[[2, 13, 6], 1] = 1.0  # feature 1: first delimiters (rows 2, 13) 2/3
    x[[3, 4, 5, 6], 2] = 1.0  # feature 2: 0 first tokens, 0 first delimiters (row 4 is the 2nd)
    x[[15], 3] = 5.0  # feature 3: the high-norm token only, but 1 active token
    # feature 4: never active
    return sp.csr_matrix(x)


def _store(tmp_path: Path) -> CodeStore:
    store = CodeStore.open_for_writing(
        tmp_path / "codes", fingerprint="f", sites={"mlp_out.1": WIDTH}
    )
    n = len(IDS)
    tokens = {
        "context": np.repeat([0, 1], 8),
        "position": np.tile(np.arange(1, 9), 2),
        "token_id": np.array(IDS),
        "doc": np.zeros(n, dtype=np.int32),
    }
    store.write_shard(0, tokens, {"mlp_out.1": _codes()})
    return store


def _sae() -> Sae:
    """Decoder rows: feature 3 has norm 100, the others norm 1 (b_dec = 0)."""
    sae = Sae(4, WIDTH, activation="relu")
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(WIDTH, 4))
        sae.W_dec[3] = torch.tensor([0.0, 0.0, 0.0, 100.0])
        sae.W_dec[4] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    return sae


def test_is_delimiter_reads_token_text() -> None:
    for text in ("\n", ".", " ,", ".\n\n", "\n\n", " ."):
        assert is_delimiter(text), text
    for text in ("", " ", "a.", "...a", ";", "b"):
        assert not is_delimiter(text), text


def test_first_delimiter_is_per_context() -> None:
    contexts = np.repeat([0, 1], 8)
    got = first_delimiters(contexts, np.array(IDS), {1, 2, 3})
    assert np.flatnonzero(got).tolist() == [2, 13]


def test_reconstruction_norm_from_sparse_codes() -> None:
    norms = reconstruction_norms(_codes(), _sae(), chunk=5)
    dense = _codes().toarray() @ _sae().W_dec.detach().numpy()
    assert norms == pytest.approx(np.linalg.norm(dense, axis=1))
    assert norms[15] == pytest.approx(500.0)


def test_hand_counted_shares_and_flags(tmp_path: Path) -> None:
    store = _store(tmp_path)
    config = OutlierConfig(first_positions=4, share=0.5, min_active=2, norm_factor=10.0)
    table, sites = find_outliers(store, config, _decode, {"mlp_out.1": _sae()})
    rows = {r["feature"]: r for r in table.iter_rows(named=True)}
    # feature 0: rows 0, 1, 2, 5, 8, 9 → positions 1, 2, 3, 6, 1, 2: first tokens 5/6
    assert rows[0]["n_active"] == 6
    assert rows[0]["share_first_tokens"] == pytest.approx(5 / 6)
    assert rows[0]["share_first_delimiter"] == pytest.approx(1 / 6)  # row 2
    assert rows[0]["outlier"] and rows[0]["reason"] == "first tokens 83%"
    # feature 1: rows 2, 6, 13 → first delimiters 2/3; first tokens: row 2 (position 3) 1/3
    assert rows[1]["share_first_delimiter"] == pytest.approx(2 / 3)
    assert rows[1]["share_first_tokens"] == pytest.approx(1 / 3)
    assert rows[1]["reason"] == "first delimiter 67%"
    # feature 2: rows 3..6 = positions 4..7, row 4 is context 0's second delimiter
    assert rows[2]["share_first_tokens"] == 0 and rows[2]["share_first_delimiter"] == 0
    assert not rows[2]["outlier"] and rows[2]["reason"] == ""
    # high norm: median norm over the 16 tokens; row 15 (500) is far above it
    assert rows[3]["share_high_norm"] == pytest.approx(1.0)
    assert not rows[3]["outlier"]  # one active token: below min_active, not judged
    assert rows[4]["n_active"] == 0 and np.isnan(rows[4]["share_first_tokens"])
    site = sites["mlp_out.1"]
    assert site.alive == 4 and site.judged == 3 and site.flagged == 2
    assert site.first_tokens == 1 and site.first_delimiter == 1 and site.high_norm == 0
    assert site.base_rates["first_tokens"] == pytest.approx(6 / 16)
    # with min_active 1, feature 3 is flagged for its norm
    table, _ = find_outliers(store, OutlierConfig(min_active=1), _decode, {"mlp_out.1": _sae()})
    assert table.filter(pl.col("feature") == 3)["reason"][0] == "high norm 100%"


def test_unknown_text_and_norm_degrade_to_unknown(tmp_path: Path) -> None:
    table, sites = find_outliers(_store(tmp_path), OutlierConfig(min_active=2))
    assert table["share_first_delimiter"].is_nan().all()
    assert table["share_high_norm"].is_nan().all()
    assert table.filter(pl.col("feature") == 0)["outlier"][0]  # first tokens still judged
    assert sites["mlp_out.1"].norm == "unknown"
    assert sites["mlp_out.1"].base_rates["high_norm"] is None


def test_stage_writes_parquet_then_headline_and_reuses_it(tmp_path: Path) -> None:
    store = _store(tmp_path)
    out = tmp_path / "outliers"
    first = outliers(store, out, OutlierConfig(min_active=2), decode=_decode)
    assert (out / "outliers.parquet").is_file()
    assert json.loads((out / "outliers.json").read_text())["key"] == first.key
    assert pl.read_parquet(out / "outliers.parquet").height == WIDTH
    again = outliers(store, out, OutlierConfig(min_active=2), decode=_decode)
    assert again.seconds == first.seconds  # reused, not recomputed
    other = outliers(store, out, OutlierConfig(min_active=3), decode=_decode)
    assert other.key != first.key
