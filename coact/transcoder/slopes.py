"""The sheet's slope figures: with each route in the MLP's place, how output SAE features
move with input SAE features, against the model's own.

The model's feature-space map g (`coact.jacobian.feature_map`) and the same map with the
transcoder in the MLP's place are measured on the same held-out tokens. On the model's
strong connections (largest total attribution per output), the transcoder's mean Jacobian
and the SAE route's connector weight (least-squares refit at the chosen α) are each judged
against the model's mean Jacobian: sign, size within the band, Spearman. On the causal
check's judged connections (the model's ablation, `coact.calibrate.causal`), the
transcoder's exact response to the same ablation and the connector's prediction are judged
against the model's measured change. The linear share is the Jacobian score's
(`coact.jacobian.score`) for each map.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import Tensor

from coact.jacobian.connections import connection_table, strongest
from coact.jacobian.entries import Entries, flatten
from coact.jacobian.feature_map import FeatureMap, TokenJacobians, mlp_block
from coact.jacobian.paths import ablation_paths
from coact.jacobian.score import InputSlopes, ScoreConfig, linearity_scores
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.transcoder.sheet import Models, agreement


@dataclass(frozen=True)
class RouteSlopes:
    """One route's agreement with the model (NaN where not measured)."""

    jacobian_sign: float
    jacobian_size: float
    jacobian_spearman: float
    ablation_sign: float
    ablation_size: float
    ablation_spearman: float
    linear_share: float


@dataclass(frozen=True)
class SlopeConfig:
    """How the slopes are measured (the jacobian stage's defaults)."""

    batch_size: int = 4
    skip_first_positions: int = 1
    min_tokens: int = 3  # tokens a model connection needs to be judged
    per_output: int = 8  # the model's strongest connections judged per output
    size_band: tuple[float, float] = (0.5, 2.0)
    score: ScoreConfig = dataclasses.field(default_factory=ScoreConfig)


def measure_map(
    models: Models, feature_map: FeatureMap, tokens: Tensor, config: SlopeConfig
) -> tuple[Entries, np.ndarray, Tensor]:
    """A map's flattened Jacobians on `tokens`, its cross-fitted input slopes (the linearity
    score's) and the rows it read (tokens after the skip, context-major)."""
    site, d = Site("mlp_resid", models.layer), models.lm.adapter.d_model
    inputs = InputSlopes(models.sae_in.width, d)
    batches: list[tuple[TokenJacobians, np.ndarray]] = []
    rows: list[Tensor] = []
    for start in range(0, tokens.shape[0], config.batch_size):
        batch = tokens[start : start + config.batch_size]
        stream = capture(models.lm, batch, [site])[site][:, config.skip_first_positions :]
        rows.append(stream.reshape(-1, d).float())
        contexts = np.repeat(np.arange(start, start + len(batch)), stream.shape[1])
        found = feature_map.token_jacobians(rows[-1])
        inputs.add(found, contexts)
        batches.append((dataclasses.replace(found, pushed=found.pushed[:0]), contexts))
    entries = flatten(batches, models.sae_in.width, tokens.shape[0])
    return entries, inputs.cross_fitted(models.sae_out.W_enc), torch.cat(rows)  # type: ignore[attr-defined]


def _linear_share(entries: Entries, slopes: np.ndarray, n_out: int, score: ScoreConfig) -> float:
    """The share of scored output features the Jacobian score calls linear."""
    features = linearity_scores(entries, slopes, n_out, score)
    scored = features.filter(pl.col("jacobian_verdict") != "too few tokens")
    return float((scored["jacobian_verdict"] == "linear").mean()) if scored.height else np.nan  # type: ignore[arg-type]


def slopes(
    models: Models, tokens: Tensor, weights: pl.DataFrame, config: SlopeConfig
) -> tuple[pl.DataFrame, dict[str, RouteSlopes], FeatureMap, Tensor]:
    """The strong connections with each route's slope beside the model's, each route's
    Jacobian figures (ablation left NaN: `with_ablation`), the transcoder's feature map and
    the rows read."""
    n_in, n_out = models.sae_in.width, models.sae_out.width
    model_map = FeatureMap(mlp_block(models.lm, models.layer), models.sae_in, models.sae_out)
    tc_map = FeatureMap(models.transcoder_block(), models.sae_in, models.sae_out)
    found_m, slopes_m, streams = measure_map(models, model_map, tokens, config)
    found_t, slopes_t, _ = measure_map(models, tc_map, tokens, config)
    table_m = connection_table(found_m, n_in, min_tokens=config.min_tokens)
    table_t = connection_table(found_t, n_in, min_tokens=1)
    strong = strongest(table_m, config.per_output)
    joined = (
        strong.select("output", "input", "n_tokens", "jacobian_mean")
        .join(
            table_t.select("output", "input", tc_jacobian_mean="jacobian_mean"),
            on=["output", "input"], how="left", maintain_order="left",
        )
        .join(
            weights.select("output", "input", "weight_refit"),
            on=["output", "input"], how="left", maintain_order="left",
        )
        .fill_null(0.0)
    )  # fmt: skip
    reference = joined["jacobian_mean"].to_numpy()
    shares = {
        "model": _linear_share(found_m, slopes_m, n_out, config.score),
        "transcoder": _linear_share(found_t, slopes_t, n_out, config.score),
    }
    band, nan3 = config.size_band, (np.nan, np.nan, np.nan)
    tc = agreement(reference, joined["tc_jacobian_mean"].to_numpy(), band)
    sae = agreement(reference, joined["weight_refit"].to_numpy(), band)
    routes = {
        "transcoder": RouteSlopes(*tc, *nan3, shares["transcoder"]),
        "sae": RouteSlopes(*sae, *nan3, shares["model"]),
    }
    return joined, routes, tc_map, streams


def with_ablation(
    routes: dict[str, RouteSlopes], causal: pl.DataFrame, tc_map: FeatureMap, streams: Tensor,
    band: tuple[float, float],
) -> tuple[dict[str, RouteSlopes], pl.DataFrame]:  # fmt: skip
    """Each route judged against the model's ablation of the causal check's judged
    connections (`streams`: the rows of the contexts it measured, context-major)."""
    judged = causal.filter(pl.col("judged")).select("output", "input", "actual_mean",
                                                    "predicted_mean")  # fmt: skip
    paths = ablation_paths(tc_map, streams, judged)
    actual = paths["actual_mean"].to_numpy()
    tc_change = np.nan_to_num(paths["exact_code_change"].to_numpy())
    figures = {
        "transcoder": agreement(actual, tc_change, band),
        "sae": agreement(actual, paths["predicted_mean"].to_numpy(), band),
    }
    out = {
        route: RouteSlopes(
            r.jacobian_sign, r.jacobian_size, r.jacobian_spearman, *figures[route], r.linear_share
        )
        for route, r in routes.items()
    }
    return out, paths.rename({"exact_code_change": "transcoder_change"})
