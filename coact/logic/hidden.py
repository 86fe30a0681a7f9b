"""hidden_targets: a two-layer connector's hidden latents as targets, W1 as their weights."""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.logic.candidates import _std

# --- hidden latents of a two-layer connector ---------------------------------------------


def hidden_targets(
    connector: object, x: sp.spmatrix, batch_tokens: int = 4096, keep: int = 16
) -> tuple[sp.csr_matrix, pl.DataFrame]:
    """The hidden activations h = ReLU(W1 x + b1) of a two-layer connector (e.g. the
    sae-connector) as sparse codes, and W1 as a weights table (output = hidden unit, its
    `keep` strongest inputs by |w|·sd(x)/sd(h)), ready for `label_layer`."""
    import torch

    from coact.connectors.families import SparseConnector, csr_batch

    if not isinstance(connector, SparseConnector) or connector.hidden is None:
        raise ValueError("hidden_targets needs a two-layer connector (mlp, sae-connector, ...)")
    x = sp.csr_matrix(x, dtype=np.float32)
    device = str(connector.weight_in.device)  # the batches go where the fit lives
    parts = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_tokens):
            rows = np.arange(start, min(start + batch_tokens, x.shape[0]))
            h = torch.relu(connector.first_layer(csr_batch(x, rows, device))).cpu().numpy()
            parts.append(sp.csr_matrix(h))
    hidden = sp.csr_matrix(sp.vstack(parts), dtype=np.float32)
    w1 = connector.weight_in.detach().cpu().numpy().astype(np.float64)  # n_in × hidden
    sd_in, sd_h = _std(x), _std(hidden)
    score = np.abs(w1) * sd_in[:, None] / np.where(sd_h > 0, sd_h, np.inf)[None, :]
    top = np.argsort(-score, axis=0, kind="stable")[: min(keep, w1.shape[0])]
    units = np.broadcast_to(np.arange(w1.shape[1]), top.shape)
    table = pl.DataFrame(
        {
            "output": units.ravel().astype(np.int64),
            "input": top.ravel().astype(np.int64),
            "weight_refit": w1[top, units].ravel(),
            "standardised": score[top, units].ravel(),
        }
    ).filter(pl.col("standardised") > 0)
    return hidden, table
