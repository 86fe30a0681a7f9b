"""`compose`: the next residual stream's features as a sparse mix of the block's sources.

In activations, resid_pre[ℓ+1] = resid_pre[ℓ] + attn_out[ℓ] + mlp_out[ℓ] holds exactly for
parallel (GPT-NeoX) and sequential (Llama, GPT-2) blocks alike. Each site has its own SAE,
so whether the next stream's *features* are a sparse linear mix of the sources' features
(and which source each one comes from) is an empirical question. This stage fits

    codes(resid_pre[ℓ+1]) ≈ W_r·codes(resid_pre[ℓ]) + W_a·codes(attn_out[ℓ])
                            + W_m·codes(mlp_out[ℓ]) + b

with the exact L1 path on the sources' codes side by side (one Gram pass, the same held-out
split and elbow rule as `connect`), refits the chosen support without L1, and fits least
squares on every input as the ceiling. Everything lands in `out_dir`:

    composition.parquet          per output feature: held-out R² of the sparse, refitted and
                                 least-squares fits; each source's share of the variance,
                                 cov(ŷ_s, y)/var(y), on the training tokens (where the
                                 shares of a fit with an intercept add up to its R²) and,
                                 for least squares, on held-out tokens too (honest where a
                                 wide fit overfits, but with no exact sum); the number of
                                 weights per source; intercepts
    composition_weights.parquet  connections at the chosen α: source site, in feature, out
                                 feature, L1 weight and its refit
    composition_sweep.parquet    one row per α, as connect's sweep.parquet
    composition.json             the headline (written last: its presence marks completion)

`decoded_check` tests the same story in activation space, on raw activations of a few
evaluation contexts: does the identity survive the SAEs, and how much of the next stream
does the decoded connector give back?
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
from torch import Tensor

from coact.codes.store import CodeStore
from coact.connectors.exact import (
    GramStats,
    LassoPathConfig,
    linear_fit,
    mse,
)
from coact.connectors.stage import LINEAR_MAP_ENTRIES, context_split, fit_sparse, weights_table
from coact.errors import CoactError
from coact.models.sites import Site
from coact.rundir.files import atomic_write, finished_result, finite_mean, result_key
from coact.sae.base import SparseAutoencoder

OUTPUT_FILES = tuple(
    f"composition{suffix}.parquet" for suffix in ("", "_weights", "_sweep")
)  # fmt: skip
RESULT_VERSION = 1  # bumped when what compose writes changes: older results are redone


def default_sources(layer: int) -> tuple[Site, ...]:
    """The three terms of the block's exact identity: skip, attention, MLP."""
    return Site("resid_pre", layer), Site("attn_out", layer), Site("mlp_out", layer)


@dataclass(frozen=True)
class CompositionConfig:
    layer: int  # block ℓ: its sources compose resid_pre[ℓ+1]
    sources: tuple[str, ...] | None = None  # None: resid_pre[ℓ], attn_out[ℓ], mlp_out[ℓ]
    target: str | None = None  # None: resid_pre[ℓ+1]
    heldout_fraction: float = 0.1  # of contexts, as in connect
    seed: int = 0
    path: LassoPathConfig = field(default_factory=LassoPathConfig)
    magnitude: float = 0.05  # a weight is large when |w|·std(x_in)/std(y_out) ≥ this
    least_squares_chunk_outputs: int | None = None  # None: as many as fit LINEAR_MAP_ENTRIES
    progress: bool = True

    def source_sites(self) -> tuple[Site, ...]:
        if self.sources is None:
            return default_sources(self.layer)
        sites = tuple(Site.parse(s) for s in self.sources)
        if not sites or len(set(sites)) != len(sites):
            raise CoactError(f"composition sources must be distinct and non-empty: {self.sources}")
        return sites

    def target_site(self) -> Site:
        target = (
            Site("resid_pre", self.layer + 1) if self.target is None else Site.parse(self.target)
        )
        if target in self.source_sites():
            raise CoactError(f"the composition target {target} is also one of its sources")
        return target


