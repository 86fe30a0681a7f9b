"""Readable connections: an output feature as a short weighted sum of input features,
and the tokens on which a feature fires hardest (the evidence a reader checks first)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp


def top_terms(
    weights: sp.spmatrix | np.ndarray, output: int, k: int = 5
) -> list[tuple[int, float]]:
    """The k largest-|w| inputs of `output` in an (n_in × n_out) weight matrix."""
    if sp.issparse(weights):
        dense = sp.csc_matrix(weights).getcol(output).toarray().ravel()
    else:
        dense = np.asarray(weights)[:, output]
    nonzero = np.flatnonzero(dense)
    order = nonzero[np.argsort(-np.abs(dense[nonzero]), kind="stable")][:k]
    return [(int(i), float(dense[i])) for i in order]


def formula(weights: sp.spmatrix | np.ndarray, output: int, bias: float = 0.0, k: int = 5) -> str:
    """E.g. ``out 30 = 0.26·in 2797 + 0.23·in 259 − 0.10·in 946``; ``out 7 = 0`` if empty."""
    terms = top_terms(weights, output, k)
    text = ""
    for i, (index, w) in enumerate(terms):
        sign = "−" if w < 0 else "+"
        lead = ("−" if w < 0 else "") if i == 0 else f" {sign} "
        text += f"{lead}{abs(w):.2f}·in {index}"
    if abs(bias) >= 0.005:
        text += f" {'−' if bias < 0 else '+'} {abs(bias):.2f}" if text else f"{bias:.2f}"
    return f"out {output} = {text or '0'}"


def top_activating_tokens(
    codes: sp.csr_matrix,
    tokens: pl.DataFrame,
    feature: int,
    decode: Callable[[list[int]], str] | None = None,
    k: int = 5,
) -> list[tuple[str | int, float]]:
    """The k tokens where `feature` is largest: (token text or id, activation)."""
    column = codes[:, feature].tocoo()
    order = np.argsort(-column.data, kind="stable")[:k]
    ids: Sequence[int] = tokens["token_id"].to_numpy()[column.row[order]].tolist()
    labels = [decode([t]) if decode else t for t in ids]
    return [(label, float(v)) for label, v in zip(labels, column.data[order], strict=True)]
