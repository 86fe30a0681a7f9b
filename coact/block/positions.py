"""`positions`: which output features need other positions than their own.

Attention writes at position t from the stream at every position ≤ t, so a same-position
connector (out codes at t from in codes at t) can miss what it reads elsewhere. Per output
feature this stage asks how much of it is explained only by earlier positions: two linear
fits without L1, exact from Gram statistics, on the held-out split `connect` uses,

    same position   y_t ≈ W x_t + b
    with context    y_t ≈ W x_t + Σ_s V_s summary_s(t) + b

Each is ridge-regularised, with λ per output feature (relative to the mean variance of the
fit's inputs) chosen from `ridge` on validation contexts held back from training, then
refitted on all training contexts. Plain least squares would not compare them fairly: with
(2 + window)× more inputs the context fit overfits more, and on a few tens of thousands of
tokens its held-out error can exceed the same-position fit's even where earlier positions
carry signal.

with the summaries of one context only (never across contexts): "previous" = x_{t−1};
"decayed" = Σ_{m=2..window+1} decay^(m−1)·x_{t−m} (further back than the previous token).
A position the store does not hold (BOS, before the context) contributes zero. The gain
MSE_same − MSE_context is `linearity_table`'s d with "linear" read as "same_position" and
"nonlinear" as "needs_context": the same three forms, τ, bootstrap over held-out contexts
and verdict. Fits with the current codes and one summary alone say which summary carries
the gain ("copies the previous token" against "reads further back"). Everything stays
sparse: summaries are CSR products with a shift operator, never tokens × n_in dense.

    positions.parquet   one row per output feature: MSEs, each fit's λ, gain (raw / fvu /
                        seed), its interval, status and verdict, each summary's gain
                        alone, carrier
    positions.json      the headline (`PositionsResult`, written last: it marks completion)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.block.position_fits import (
    PositionFits,
    PositionsConfig,
    Ridge,
    RidgeChoice,
    add_stats,
    choose_ridge,
    position_fits,
    shift_operator,
    train_stats,
    validation_split,
)
from coact.codes.store import CodeStore
from coact.connectors.sparse import read_pair
from coact.linearity.table import (
    Form,
    LinearShare,
    feature_stats,
    finite_mean,
    linearity_table,
    percent_linear,
)
from coact.models.sites import SitePair
from coact.rundir.files import atomic_write
from coact.rundir.layout import PositionsFiles
from coact.rundir.results import Result, Timings, pair_head, result_key

RESULT_VERSION = 4  # bumped when what positions writes changes: older results are redone
TOP = 10  # most position-dependent features in the headline
_STATUS = {"linear": "same_position", "nonlinear": "needs_context"}
_SHARE_KEYS = {
    "percent_linear": "percent_same_position",
    "linear": "same_position",
    "nonlinear": "needs_context",
    "confident_linear": "confident_same_position",
    "confident_nonlinear": "confident_needs_context",
    "percent_linear_confident": "percent_same_position_confident",
    "percent_linear_possible": "percent_same_position_possible",
    "mlp_gain_beyond_noise": "context_gain_beyond_noise",
    "mlp_loss_beyond_noise": "context_loss_beyond_noise",
}


@dataclass(frozen=True, kw_only=True)
class PositionShare(Result):
    """`LinearShare` read for positions: same_position where the gain from earlier
    positions is ≤ τ, needs_context where it is above, with d's noise floor."""

    percent_same_position: float
    same_position: int
    needs_context: int
    dead: int
    alive: int
    confident_same_position: int | None = None
    confident_needs_context: int | None = None
    undecided: int | None = None
    percent_same_position_confident: float | None = None
    percent_same_position_possible: float | None = None
    context_gain_beyond_noise: int | None = None
    context_loss_beyond_noise: int | None = None

    @classmethod
    def of(cls, share: LinearShare) -> PositionShare:
        return cls(**{_SHARE_KEYS.get(k, k): v for k, v in share.to_dict().items()})