def source_keys(sources: Sequence[Site]) -> list[str]:
    """Column suffix per source: its kind (`resid_pre`), or `resid_pre_3` if kinds repeat."""
    kinds = [s.kind for s in sources]
    unique = len(set(kinds)) == len(kinds)
    return [s.kind if unique else s.slug.replace(".", "_") for s in sources]


def compose(
    store: CodeStore | str | Path, config: CompositionConfig, out_dir: str | Path
) -> dict[str, Any]:
    """Fit, measure and write the tables; return (and write to composition.json) the
    headline. A finished result for the same codes and config is reused, not recomputed."""
    store = store if isinstance(store, CodeStore) else CodeStore.open(store)
    sources, target = config.source_sites(), config.target_site()
    if missing := [s.slug for s in (*sources, target) if s.slug not in store.sites]:
        raise CoactError(f"sites {', '.join(missing)} are not in the code store {store.directory}")
    if not 0 < config.heldout_fraction < 1:
        raise CoactError(f"heldout_fraction must be in (0, 1), got {config.heldout_fraction}")
    out_dir = Path(out_dir)
    key = result_key(store.fingerprint, config, RESULT_VERSION)
    done = out_dir / "composition.json"
    if (previous := finished_result(done, key, OUTPUT_FILES)) is not None:
        return previous
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    blocks = [store.read_site(s.slug) for s in sources]
    widths = [b.shape[1] for b in blocks]
    offsets = np.concatenate([[0], np.cumsum(widths)])
    x = sp.csr_matrix(sp.hstack(blocks, format="csr"))
    y = store.read_site(target.slug)
    _, train, held = context_split(store.read_tokens(), config.heldout_fraction, config.seed, store)
    stats = GramStats.empty(x.shape[1], y.shape[1]).add(x[train], y[train])
    stats_held = GramStats.empty(x.shape[1], y.shape[1]).add(x[held], y[held])
    timings["gram_s"] = time.perf_counter() - clock

    sparse = fit_sparse(stats, stats_held, config.path, config.magnitude, config.progress)
    path, held_nmse, sweep, chosen = sparse.path, sparse.held_nmse, sparse.sweep, sparse.chosen
    coef, refit, refit_intercepts = sparse.coef, sparse.refit, sparse.refit_intercepts
    timings["path_s"] = sparse.path_s

    clock = time.perf_counter()
    weights = _weights_table(coef, refit, stats, config.magnitude, sources, offsets, target)
    timings["refit_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    ceiling = _least_squares(stats, stats_held, offsets, config.least_squares_chunk_outputs)
    timings["least_squares_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    var, var_held = stats.y_var(), stats_held.y_var()
    fit = _Fit(
        r2_sparse=1 - held_nmse[chosen],
        r2_refit=_r2(mse(stats_held, refit, refit_intercepts), var_held),
        r2_refit_train=_r2(mse(stats, refit, refit_intercepts), var),
        shares_refit=variance_shares(stats, refit, offsets),
        intercept=path.intercepts[chosen],
        intercept_refit=refit_intercepts,
    )
    table = _features_table(fit, ceiling, coef, offsets, var, var_held, sources)
    timings["tables_s"] = time.perf_counter() - clock

    for name, frame in {"": table, "_weights": weights, "_sweep": sweep}.items():
        atomic_write(out_dir / f"composition{name}.parquet", frame.write_parquet)
    alive = var > 0
    n_alive = max(int(alive.sum()), 1)
    named = dict(zip(source_keys(sources), map(str, sources), strict=True))
    summary = {
        "key": key,
        "layer": config.layer,
        "sources": [str(s) for s in sources],
        "source_keys": named,
        "source_widths": widths,
        "target": str(target),
        "target_width": int(y.shape[1]),
        "directory": str(out_dir),
        "tokens_train": len(train),
        "tokens_heldout": len(held),
        "alive": int(alive.sum()),
        "dead": int((~alive).sum()),
        "alpha": float(path.alphas[chosen]),
        "alpha_index": int(chosen),
        "n_alphas": len(path.alphas),
        "path_converged": bool(path.converged.all()),
        "r2_sparse": finite_mean(table["r2_sparse"]),
        "r2_refit": finite_mean(table["r2_refit"]),
        "r2_ls": finite_mean(table["r2_ls"]),
        "r2_ls_train": finite_mean(table["r2_ls_train"]),
        "variance_share_ls": {s: finite_mean(table[f"share_ls_{k}"]) for k, s in named.items()},
        "variance_share_ls_heldout": {
            s: finite_mean(table[f"share_ls_heldout_{k}"]) for k, s in named.items()
        },
        "variance_share_refit": {
            s: finite_mean(table[f"share_refit_{k}"]) for k, s in named.items()
        },
        "weights_per_output": float(coef.nnz / n_alive),
        "weights_per_output_by_source": {
            s: float(table[f"weights_{k}"].sum() / n_alive) for k, s in named.items()
        },
        "timings": timings,
    }
    atomic_write(done, lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    return summary


def variance_shares(
    stats: GramStats, coef: Any, offsets: Sequence[int] | np.ndarray, outputs: Any = None
) -> np.ndarray:
    """(n_sources, len(outputs)) share of each output's variance that source s explains,
    cov(ŷ_s, y)/var(y) with ŷ_s = X_s w_s (source s's part of the prediction), over the
    stats' tokens, from the sums alone: cov(ŷ_s, y) = w_sᵀ(XᵀY/n − μ_x ȳ) on s's rows.

    For a least-squares fit with an intercept on these tokens the residual is orthogonal
    to ŷ, so var(ŷ) = cov(ŷ, y) and the shares add up to R² exactly (a share can be
    negative when a source's part runs against the rest). NaN where var(y) = 0.
    `coef`: n_in × len(outputs), dense or sparse; `offsets`: each source's first row, and
    n_in last."""
    cols = np.arange(stats.n_out) if outputs is None else np.asarray(outputs, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets[0] != 0 or offsets[-1] != stats.n_in or np.any(np.diff(offsets) <= 0):
        raise ValueError(f"offsets {offsets.tolist()} do not split {stats.n_in} inputs")
    n = max(stats.n, 1)
    mu, ybar = stats.means()
    out = np.zeros((len(offsets) - 1, len(cols)))
    if sp.issparse(coef):
        c = sp.coo_matrix(coef)
        xty = np.asarray(stats.xty.tocsr()[c.row, cols[c.col]]).ravel()
        part = c.data * (xty / n - mu[c.row] * ybar[cols[c.col]])
        source = np.searchsorted(offsets, c.row, side="right") - 1
        np.add.at(out, (source, c.col), part)
    else:
        part = np.asarray(coef, dtype=np.float64) * stats.cross(cols)
        out = np.add.reduceat(part, offsets[:-1], axis=0)
    var = stats.y_var()[cols]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, out / np.where(var > 0, var, 1.0), np.nan)


@dataclass
class _Fit:
    r2_sparse: np.ndarray  # held-out, L1 weights at the chosen α
    r2_refit: np.ndarray  # held-out, least squares on the chosen support
    r2_refit_train: np.ndarray
    shares_refit: np.ndarray  # (n_sources, n_out), training tokens
    intercept: np.ndarray
    intercept_refit: np.ndarray


@dataclass
class _Ceiling:
    r2: np.ndarray  # held-out
    r2_train: np.ndarray
    shares: np.ndarray  # (n_sources, n_out), training tokens: they add up to r2_train
    shares_heldout: np.ndarray  # the same covariances on held-out tokens (no exact sum)


def _least_squares(
    stats: GramStats, stats_held: GramStats, offsets: np.ndarray, chunk: int | None
) -> _Ceiling:
    """Least squares on every input, without L1 (the ceiling of any linear composition),
    a chunk of outputs at a time: its map is dense n_in × outputs."""
    n_out = stats.n_out
    per_chunk = chunk or max(1, LINEAR_MAP_ENTRIES // max(stats.n_in, 1))
    var, var_held = stats.y_var(), stats_held.y_var()
    r2, r2_train = np.full(n_out, np.nan), np.full(n_out, np.nan)
    shares = np.full((len(offsets) - 1, n_out), np.nan)
    shares_held = shares.copy()
    for start in range(0, n_out, per_chunk):
        outputs = np.arange(start, min(start + per_chunk, n_out))
        w, b = linear_fit(stats, outputs=outputs)
        r2[outputs] = _r2(mse(stats_held, w, b, outputs), var_held[outputs])
        r2_train[outputs] = _r2(mse(stats, w, b, outputs), var[outputs])
        shares[:, outputs] = variance_shares(stats, w, offsets, outputs)
        shares_held[:, outputs] = variance_shares(stats_held, w, offsets, outputs)
    return _Ceiling(r2, r2_train, shares, shares_held)


def _r2(error: np.ndarray, var: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, 1 - error / np.where(var > 0, var, 1.0), np.nan)


def _features_table(
    fit: _Fit,
    ceiling: _Ceiling,
    coef: sp.csc_matrix,
    offsets: np.ndarray,
    var: np.ndarray,
    var_held: np.ndarray,
    sources: Sequence[Site],
) -> pl.DataFrame:
    keys = source_keys(sources)
    rows = sp.coo_matrix(coef)
    source = np.searchsorted(offsets, rows.row, side="right") - 1
    counts = np.zeros((len(sources), coef.shape[1]), dtype=np.int64)
    np.add.at(counts, (source, rows.col), 1)
    columns: dict[str, Any] = {
        "feature": np.arange(coef.shape[1], dtype=np.int64),
        "status": np.where(var > 0, "alive", "dead"),
        "variance": var,
        "variance_heldout": var_held,
        "r2_sparse": fit.r2_sparse,
        "r2_refit": fit.r2_refit,
        "r2_ls": ceiling.r2,
        "r2_refit_train": fit.r2_refit_train,
        "r2_ls_train": ceiling.r2_train,
    }
    for i, k in enumerate(keys):
        columns[f"share_ls_{k}"] = ceiling.shares[i]
    for i, k in enumerate(keys):
        columns[f"share_ls_heldout_{k}"] = ceiling.shares_heldout[i]
    for i, k in enumerate(keys):
        columns[f"share_refit_{k}"] = fit.shares_refit[i]
    for i, k in enumerate(keys):
        columns[f"weights_{k}"] = counts[i]
    columns["n_weights"] = counts.sum(axis=0)
    columns["intercept"] = fit.intercept
    columns["intercept_refit"] = fit.intercept_refit
    return pl.DataFrame(columns)


def _weights_table(
    coef: sp.csc_matrix,
    refit: sp.csc_matrix,
    stats: GramStats,
    magnitude: float,
    sources: Sequence[Site],
    offsets: np.ndarray,
    target: Site,
) -> pl.DataFrame:
    """connect's weights table, its concatenated input split back into (site, feature)."""
    table = weights_table(coef, refit, stats, magnitude)
    inputs = table["input"].to_numpy()
    source = np.searchsorted(offsets, inputs, side="right") - 1
    names = np.array([str(s) for s in sources], dtype=object)
    return table.select(
        pl.lit(str(target)).alias("target_site"),
        pl.col("output").alias("out_feature"),
        pl.Series("source_site", names[source].tolist(), dtype=pl.String),
        pl.Series("in_feature", (inputs - offsets[source]).astype(np.int64)),
        "weight",
        "weight_refit",
        "standardised",
        "large",
    )


# ---------------------------------------------------------------- the decoded check


@dataclass(frozen=True, eq=False)
class CompositionConnector:
    """target codes ≈ [codes of each source, side by side] @ weights + intercepts."""

    sources: tuple[Site, ...]
    widths: tuple[int, ...]
    target: Site
    weights: sp.csr_matrix | np.ndarray  # (Σ widths, n_out)
    intercepts: np.ndarray  # (n_out,)

    def __post_init__(self) -> None:
        if self.weights.shape != (sum(self.widths), len(self.intercepts)):
            raise CoactError(
                f"composition weights of shape {self.weights.shape} do not fit sources of "
                f"widths {self.widths} and {len(self.intercepts)} outputs"
            )

    @property
    def layer(self) -> int:
        return self.target.layer - 1

    @classmethod
    def load(cls, out_dir: str | Path, refit: bool = True) -> CompositionConnector:
        """The connector `compose` chose: refitted weights on its support (or the L1 ones)."""
        out_dir = Path(out_dir)
        done = out_dir / "composition.json"
        if not done.is_file():
            raise CoactError(f"no composition result in {out_dir}; run the composition stage")
        head = json.loads(done.read_text())
        sources = tuple(Site.parse(s) for s in head["sources"])
        widths = tuple(int(w) for w in head["source_widths"])
        offsets = dict(zip(map(str, sources), np.cumsum([0, *widths[:-1]]), strict=True))
        weights = pl.read_parquet(out_dir / "composition_weights.parquet")
        features = pl.read_parquet(out_dir / "composition.parquet").sort("feature")
        rows = weights["in_feature"].to_numpy() + np.array(
            [offsets[s] for s in weights["source_site"].to_list()], dtype=np.int64
        )
        values = weights["weight_refit" if refit else "weight"].to_numpy()
        shape = (sum(widths), int(head["target_width"]))
        matrix = sp.csr_matrix((values, (rows, weights["out_feature"].to_numpy())), shape=shape)
        intercepts = features["intercept_refit" if refit else "intercept"].to_numpy()
        return cls(sources, widths, Site.parse(head["target"]), matrix, intercepts)

    def predict(self, codes: Sequence[Any]) -> np.ndarray:
        """Target codes (tokens × n_out) from each source's codes, in `sources` order
        (dense arrays, tensors or sparse matrices)."""
        blocks = [sp.csr_matrix(_numpy(c)) if not sp.issparse(c) else c for c in codes]
        x = sp.hstack(blocks, format="csr")
        out = x @ self.weights
        out = out.toarray() if sp.issparse(out) else np.asarray(out)
        return out + self.intercepts


def least_squares_connector(
    codes: Mapping[Site, Any], target: Site, target_codes: Any
) -> CompositionConnector:
    """Least squares (with intercept, no L1) from the sources' codes, in the mapping's
    order, to the target's: the dense ceiling as a connector, for small sites and tests."""
    sources = tuple(codes)
    blocks = [sp.csr_matrix(_numpy(c)) if not sp.issparse(c) else c for c in codes.values()]
    x, y = sp.hstack(blocks, format="csr"), sp.csr_matrix(_numpy(target_codes))
    stats = GramStats.empty(x.shape[1], y.shape[1]).add(x, y)
    weights, intercepts = linear_fit(stats)
    widths = tuple(block.shape[1] for block in blocks)
    return CompositionConnector(sources, widths, target, weights, intercepts)


CHECKS = {
    "identity_raw": "resid_pre[ℓ] + attn_out[ℓ] + mlp_out[ℓ], raw activations",
    "identity_decoded": "the same sum of each site's SAE reconstruction",
    "composition_decoded": "the target SAE's decoding of the composition connector's codes",
    "target_sae": "the target SAE's own reconstruction of resid_pre[ℓ+1]",
}


@torch.no_grad()
def decoded_check(
    acts: Mapping[Site, Tensor],
    saes: Mapping[Site, SparseAutoencoder],
    connector: CompositionConnector | None,
    *,
    layer: int | None = None,
    skip_first_positions: int = 1,
    batch_tokens: int = 256,
) -> pl.DataFrame:
    """FVU against the true resid_pre[ℓ+1] (Σ‖x − x̂‖² / Σ‖x − mean x‖² over tokens) of:
    the identity on raw activations (≈ 0 unless the sites are read wrong), the identity
    through the SAEs (what three reconstruction errors cost together), the composition
    connector decoded, SAE_out.decode(W·codes + b), and the target SAE alone (the floor a
    connector predicting its codes perfectly would reach). One row per check.

    `acts`: (batch, seq, d) activations as `coact.models.tracing.capture` returns them, at
    resid_pre[ℓ], attn_out[ℓ], mlp_out[ℓ], resid_pre[ℓ+1] and the connector's sources;
    `saes` for the same sites. The first `skip_first_positions` positions (BOS) are left
    out, as in SAE evaluation."""
    if layer is None:
        if connector is None:
            raise CoactError("decoded_check needs a layer or a composition connector")
        layer = connector.layer
    identity = (*default_sources(layer), Site("resid_pre", layer + 1))
    target = identity[-1] if connector is None else connector.target
    needed = dict.fromkeys([*identity, target, *(connector.sources if connector else ())])
    if missing := [str(s) for s in needed if s not in acts]:
        raise CoactError(f"decoded check: no activations for {', '.join(missing)}")
    if missing := [str(s) for s in needed if s not in saes]:
        raise CoactError(f"decoded check: no SAE for {', '.join(missing)}")
    flat = {s: acts[s][:, skip_first_positions:].reshape(-1, acts[s].shape[-1]) for s in needed}
    n_tokens = flat[target].shape[0]
    if n_tokens == 0:
        raise CoactError("decoded check: no tokens left after the skipped positions")
    checks = [*CHECKS] if connector is not None else [c for c in CHECKS if "composition" not in c]
    reference = {c: identity[-1] if c.startswith("identity") else target for c in checks}
    sse = dict.fromkeys(checks, 0.0)
    sums = {s: torch.zeros(flat[s].shape[-1], dtype=torch.float64) for s in {identity[-1], target}}
    squares = dict.fromkeys(sums, 0.0)
    for start in range(0, n_tokens, batch_tokens):
        part = {s: v[start : start + batch_tokens] for s, v in flat.items()}
        for site in sums:
            truth = part[site].double()
            sums[site] += truth.sum(0).cpu()
            squares[site] += float(truth.pow(2).sum())

        def recon(site: Site, part: dict[Site, Tensor] = part) -> Tensor:
            return saes[site].decode(saes[site].encode(part[site])).double()

        guesses = {
            "identity_raw": sum((part[s].double() for s in identity[:-1]), torch.zeros(())),
            "identity_decoded": sum((recon(s) for s in identity[:-1]), torch.zeros(())),
            "target_sae": recon(target),
        }
        if connector is not None:
            codes = [saes[s].encode(part[s]) for s in connector.sources]
            predicted = torch.as_tensor(connector.predict(codes)).to(part[target])
            guesses["composition_decoded"] = saes[target].decode(predicted).double()
        for name in checks:
            error = guesses[name] - part[reference[name]].double()
            sse[name] += float(error.pow(2).sum())
    spread = {s: squares[s] - float(sums[s].pow(2).sum()) / n_tokens for s in sums}
    return pl.DataFrame(
        {
            "check": checks,
            "what": [CHECKS[c] for c in checks],
            "fvu": [
                sse[c] / spread[reference[c]] if spread[reference[c]] > 0 else float("nan")
                for c in checks
            ],
            "mse": [sse[c] / n_tokens for c in checks],
            "tokens": [n_tokens] * len(checks),
        }
    )


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)
