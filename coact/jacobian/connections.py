"""Per connection (input i → output j), the block's Jacobian aggregated over the tokens
where both are active: count, mean, spread and the attribution J_ji·c_i."""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.connectors.formulas import formula
from coact.jacobian.entries import Entries


def connection_table(entries: Entries, n_in: int, min_tokens: int) -> pl.DataFrame:
    """One row per connection seen on at least `min_tokens` tokens: output, input,
    n_tokens, jacobian_mean, jacobian_std, attribution_mean (mean J·c over those tokens),
    attribution_per_fire (Σ J·c over the tokens where the input fires: the first-order
    change of the output's code, per firing, when the input is removed) and input_fires."""
    key = entries.entry_output * n_in + entries.entry_input
    keys, inverse = np.unique(key, return_inverse=True)
    count = np.bincount(inverse)
    jac, attr = entries.entry_jacobian, entries.entry_jacobian * entries.entry_code
    mean = np.bincount(inverse, jac) / count
    second = np.bincount(inverse, jac * jac) / count
    attribution = np.bincount(inverse, attr)
    keep = count >= min_tokens
    output, inputs = np.divmod(keys[keep], n_in)
    fires = entries.fires[inputs]
    return pl.DataFrame(
        {
            "output": output,
            "input": inputs,
            "n_tokens": count[keep],
            "jacobian_mean": mean[keep],
            "jacobian_std": np.sqrt(np.maximum(second[keep] - mean[keep] ** 2, 0.0)),
            "attribution_mean": attribution[keep] / count[keep],
            "attribution_per_fire": attribution[keep] / np.maximum(fires, 1),
            "input_fires": fires,
        }
    )


def strongest(table: pl.DataFrame, per_output: int) -> pl.DataFrame:
    """Each output's `per_output` connections of largest total attribution |Σ J·c|."""
    total = (table["attribution_mean"] * table["n_tokens"]).abs()
    ranked = table.with_columns(total=total).sort(["output", "total"], descending=[False, True])
    return ranked.group_by("output", maintain_order=True).head(per_output).drop("total")


def jacobian_formulas(table: pl.DataFrame, n_in: int, n_out: int, terms: int = 5) -> dict[int, str]:
    """Per output, the mean-Jacobian formula over its `terms` inputs of largest total
    attribution (a rare input with a steep slope moves the output less than a common one)."""
    if table.is_empty():
        return {}
    total = (table["attribution_mean"] * table["n_tokens"]).abs()
    top = (
        table.with_columns(total=total)
        .sort("total", descending=True)
        .group_by("output", maintain_order=True)
        .head(terms)
    )
    matrix = sp.csc_matrix(
        (top["jacobian_mean"].to_numpy(), (top["input"].to_numpy(), top["output"].to_numpy())),
        shape=(n_in, n_out),
    )
    return {int(j): formula(matrix, int(j), k=terms) for j in np.unique(top["output"].to_numpy())}