@dataclass(frozen=True, kw_only=True)
class PositionsResult(Result):
    """How many attention features need earlier positions, and the fits behind it."""

    key: str
    in_site: str
    out_site: str
    directory: str
    summaries: list[str]
    decay: float
    window: int
    inputs_same: int
    inputs_context: int
    tokens: int
    tokens_train: int
    tokens_heldout: int
    heldout_contexts: int
    output_chunks: int
    ridge: RidgeChoice
    heldout_nmse_same: float
    heldout_nmse_context: float
    norms: dict[str, float]
    tau: float
    form: Form
    share: PositionShare
    carriers: dict[str, int]  # needs_context features by the summary that carries most
    top_ranked_by: str
    top: list[dict[str, Any]]  # the most position-dependent features
    timings: dict[str, float]


def positions(
    store: CodeStore | str | Path,
    pair: SitePair,
    out_dir: str | Path,
    config: PositionsConfig = PositionsConfig(),
) -> PositionsResult:
    """Fit both least-squares connectors, score every output feature, write the table and
    return (and write to positions.json) the headline. A finished result is reused."""
    store = CodeStore.of(store)
    store.require(pair.slugs)
    files = PositionsFiles(Path(out_dir))
    inputs = [store.fingerprint, str(pair.in_site), str(pair.out_site)]
    key = result_key(inputs, config, RESULT_VERSION, ("progress", "chunk_outputs"))
    if (previous := PositionsResult.finished(files, key)) is not None:
        return previous
    scored = _score(store, pair, config)
    files.path.mkdir(parents=True, exist_ok=True)
    atomic_write(files.positions, scored.table.write_parquet)
    result = _result(scored, key, pair, files, config)
    result.write(files.result)
    return result


@dataclass
class _Scored:
    """Everything `positions` measured, before it writes."""

    table: pl.DataFrame
    share: LinearShare
    fits: PositionFits
    ridge: Ridge
    validation_tokens: int
    inputs_same: int
    inputs_context: int
    tokens: int
    tokens_train: int
    tokens_heldout: int
    timings: dict[str, float]


def _score(store: CodeStore, pair: SitePair, config: PositionsConfig) -> _Scored:
    timings = Timings()
    with timings.part("stats"):
        x, y, tokens, groups, train, held = read_pair(
            store, pair, config.heldout_fraction, config.seed
        )
        x = sp.csr_matrix(x, dtype=np.float64)
        context, position = tokens["context"].to_numpy(), tokens["position"].to_numpy()
        shifts = [shift_operator(context, position, config.lags(s)) for s in config.summaries]
        n_in, n_aug = x.shape[1], x.shape[1] * (1 + len(shifts))

        def augmented(rows: np.ndarray) -> sp.csr_matrix:
            """[current | summaries…] of these rows: each summary is S[rows] @ x, sparse."""
            return sp.csr_matrix(sp.hstack([x[rows], *(s[rows] @ x for s in shifts)], format="csr"))

        blocks = {"current": np.arange(n_in)}
        for k, name in enumerate(config.summaries, start=1):
            blocks[name] = np.arange(k * n_in, (k + 1) * n_in)
        fit_rows, val_rows = validation_split(train, groups, config)
        stats = train_stats(augmented, y, fit_rows, n_aug, config)
    with timings.part("ridge"):
        ridge = Ridge.constant(config.ridge[0], y.shape[1])
        if len(val_rows):
            ridge = choose_ridge(stats, augmented(val_rows), y[val_rows], blocks, config)
            stats = add_stats(stats, train_stats(augmented, y, val_rows, n_aug, config))

    with timings.part("fits"):
        fits = position_fits(stats, augmented(held), y[held], groups[held], blocks, config, ridge)

    with timings.part("tables"):
        table, share = _table(fits, y, ridge, config)
    return _Scored(
        table, share, fits, ridge, len(val_rows), n_in, n_aug, x.shape[0], len(train),
        len(held), timings,
    )  # fmt: skip


