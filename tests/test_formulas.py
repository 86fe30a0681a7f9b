"""Formulas and top activating tokens, checked by hand."""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.connectors.formulas import formula, top_activating_tokens, top_terms


def test_formula_by_hand() -> None:
    w = np.zeros((3000, 40))
    w[2797, 30], w[259, 30], w[946, 30] = 0.26, 0.23, -0.10
    weights = sp.csr_matrix(w)
    assert top_terms(weights, 30, k=2) == [(2797, 0.26), (259, 0.23)]
    assert formula(weights, 30) == "out 30 = 0.26·in 2797 + 0.23·in 259 − 0.10·in 946"
    assert formula(weights, 30, bias=-0.5) == (
        "out 30 = 0.26·in 2797 + 0.23·in 259 − 0.10·in 946 − 0.50"
    )
    assert formula(weights, 7) == "out 7 = 0"
    w2 = np.zeros((5, 1))
    w2[3, 0] = -1.5
    assert formula(w2, 0) == "out 0 = −1.50·in 3"


def test_top_activating_tokens() -> None:
    codes = sp.csr_matrix(np.array([[0.0, 1.0], [3.0, 0.0], [2.0, 0.5], [0.0, 0.0]]))
    tokens = pl.DataFrame({"token_id": [10, 11, 12, 13]})
    assert top_activating_tokens(codes, tokens, 0, k=5) == [(11, 3.0), (12, 2.0)]
    decoded = top_activating_tokens(codes, tokens, 1, decode=lambda ids: f"<{ids[0]}>", k=1)
    assert decoded == [("<10>", 1.0)]
