"""The transcoder's latents labelled by the logic stage, so the sheet can set the two
routes' label counts side by side. Each latent is treated as an output feature whose
inputs are the input SAE's features (the `mlp_resid` codes the code store already holds);
its candidate inputs come from the transcoder's virtual weights (its encoder read through
the input SAE's decoder), as the SAE route's come from the connector's weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
from torch import Tensor

from coact.codes.store import CodeStore
from coact.errors import CoactError
from coact.linearity.table import feature_stats
from coact.logic.config import LogicConfig
from coact.logic.coverage import CoverageSummary
from coact.logic.layer import label_layer
from coact.logic.stage import label_counts
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.transcoder.model import SkipTranscoder


@dataclass(frozen=True)
class RouteLabels:
    """One route's labels: counts per label and how much of its features they explain."""

    counts: dict[str, int]
    coverage: CoverageSummary
    features: pl.DataFrame  # the logic stage's features table, one row per latent


def virtual_table(virtual: np.ndarray, x: sp.spmatrix, per_output: int) -> pl.DataFrame:
    """A connector-style weights table (output, input, weight_refit) holding each latent's
    `per_output` strongest virtual weights by |V|·sd(input code): the logic stage's
    candidates and coverage pool, as the Jacobian's strongest inputs are for the SAE route.
    (The dense n_in × width matrix would put every input in every latent's pool.)"""
    _, _, variance = feature_stats(sp.csr_matrix(x))
    score = np.abs(virtual) * np.sqrt(variance)[:, None]
    keep = min(per_output, virtual.shape[0])
    inputs = np.argpartition(-score, keep - 1, axis=0)[:keep]  # keep × width
    outputs = np.broadcast_to(np.arange(virtual.shape[1]), inputs.shape)
    return pl.DataFrame({
        "output": outputs.ravel().astype(np.int64),
        "input": inputs.ravel().astype(np.int64),
        "weight_refit": virtual[inputs, outputs].ravel().astype(np.float64),
    }).sort(["output", "input"])  # fmt: skip


@torch.no_grad()
def latent_codes(
    lm: LoadedModel, tc: SkipTranscoder, layer: int, contexts: Tensor, store: CodeStore,
    batch_size: int = 8,
) -> sp.csr_matrix:  # fmt: skip
    """The transcoder's codes on the code store's tokens, row for row with its sites: the
    store's contexts (indices into `contexts`) re-run to the MLP's input, the store's first
    positions left out as it leaves them out."""
    table = store.read_tokens()
    skip = int(store.meta.get("skip_first_positions", 1))
    ids = np.unique(table["context"].to_numpy())
    tokens = contexts[torch.as_tensor(ids, dtype=torch.long)]
    stored = table["token_id"].to_numpy()
    if tokens[:, skip:].numel() != len(stored) or not np.array_equal(
        tokens[:, skip:].reshape(-1).numpy(), stored
    ):
        raise CoactError("the code store's tokens are not these contexts': cannot label latents")
    site, parts = Site("mlp_in", layer), []
    for start in range(0, tokens.shape[0], batch_size):
        x = capture(lm, tokens[start : start + batch_size], [site])[site][:, skip:]
        codes = tc.encode(x.reshape(-1, x.shape[-1]).float())
        parts.append(sp.csr_matrix(codes.cpu().numpy()))
    return sp.csr_matrix(sp.vstack(parts, format="csr"))


def label_latents(
    x: sp.spmatrix, y: sp.spmatrix, virtual: np.ndarray, config: LogicConfig,
    contexts: np.ndarray | None = None, progress: bool = False,
) -> RouteLabels:  # fmt: skip
    """Label every latent (column of `y`) from the input codes `x` with the logic stage's
    `label_layer`, its candidates the latent's strongest virtual weights (`virtual`:
    inputs × latents)."""
    if virtual.shape != (x.shape[1], y.shape[1]):
        raise ValueError(f"virtual weights {virtual.shape} do not map {x.shape[1]} inputs "
                         f"to {y.shape[1]} latents")  # fmt: skip
    table = virtual_table(virtual, x, config.jacobian_inputs)
    labels = label_layer(x, y, table, config, progress=progress, contexts=contexts)
    features = labels.features
    return RouteLabels(label_counts(features), CoverageSummary.of(features, config), features)