def _table(
    fits: PositionFits, y: sp.csr_matrix, ridge: Ridge, config: PositionsConfig
) -> tuple[pl.DataFrame, LinearShare]:
    active, _, variance = feature_stats(y)
    raw = linearity_table(
        fits.mse_same, fits.mse_context, variance, active, **_norms(config),
        config=config.linearity, contexts=fits.contexts,
    )  # fmt: skip
    table = _positions_table(raw, fits.mse_alone, variance, config).with_columns(
        pl.Series("ridge_same", ridge.relative["same"]),
        pl.Series("ridge_context", ridge.relative["context"]),
    )
    return table, percent_linear(raw)


def _norms(config: PositionsConfig) -> dict[str, float]:
    return {"layer_norm": config.layer_norm, "min_layer_norm": config.min_layer_norm}


def _result(
    scored: _Scored, key: str, pair: SitePair, files: PositionsFiles, config: PositionsConfig
) -> PositionsResult:
    table = scored.table
    alive = table.filter(pl.col("status") != "dead")
    top = alive.sort("gain_fvu", descending=True, nulls_last=True).head(TOP)
    columns = ["feature", "gain", "gain_fvu", "gain_fvu_low", "gain_fvu_high", "verdict"]
    columns += [c for c in top.columns if c.startswith("gain_") and c.endswith("_alone_fvu")]
    columns += ["carrier", "active_count"]
    needing = table.filter(pl.col("verdict") == "needs_context")
    return PositionsResult(
        **pair_head(key, pair, files),
        summaries=list(config.summaries),
        decay=config.decay,
        window=config.window,
        inputs_same=scored.inputs_same,
        inputs_context=scored.inputs_context,
        tokens=scored.tokens,
        tokens_train=scored.tokens_train,
        tokens_heldout=scored.tokens_heldout,
        heldout_contexts=len(scored.fits.contexts.tokens),
        output_chunks=scored.fits.chunks,
        ridge=scored.ridge.summary(config, scored.validation_tokens),
        heldout_nmse_same=finite_mean(alive["mse_same"] / alive["variance"]),
        heldout_nmse_context=finite_mean(alive["mse_context"] / alive["variance"]),
        norms=_norms(config),
        tau=config.linearity.tau,
        form=config.linearity.form,
        share=PositionShare.of(scored.share),
        carriers={s: int((needing["carrier"] == s).sum()) for s in config.summaries},
        top_ranked_by="gain_fvu",
        top=top.select(columns).to_dicts(),
        timings=scored.timings,
    )


def _positions_table(
    raw: pl.DataFrame,
    mse_alone: dict[str, np.ndarray],
    variance: np.ndarray,
    config: PositionsConfig,
) -> pl.DataFrame:
    """`linearity_table`'s columns under this stage's names, plus each summary's own gain
    and the carrier: the summary whose gain alone is largest (for needs_context only)."""
    renames = {"mse_linear": "mse_same", "mse_mlp": "mse_context"}
    for c in raw.columns:
        if c == "d" or c.startswith("d_"):
            renames[c] = "gain" + c[1:]
    table = raw.rename(renames).with_columns(
        pl.col(c).replace(_STATUS) for c in ("status", "verdict") if c in raw.columns
    )
    mse_same = table["mse_same"].to_numpy()
    dead = table["status"].to_numpy() == "dead"
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_var = np.where(dead, np.nan, 1.0 / np.where(variance > 0, variance, 1.0))
    gains = {s: mse_same - m for s, m in mse_alone.items()} or {
        config.summaries[0]: table["gain"].to_numpy()
    }
    extra = []
    for s, m in mse_alone.items():
        extra.append(pl.Series(f"mse_with_{s}", m))
    for s, g in gains.items():
        extra += [pl.Series(f"gain_{s}_alone", g), pl.Series(f"gain_{s}_alone_fvu", g * inv_var)]
    names = list(gains)
    best = np.argmax(np.stack(list(gains.values())), axis=0)
    needs = table["status"].to_numpy() == "needs_context"
    carrier = [names[b] if need else None for b, need in zip(best, needs, strict=True)]
    extra.append(pl.Series("carrier", carrier, dtype=pl.String))
    return table.with_columns(*extra)
