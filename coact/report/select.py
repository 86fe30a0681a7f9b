"""Which features get a page of their own: the most interesting output features, each with
the reasons it was picked (most confident per logic label, strongest nonlinear gain,
strongest connections, strongest writers into the next residual stream in a block run,
causally checked, clearest linear ones, then the most active); and, in a block run, the
attention features that gain most from earlier positions (the first rows of the layer
page's position table)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import polars as pl

from coact.linearity.table import SEED_TAU, Form, LinearShare
from coact.models.sites import Site
from coact.report.charts.base import GAIN_COLUMN
from coact.rundir.read import RunData

DEFAULT_FEATURES = 50


def interesting_features(data: RunData, n: int = DEFAULT_FEATURES) -> dict[int, list[str]]:
    """Up to n output features → why each is shown, in the order they were picked."""
    picked: dict[int, list[str]] = {}
    quota = max(1, n // 10)
    out_site = Site.parse(data.out_site)

    def take(features: Sequence[int], reason: str, limit: int) -> None:
        added = 0
        for f in features:
            if added >= limit:
                break
            f = int(f)
            if f in picked:
                if reason not in picked[f]:
                    picked[f].append(reason)
                continue
            if len(picked) >= n:
                return
            picked[f] = [reason]
            added += 1

    if data.labels is not None:
        labels = data.labels.filter(pl.col("label") != "DEAD")
        for label in labels["label"].unique(maintain_order=True).sort().to_list():
            rows = labels.filter(pl.col("label") == label).sort(
                ["confidence", "n_active"], descending=True
            )
            limit = max(1, quota // 2) if label == "UNEXPLAINED" else quota
            take(rows["output"].to_list(), f"most confident {label}", limit)
    if data.features is not None:
        f = data.features
        alive = f.filter(pl.col("status") != "dead") if "status" in f.columns else f
        verdict = "verdict" if "verdict" in alive.columns else "status"
        nonlinear = alive.filter(pl.col(verdict) == "nonlinear").sort("d_fvu", descending=True)
        take(nonlinear["feature"].to_list(), "largest nonlinear gain d", 2 * quota)
    if data.weights is not None and data.weights.height:
        w = data.weights
        if "in_both" in w.columns:
            w = w.filter(pl.col("in_both").fill_null(False))
        strongest = (
            w.with_columns(pl.col("standardised").abs().alias("strength"))
            .group_by("output")
            .agg(pl.col("strength").max())
            .sort(["strength", "output"], descending=[True, False])
        )
        take(strongest["output"].to_list(), "strongest connection", 2 * quota)
    if data.composition_weights is not None and data.composition_weights.height:
        cw = data.composition_weights
        mine = [s for s in cw["source_site"].unique().to_list() if Site.parse(s) == out_site]
        feeds = (
            cw.filter(pl.col("source_site").is_in(mine))
            .with_columns(pl.col("standardised").abs().alias("strength"))
            .group_by("in_feature")
            .agg(pl.col("strength").max())
            .sort(["strength", "in_feature"], descending=[True, False])
        )
        take(feeds["in_feature"].to_list(), f"writes most into {data.next_site}", quota)
    if data.causal is not None and data.causal.height:
        causal = data.causal.sort(pl.col("weight_refit").abs(), descending=True)
        take(causal["output"].unique(maintain_order=True).to_list(), "causally checked", quota)
    if data.features is not None:
        f = data.features
        verdict = "verdict" if "verdict" in f.columns else "status"
        linear = f.filter(pl.col(verdict) == "linear").sort("variance", descending=True)
        take(linear["feature"].to_list(), "clearly linear", quota)
        active = f.sort(["active_count", "feature"], descending=[True, False])
        take(active["feature"].to_list(), "most active", n)
    return picked


def attention_reading(data: RunData) -> tuple[float, Form]:
    """The τ and form attention's shares and position gains are read at: block.json's
    (attention's own calibrated τ, else the MLP's), else the τ the attention connectors or
    the position score were fitted at; the seed's without any of them."""
    for result in (data.block, data.attention, data.positions):
        if result is not None:
            return result.tau, result.form
    return SEED_TAU, "seed"


def attention_form(data: RunData) -> str:
    """The form (raw, fvu, seed) attention's d and position gains are read in."""
    return attention_reading(data)[1]


def attention_share(data: RunData) -> LinearShare | None:
    """Attention's linear share at the τ it is read at (as fitted where block.json lacks it)."""
    if data.attention_share is not None:
        return data.attention_share
    return data.attention.share if data.attention is not None else None


def position_ranking(data: RunData, form: str | None = None) -> pl.DataFrame:
    """The position score's alive attention features (data.positions_table) with a finite
    gain, the largest gain from earlier positions (in `form`, by default attention's) first,
    ties by feature: the order of the layer page's table of the attention features that
    need earlier positions. Empty without a position score."""
    table = data.positions_table
    if table is None or not table.height:
        return pl.DataFrame(schema={"feature": pl.Int64})
    column = GAIN_COLUMN.get(form or attention_form(data), "gain_seed")
    alive = table.filter(pl.col("status") != "dead").filter(pl.col(column).is_finite())
    return alive.sort([column, "feature"], descending=[True, False])


def attention_page_count(features: int) -> int:
    """How many attention features get a page beside `features` output features: half as
    many, at least one (none when no pages are asked for)."""
    return max(1, features // 2) if features > 0 else 0


def interesting_attention_features(data: RunData, n: int) -> dict[int, list[str]]:
    """Up to n attention features (of data.attn_out_site) → why each is shown: those that
    gain most from earlier positions, in the order of the layer page's position table;
    where the run has no position score (or too few alive features in it), the most active
    alive ones. Empty for a run without attention results."""
    if n <= 0 or (data.attention is None and data.positions is None):
        return {}
    picked: dict[int, list[str]] = {}
    ranked = position_ranking(data)
    for rank, j in enumerate(ranked["feature"].head(n).to_list(), start=1):
        picked[int(j)] = [f"gains most from earlier positions (rank {rank} of the position score)"]
    table = data.attention_features
    if len(picked) < n and table is not None and "active_count" in table.columns:
        alive = table.filter(pl.col("status") != "dead") if "status" in table.columns else table
        active = alive.sort(["active_count", "feature"], descending=[True, False])
        for j in active["feature"].to_list():
            if len(picked) >= n:
                break
            picked.setdefault(int(j), ["most active attention feature"])
    return picked


def top_inputs(data: RunData, output: int, k: int) -> list[int]:
    """The output's k connector inputs of largest |refitted weight| (the first rows of its
    page's inputs table)."""
    if data.weights is None or k <= 0:
        return []
    rows = data.weights.filter(pl.col("output") == output).sort(
        pl.col("weight_refit").abs(), descending=True
    )
    return [int(i) for i in rows["input"].head(k).to_list()]


def ablation_targets(
    data: RunData,
    outputs: Iterable[int],
    contexts: int,
    inputs_per_feature: int = 0,
    input_contexts: int = 0,
) -> dict[tuple[str, int], int]:
    """(site slug, feature) → top contexts to ablate: the given output features, and the
    top inputs of each (by |refitted weight|) with fewer contexts."""
    wanted: dict[tuple[str, int], int] = {}
    outputs = [int(j) for j in outputs]
    for j in outputs:
        wanted[(data.out_slug, j)] = contexts
    if input_contexts > 0:
        for j in outputs:
            for i in top_inputs(data, j, inputs_per_feature):
                key = (data.in_slug, i)
                wanted[key] = max(wanted.get(key, 0), input_contexts)
    return wanted
