"""The least-squares fits behind the position score: the summaries of earlier positions
(sparse shift operators), Gram statistics of [current | summaries], the ridge λ chosen per
output on validation contexts, and the held-out errors of every fit. `positions` (the
stage) reads them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.connectors.exact import GramStats, linear_fit
from coact.connectors.train import split_rows
from coact.errors import CoactError
from coact.linearity.fits import LINEAR_MAP_ENTRIES
from coact.linearity.table import HeldoutContexts, LinearityConfig, finite_mean
from coact.progress import tqdm
from coact.rundir.results import Result

Summary = Literal["previous", "decayed"]
SUMMARIES: tuple[Summary, ...] = get_args(Summary)
BLOCK_TOKENS = 16384  # tokens per block when accumulating sparse Gram statistics
DENSE_GRAM = 8192  # up to this many augmented inputs the Gram is summed densely


@dataclass(frozen=True)
class PositionsConfig:
    summaries: tuple[Summary, ...] = ("previous", "decayed")
    decay: float = 0.5  # weight of position t−m in "decayed" is decay^(m−1)
    window: int = 4  # "decayed" reaches back to t − window − 1
    heldout_fraction: float = 0.1  # of contexts; with `seed`, the split `connect` uses
    seed: int = 0
    linearity: LinearityConfig = field(default_factory=LinearityConfig)
    layer_norm: float = 1.0  # for the seed's normalisation; see linearity.seed_scale
    min_layer_norm: float = 1.0
    # ridge λ candidates, × the mean variance of a fit's inputs (0: plain least squares);
    # per output, each fit takes the one with the lowest validation error (one candidate:
    # no validation, all training contexts fit)
    ridge: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    validation_fraction: float = 0.2  # of the training contexts, to choose λ on
    chunk_outputs: int | None = None  # outputs per least-squares solve; None: as memory allows
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [s for s in self.summaries if s not in SUMMARIES]
        if not self.summaries or unknown or len(set(self.summaries)) != len(self.summaries):
            raise CoactError(
                f"summaries must be distinct names from {SUMMARIES}, got {self.summaries}"
            )
        if not 0 < self.decay <= 1 or self.window < 1:
            raise CoactError(f"need 0 < decay ≤ 1 and window ≥ 1, got {self.decay}, {self.window}")
        if not 0 < self.heldout_fraction < 1:
            raise CoactError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not self.ridge or any(not 0 <= r < float("inf") for r in self.ridge):
            raise CoactError(f"ridge needs candidates ≥ 0, got {self.ridge}")
        if not 0 < self.validation_fraction < 1:
            raise CoactError(
                f"validation_fraction must be in (0, 1), got {self.validation_fraction}"
            )
        if self.chunk_outputs is not None and self.chunk_outputs < 1:
            raise CoactError(f"chunk_outputs must be ≥ 1, got {self.chunk_outputs}")

    def lags(self, summary: Summary) -> dict[int, float]:
        """Offset m ↦ weight of x_{t−m} in the summary."""
        if summary == "previous":
            return {1: 1.0}
        return {m: self.decay ** (m - 1) for m in range(2, self.window + 2)}


def shift_operator(
    context: np.ndarray, position: np.ndarray, lags: dict[int, float]
) -> sp.csr_matrix:
    """n × n sparse S with S[r, r'] = w_m where r' is the stored row of the same context at
    position(r) − m: S @ codes is then Σ_m w_m·codes[t−m], zero where t−m is not stored."""
    context, position = np.asarray(context, np.int64), np.asarray(position, np.int64)
    n = len(position)
    if len(context) != n:
        raise CoactError(f"{len(context)} context ids for {n} positions")
    if n == 0:
        return sp.csr_matrix((0, 0))
    if position.min() < 0:
        raise CoactError("negative positions in the token table")
    span = int(position.max()) + 1
    key = context * span + position  # one integer per (context, position)
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    if np.any(np.diff(ordered) == 0):
        raise CoactError("the token table repeats a (context, position): cannot place tokens")
    rows, cols, vals = [], [], []
    for m, weight in lags.items():
        reach = np.flatnonzero(position >= m)  # t − m in the same context (not a neighbour)
        at = np.minimum(np.searchsorted(ordered, key[reach] - m), n - 1)
        found = ordered[at] == key[reach] - m
        rows.append(reach[found])
        cols.append(order[at[found]])
        vals.append(np.full(int(found.sum()), weight))
    data = (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols)))
    return sp.csr_matrix(data, shape=(n, n))


def context_summaries(
    codes: sp.csr_matrix, tokens: pl.DataFrame, config: PositionsConfig
) -> dict[Summary, sp.csr_matrix]:
    """Each summary of `config` as a tokens × n_in CSR matrix (float64), within contexts."""
    context, position = tokens["context"].to_numpy(), tokens["position"].to_numpy()
    if codes.shape[0] != len(position):
        raise CoactError(f"{codes.shape[0]} rows of codes for {len(position)} tokens")
    codes = sp.csr_matrix(codes, dtype=np.float64)
    return {
        s: sp.csr_matrix(shift_operator(context, position, config.lags(s)) @ codes)
        for s in config.summaries
    }


@dataclass(frozen=True, kw_only=True)
class RidgeChoice(Result):
    """The λ candidates, how many outputs took each per fit, and their validation NMSE."""

    candidates: list[float]
    outputs_per_candidate: dict[str, dict[str, int]]
    validation_nmse_per_candidate: dict[str, list[float]]
    validation_tokens: int


def train_stats(
    augmented: Callable[[np.ndarray], sp.csr_matrix],
    y: sp.csr_matrix,
    rows: np.ndarray,
    n_aug: int,
    config: PositionsConfig,
) -> GramStats:
    """Gram statistics of [current | summaries] → y over `rows`, a block of tokens at a
    time (the augmented codes of all tokens at once would be (2 + window)× the codes).
    Summaries make the Gram nearly dense (each row has up to (2 + window)× the nonzeros),
    so up to DENSE_GRAM inputs each block's sparse product is added into a dense array:
    summing nearly dense sparse matrices block after block costs more than the products,
    and linear_fit densifies the Gram there anyway."""
    if n_aug > DENSE_GRAM:
        stats = GramStats.empty(n_aug, y.shape[1])
        for r in _blocks(rows, BLOCK_TOKENS, config.progress):
            stats.add(augmented(r), y[r])
        return stats
    n, x_sum = 0, np.zeros(n_aug)
    y_sum, y_sq_sum = np.zeros(y.shape[1]), np.zeros(y.shape[1])
    xtx, xty = np.zeros((n_aug, n_aug)), np.zeros((n_aug, y.shape[1]))
    for r in _blocks(rows, BLOCK_TOKENS, config.progress):
        z, yb = augmented(r), sp.csr_matrix(y[r], dtype=np.float64)
        zt = z.T.tocsr()
        for total, product in ((xtx, zt @ z), (xty, zt @ yb)):
            coo = sp.coo_matrix(product)  # a product has no repeated (row, column)
            total[coo.row, coo.col] += coo.data
        n += len(r)
        x_sum += np.asarray(z.sum(axis=0)).ravel()
        y_sum += np.asarray(yb.sum(axis=0)).ravel()
        y_sq_sum += np.asarray(yb.multiply(yb).sum(axis=0)).ravel()
    return GramStats(n, x_sum, y_sum, y_sq_sum, sp.csr_matrix(xtx), sp.csr_matrix(xty))


def validation_split(
    train: np.ndarray, groups: np.ndarray, config: PositionsConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(rows λ is fitted on, validation rows): whole training contexts, none when `ridge`
    has a single candidate (there is nothing to choose)."""
    if len(config.ridge) == 1:
        return train, train[:0]
    fit, val = split_rows(len(train), config.validation_fraction, config.seed + 2, groups[train])
    return train[fit], train[val]


@dataclass
class Ridge:
    """Per output, the relative λ of each fit ("same", "context"; a summary alone takes
    "context"'s) and, where chosen on validation tokens, each candidate's validation NMSE."""

    relative: dict[str, np.ndarray]  # fit ↦ (n_out,)
    validation_nmse: dict[str, np.ndarray] = field(default_factory=dict)  # (candidates, n_out)

    @classmethod
    def constant(cls, rel: float, n_out: int) -> Ridge:
        return cls({name: np.full(n_out, float(rel)) for name in ("same", "context")})

    def groups(self, name: str, outputs: np.ndarray) -> list[tuple[float, np.ndarray]]:
        """(relative λ, the positions in `outputs` that take it), one per distinct λ."""
        rel = self.relative["same" if name == "same" else "context"][outputs]
        return [(float(r), np.flatnonzero(rel == r)) for r in np.unique(rel)]

    def summary(self, config: PositionsConfig, validation_tokens: int) -> RidgeChoice:
        chosen = {
            name: {f"{c:g}": int((rel == c).sum()) for c in config.ridge}
            for name, rel in self.relative.items()
        }
        nmse = {
            name: [finite_mean(row) for row in curve]
            for name, curve in self.validation_nmse.items()
        }
        return RidgeChoice(
            candidates=list(config.ridge),
            outputs_per_candidate=chosen,
            validation_nmse_per_candidate=nmse,
            validation_tokens=validation_tokens,
        )


def choose_ridge(
    stats: GramStats,
    z_val: sp.csr_matrix,
    y_val: sp.csr_matrix,
    blocks: dict[str, np.ndarray],
    config: PositionsConfig,
) -> Ridge:
    """Per fit (same position; with every summary) and output, the candidate λ whose map,
    fitted on `stats`, has the lowest error on the validation tokens (where an output is
    constant there, the candidate with the lowest mean error over the others)."""
    n_out = stats.n_out
    y_cols = sp.csc_matrix(y_val, dtype=np.float64)
    var = np.asarray(y_cols.multiply(y_cols).mean(axis=0)).ravel()
    var = var - np.asarray(y_cols.mean(axis=0)).ravel() ** 2
    usable = (var > 1e-12 * max(float(var.max(initial=0.0)), 1e-300)) & (stats.y_var() > 0)
    chosen, curves = {}, {}
    for name, cols in (("same", blocks["current"]), ("context", np.arange(stats.n_in))):
        design = stats if len(cols) == stats.n_in else _restrict(stats, cols)
        z = sp.csr_matrix(z_val[:, cols])
        scale = float(design.gram()[1].mean())
        per_chunk = max(1, LINEAR_MAP_ENTRIES // len(cols))
        nmse = np.full((len(config.ridge), n_out), np.nan)
        for k, rel in enumerate(
            tqdm(config.ridge, desc=f"positions: λ of {name}", disable=not config.progress)
        ):
            for start in range(0, n_out, per_chunk):
                outputs = np.arange(start, min(start + per_chunk, n_out))
                w, b = linear_fit(design, l2=rel * scale, outputs=outputs)
                error = np.asarray(z @ w) + b - y_cols[:, outputs].toarray()
                with np.errstate(divide="ignore", invalid="ignore"):
                    nmse[k, outputs] = np.where(
                        usable[outputs], (error**2).mean(axis=0) / var[outputs], np.nan
                    )
        # an output constant on the validation tokens (rare features often are) takes the
        # candidate best on average: plain least squares would be its most overfitted fit
        on_average = int(np.argmin(_nan_means(nmse))) if usable.any() else 0
        best = np.where(
            usable, np.argmin(np.where(np.isnan(nmse), np.inf, nmse), axis=0), on_average
        )
        chosen[name] = np.asarray(config.ridge, dtype=np.float64)[best]
        curves[name] = nmse
    return Ridge(chosen, curves)


def _nan_means(rows: np.ndarray) -> np.ndarray:
    """Mean of each row over its finite entries (rows of NaN only: +inf)."""
    finite = np.isfinite(rows)
    counts = finite.sum(axis=1)
    sums = np.where(finite, rows, 0.0).sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)


def add_stats(a: GramStats, b: GramStats) -> GramStats:
    """The statistics of two disjoint sets of tokens together (every field is a sum)."""
    return GramStats(
        a.n + b.n, a.x_sum + b.x_sum, a.y_sum + b.y_sum, a.y_sq_sum + b.y_sq_sum,
        sp.csr_matrix(a.xtx + b.xtx), sp.csr_matrix(a.xty + b.xty),
    )  # fmt: skip


def _blocks(rows: np.ndarray, size: int, progress: bool) -> Iterable[np.ndarray]:
    blocks = [rows[i : i + size] for i in range(0, len(rows), size)]
    return tqdm(blocks, desc="positions: gram", disable=not progress or len(blocks) < 2)


def _restrict(stats: GramStats, cols: np.ndarray) -> GramStats:
    """The statistics of a subset of the inputs: every fit below reads one accumulation."""
    xtx = stats.xtx[cols][:, cols]
    return GramStats(stats.n, stats.x_sum[cols], stats.y_sum, stats.y_sq_sum, xtx, stats.xty[cols])


@dataclass
class PositionFits:
    mse_same: np.ndarray  # held-out, per output
    mse_context: np.ndarray
    mse_alone: dict[str, np.ndarray]  # per summary: current and that summary only
    contexts: HeldoutContexts  # per held-out context Σ(e_same² − e_context²)
    chunks: int


def position_fits(
    stats: GramStats,
    z_held: sp.csr_matrix,
    y_held: sp.csr_matrix,
    groups_held: np.ndarray,
    blocks: dict[str, np.ndarray],
    config: PositionsConfig,
    ridge: Ridge,
) -> PositionFits:
    """Ridge fits without L1 from the training statistics at `ridge`'s λ, per chunk of
    outputs (the maps are dense inputs × outputs): same-position, with all summaries, and
    (with several) with each summary alone. Held-out errors come from one pass of
    predictions over the held-out tokens, which the per-context sums need anyway (from
    held-out statistics, wᵀ(XᵀX)w would cost a dense product with the nearly dense Gram per
    fit)."""
    n_out, n_held = stats.n_out, z_held.shape[0]
    columns = {"same": blocks["current"], "context": np.arange(stats.n_in)}
    if len(blocks) > 2:
        columns |= {s: np.concatenate([blocks["current"], blocks[s]]) for s in config.summaries}
    designs = {
        name: (
            stats if name == "context" else _restrict(stats, cols),
            sp.csr_matrix(z_held[:, cols]),
        )
        for name, cols in columns.items()
    }
    width = sum(len(cols) for cols in columns.values())  # map entries per output, all fits
    per_chunk = config.chunk_outputs or max(1, LINEAR_MAP_ENTRIES // width)
    chunks = [np.arange(n_out)[i : i + per_chunk] for i in range(0, n_out, per_chunk)]
    _, inverse = np.unique(groups_held, return_inverse=True)
    n_contexts = int(inverse.max()) + 1 if n_held else 0
    diff, sse = np.zeros((n_contexts, n_out)), {name: np.zeros(n_out) for name in designs}
    y_cols = sp.csc_matrix(y_held)
    for outputs in tqdm(chunks, desc="positions: fits", disable=not config.progress):
        maps = {
            name: _ridge_fit(train, ridge, name, outputs) for name, (train, _) in designs.items()
        }
        y_chunk = sp.csr_matrix(y_cols[:, outputs])
        for start in range(0, n_held, 4096):
            rows = np.arange(start, min(start + 4096, n_held))
            target = y_chunk[rows].toarray()
            errors = {}
            for name, (w, b) in maps.items():
                errors[name] = np.asarray(designs[name][1][rows] @ w) + b - target
                sse[name][outputs] += (errors[name] ** 2).sum(axis=0)
            to_context = sp.csr_matrix(
                (np.ones(len(rows)), (inverse[rows], np.arange(len(rows)))),
                shape=(n_contexts, len(rows)),
            )
            diff[:, outputs] += to_context @ (errors["same"] ** 2 - errors["context"] ** 2)
    mse = {name: total / max(n_held, 1) for name, total in sse.items()}
    alone: dict[str, np.ndarray] = {s: mse[s] for s in config.summaries if s in mse}
    tokens = np.bincount(inverse, minlength=n_contexts).astype(np.float64)
    contexts = HeldoutContexts(diff, tokens)
    return PositionFits(mse["same"], mse["context"], alone, contexts, len(chunks))


def _ridge_fit(
    stats: GramStats, ridge: Ridge, name: str, outputs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The map of fit `name` for `outputs`, each at its own λ (one solve per distinct λ)."""
    scale = float(stats.gram()[1].mean())
    w, b = np.zeros((stats.n_in, len(outputs))), np.zeros(len(outputs))
    for rel, where in ridge.groups(name, outputs):
        w[:, where], b[where] = linear_fit(stats, l2=rel * scale, outputs=outputs[where])
    return w, b
