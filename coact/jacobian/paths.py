"""Why a Jacobian's prediction of an ablation may miss: the ablation's path through the
exact feature map, split in two steps.

For a checked connection i → j, on the tokens where input i fires, removing i moves the
stream by −c_i·W_dec[i]. Three means over those tokens, each divided by the number of
them (as the causal check averages):

- first order: −Σ J_ji·c_i over the tokens where j is active (the Jacobian's prediction);
- exact pre-activation: Σ Δpre_j over the same tokens (the block's real response, before
  the output SAE's activation rule);
- exact code: Σ Δcode_j over all of them (the output code after TopK/ReLU: j may switch
  on or off). This is what the causal check measures through the full model; the two
  must agree, a check that the map is the model's own computation.

First order vs exact pre-activation is the block's curvature; exact pre-activation vs
exact code is the output SAE's thresholding.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch import Tensor

from coact.jacobian.feature_map import FeatureMap


@torch.no_grad()
def ablation_paths(
    feature_map: FeatureMap, streams: Tensor, connections: pl.DataFrame
) -> pl.DataFrame:
    """`connections` (output, input) → the same rows with exact_pre_change and
    exact_code_change (means over the tokens where the input fires; NaN if it never does)."""
    pre_change = np.full(connections.height, np.nan)
    code_change = np.full(connections.height, np.nan)
    outputs, inputs = connections["output"].to_numpy(), connections["input"].to_numpy()
    sae_in, sae_out = feature_map.sae_in, feature_map.sae_out
    all_codes = sae_in.encode(streams)
    for i in np.unique(inputs):
        codes = all_codes[:, int(i)]
        rows = torch.nonzero(codes > 0).flatten()
        if len(rows) == 0:
            continue
        before = streams[rows]
        after = before - codes[rows, None] * sae_in.W_dec[int(i)]
        block = feature_map.on_rows(rows)
        out_before, out_after = block(before), block(after)
        delta_pre = feature_map.pre_out(out_after) - feature_map.pre_out(out_before)
        code_before = sae_out.encode(out_before)
        delta_code = sae_out.encode(out_after) - code_before
        for row in np.flatnonzero(inputs == i):
            j = int(outputs[row])
            active = code_before[:, j] > 0
            pre_change[row] = float(delta_pre[active, j].sum()) / len(rows)
            code_change[row] = float(delta_code[:, j].sum()) / len(rows)
    return connections.with_columns(
        exact_pre_change=pl.Series(pre_change), exact_code_change=pl.Series(code_change)
    )
