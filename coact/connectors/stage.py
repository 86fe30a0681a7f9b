"""`connect`: how the features of one site are computed from those of another.

From a code store it fits, on a held-out split by context: the L1 path of sparse linear
connectors (its Pareto frontier of held-out error against size, and the elbow chosen
automatically), the stability of the chosen connections across disjoint halves of the
training tokens, and the linearity of every output feature (least squares against an mlp
that starts from it, both without L1). Everything lands in `<run>/connect/`:

    sweep.parquet       one row per α: held-out and train NMSE, mean ‖w‖₁, weights above
                        the magnitude, frontier membership, the chosen α
    weights.parquet     connections at the chosen α (L1 weight and its least-squares
                        refit on the chosen inputs), with both halves' weights
    features.parquet    per output feature: linearity, sparse-fit error, formula, large W2
    top_tokens.parquet  the tokens each feature of either site fires hardest on
    mlp_curve.parquet   the mlp fit's loss per step (and per epoch on held-back contexts)
    linearity_contexts.npz  per held-out context Σ(e_lin² − e_mlp²): d's bootstrap
    linearity_connectors.safetensors  the least-squares maps and mlps the table rests on
    connect.json        the headline figures (written last: its presence marks completion)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from coact.codes.store import CodeStore
from coact.connectors.exact import (
    GramStats,
    LassoPath,
    LassoPathConfig,
    heldout_nmse,
    lasso_path,
    linear_fit,
    mse,
    refit_support,
)
from coact.connectors.families import SparseConnector, csr_batch, dense_rows, make_connector
from coact.connectors.formulas import formula, top_tokens_table
from coact.connectors.sweep import elbow
from coact.connectors.train import ConnectorTrainConfig, split_rows, train_connector
from coact.errors import CoactError
from coact.linearity.table import (
    HeldoutContexts,
    LinearityConfig,
    feature_stats,
    linearity_table,
    percent_linear,
)
from coact.models.sites import Site
from coact.rundir.files import atomic_write, finished_result, finite_mean, result_key

Decode = Callable[[list[int]], str]
LINEAR_MAP_ENTRIES = 2**26  # dense least-squares map per chunk: 512 MiB in float64
CONNECTORS_FILE = "linearity_connectors.safetensors"
CONTEXTS_FILE = "linearity_contexts.npz"  # per held-out context error sums: d's noise floor
OUTPUT_FILES = (
    *(f"{name}.parquet" for name in ("sweep", "weights", "features", "top_tokens", "mlp_curve")),
    CONTEXTS_FILE,
    CONNECTORS_FILE,
)
RESULT_VERSION = 2  # bumped when what connect writes changes: older results are redone


@dataclass(frozen=True)
class ConnectConfig:
    in_site: str  # e.g. "mlp_resid[3]"
    out_site: str  # e.g. "mlp_out[3]"
    heldout_fraction: float = 0.1  # of contexts, for every held-out figure
    seed: int = 0
    path: LassoPathConfig = field(default_factory=LassoPathConfig)
    magnitude: float = 0.05  # a weight is large when |w|·std(x_in)/std(y_out) ≥ this
    stability: bool = True  # refit on two disjoint halves of the training contexts
    mlp_hidden: int = 1024  # hidden units of the mlp used for linearity (beside the skip)
    mlp_epochs: int = 10  # at most; stops early when held-back training contexts stop gaining
    mlp_patience: int = 2
    mlp_lr: float = 1e-3
    w2_magnitude: float = 0.1  # |W2| above which an mlp weight counts as large (raw)
    linearity_chunk_outputs: int | None = None  # None: as many as fit LINEAR_MAP_ENTRIES
    batch_tokens: int = 1024
    device: str = "cpu"
    linearity: LinearityConfig = field(default_factory=LinearityConfig)
    layer_norm: float = 1.0  # for the seed's normalisation; see linearity.seed_scale
    min_layer_norm: float = 1.0
    formula_terms: int = 5
    top_tokens: int = 5
    progress: bool = True

    def slugs(self) -> tuple[str, str]:
        return Site.parse(self.in_site).slug, Site.parse(self.out_site).slug


def connect(
    store: CodeStore | str | Path,
    config: ConnectConfig,
    out_dir: str | Path,
    decode: Decode | None = None,
) -> dict[str, Any]:
    """Fit, measure and write the tables; return (and write to connect.json) the headline.

    A finished result for the same codes and config is reused, not recomputed."""
    store = store if isinstance(store, CodeStore) else CodeStore.open(store)
    in_slug, out_slug = config.slugs()
    for slug in (in_slug, out_slug):
        if slug not in store.sites:
            raise CoactError(f"site {slug} is not in the code store {store.directory}")
    if not 0 < config.heldout_fraction < 1:
        raise CoactError(f"heldout_fraction must be in (0, 1), got {config.heldout_fraction}")
    out_dir = Path(out_dir)
    key = result_key(store.fingerprint, config, RESULT_VERSION)
    done = out_dir / "connect.json"
    if (previous := finished_result(done, key, OUTPUT_FILES)) is not None:
        return previous
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    x, y = store.read_site(in_slug), store.read_site(out_slug)
    tokens = store.read_tokens()
    groups, train, held = context_split(tokens, config.heldout_fraction, config.seed, store)
    x_train, y_train = x[train], y[train]  # sliced once: the halves refit reads them again
    stats = GramStats.empty(x.shape[1], y.shape[1]).add(x_train, y_train)
    stats_held = GramStats.empty(x.shape[1], y.shape[1]).add(x[held], y[held])
    timings["gram_s"] = time.perf_counter() - clock

    fit = fit_sparse(stats, stats_held, config.path, config.magnitude, config.progress)
    path, held_nmse, sweep, chosen = fit.path, fit.held_nmse, fit.sweep, fit.chosen
    coef, refit, refit_intercepts = fit.coef, fit.refit, fit.refit_intercepts
    timings["path_s"] = fit.path_s

    clock = time.perf_counter()
    weights = weights_table(coef, refit, stats, config.magnitude)
    if config.stability:
        weights = _stability(weights, x_train, y_train, groups[train], path, chosen, config)
    timings["stability_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    fits = _linearity_fits(x, y, stats, stats_held, groups, held, config)
    contexts = fits.contexts
    timings["linearity_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    active, _, variance = feature_stats(y)
    norms = {"layer_norm": config.layer_norm, "min_layer_norm": config.min_layer_norm}
    table = linearity_table(
        fits.mse_linear, fits.mse_mlp, variance, active, **norms, config=config.linearity,
        contexts=contexts,
    )  # fmt: skip
    features = _features_table(
        table, refit, refit_intercepts, held_nmse[chosen], weights, fits.w2_large, config
    )
    top = _top_tokens(x, y, tokens, coef, config, decode, in_slug, out_slug)
    timings["tables_s"] = time.perf_counter() - clock

    for name, frame in {
        "sweep": sweep,
        "weights": weights,
        "features": features,
        "top_tokens": top,
        "mlp_curve": fits.curve,
    }.items():
        atomic_write(out_dir / f"{name}.parquet", frame.write_parquet)
    atomic_write(out_dir / CONTEXTS_FILE, contexts.save)
    save_linearity_connectors(out_dir / CONNECTORS_FILE, fits.connectors)
    share = percent_linear(table)
    stable = (
        float(weights["in_both"].to_numpy().mean()) if config.stability and len(weights) else None
    )
    summary = {
        "key": key,
        "in_site": str(Site.parse(config.in_site)),
        "out_site": str(Site.parse(config.out_site)),
        "directory": str(out_dir),
        "tokens_train": len(train),
        "tokens_heldout": len(held),
        "alpha": float(path.alphas[chosen]),
        "alpha_index": int(chosen),
        "n_alphas": len(path.alphas),
        "path_converged": bool(path.converged.all()),
        "path_unconverged_alphas": int((~path.converged).sum()),
        "path_unconverged_outputs_max": int(path.unconverged.max(initial=0)),
        "path_max_gap": float(path.max_gap.max(initial=0.0)),
        "heldout_nmse_sparse": float(sweep["heldout_nmse"].to_numpy()[chosen]),
        "weights_per_output": float(path.coef[chosen].nnz / max(share["alive"], 1)),
        "stable_share": stable,
        "heldout_nmse_linear": finite_mean(table["mse_linear"] / table["variance"]),
        "heldout_nmse_mlp": finite_mean(table["mse_mlp"] / table["variance"]),
        "mlp_epochs_run": fits.epochs_run,
        "mlp_best_epoch": fits.best_epoch,
        "linearity_output_chunks": fits.chunks,
        "heldout_contexts": len(contexts.tokens),
        "norms": norms,
        "tau": config.linearity.tau,
        "form": config.linearity.form,
        **share,
        "timings": timings,
    }
    atomic_write(done, lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    return summary


def context_split(
    tokens: pl.DataFrame, heldout_fraction: float, seed: int, store: CodeStore
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(context of each row, training rows, held-out rows): whole contexts held out, the
    same split for every stage that fits on these codes with this fraction and seed."""
    groups = tokens["context"].to_numpy()
    if len(groups) < 4 or len(np.unique(groups)) < 4:
        raise CoactError(f"the code store {store.directory} has too few contexts to hold any out")
    train, held = split_rows(len(groups), heldout_fraction, seed, groups)
    return groups, train, held


@dataclass
class _LinearityFits:
    mse_linear: np.ndarray  # held-out, per output
    mse_mlp: np.ndarray
    contexts: HeldoutContexts
    w2_large: np.ndarray  # per output: mlp W2 weights of magnitude ≥ w2_magnitude
    curve: pl.DataFrame  # per chunk and step: training loss, and per epoch held-back loss
    epochs_run: int  # the most over chunks
    best_epoch: int | None  # the latest over chunks
    chunks: int
    connectors: list[tuple[np.ndarray, SparseConnector]]  # (outputs, mlp with linear skip)


def save_linearity_connectors(
    path: Path, connectors: list[tuple[np.ndarray, SparseConnector]]
) -> None:
    """Each chunk's outputs and mlp (its fixed skip is the least-squares map), so later
    stages (splicing, causal checks) predict with exactly the fits the table rests on."""
    tensors: dict[str, torch.Tensor] = {}
    for k, (outputs, connector) in enumerate(connectors):
        tensors[f"{k}.outputs"] = torch.as_tensor(outputs, dtype=torch.int64)
        for name, value in connector.state_dict().items():
            tensors[f"{k}.{name}"] = value.detach().cpu().contiguous()
        assert connector.skip_weight is not None and connector.skip_bias is not None
        tensors[f"{k}.skip_weight"] = connector.skip_weight.cpu().contiguous()
        tensors[f"{k}.skip_bias"] = connector.skip_bias.cpu().contiguous()
    meta = {"chunks": str(len(connectors))}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_linearity_connectors(
    path: str | Path, device: str = "cpu"
) -> list[tuple[np.ndarray, SparseConnector]]:
    """The inverse of `save_linearity_connectors`."""
    path = Path(path)
    if not path.is_file():
        raise CoactError(f"no fitted connectors at {path}; run `coact connect` first")
    out = []
    with safe_open(str(path), framework="pt") as f:
        n_chunks = int(f.metadata()["chunks"])
        for k in range(n_chunks):
            weight_in = f.get_tensor(f"{k}.weight_in")
            skip = f.get_tensor(f"{k}.skip_weight")
            connector = make_connector(
                "mlp", skip.shape[0], skip.shape[1], hidden=weight_in.shape[1]
            )
            connector.load_state_dict(
                {name: f.get_tensor(f"{k}.{name}") for name in connector.state_dict()}
            )
            connector.skip_weight = skip.to(device)
            connector.skip_bias = f.get_tensor(f"{k}.skip_bias").to(device)
            outputs = f.get_tensor(f"{k}.outputs").numpy()
            out.append((outputs, connector.to(device).eval().requires_grad_(False)))
    return out


def _linearity_fits(
    x: sp.csr_matrix,
    y: sp.csr_matrix,
    stats: GramStats,
    stats_held: GramStats,
    groups: np.ndarray,
    held: np.ndarray,
    config: ConnectConfig,
) -> _LinearityFits:
    """Least squares and an mlp started from it, both without L1, per chunk of outputs:
    the least-squares map is dense n_in × outputs, so a wide site (32k × 32k would be 8 GiB)
    is fitted a chunk of outputs at a time, each chunk with its own mlp."""
    per_chunk = config.linearity_chunk_outputs or max(1, LINEAR_MAP_ENTRIES // x.shape[1])
    chunks = [np.arange(y.shape[1])[i : i + per_chunk] for i in range(0, y.shape[1], per_chunk)]
    mse_linear, mse_mlp = np.zeros(y.shape[1]), np.zeros(y.shape[1])
    w2_large = np.zeros(y.shape[1], dtype=np.int64)
    diffs, curves, epochs, bests = [], [], [], []
    connectors = []
    tokens = None
    for k, outputs in enumerate(tqdm(chunks, desc="linearity", disable=len(chunks) == 1)):
        w_lin, b_lin = linear_fit(stats, outputs=outputs)
        mse_linear[outputs] = mse(stats_held, w_lin, b_lin, outputs)
        whole = len(outputs) == y.shape[1]
        mlp = train_connector(
            x,
            y,
            ConnectorTrainConfig(
                family="mlp",
                hidden=config.mlp_hidden,
                lr=config.mlp_lr,
                epochs=config.mlp_epochs,
                patience=config.mlp_patience,
                batch_tokens=config.batch_tokens,
                heldout_fraction=config.heldout_fraction,
                seed=config.seed,
                device=config.device,
                outputs=None if whole else tuple(int(j) for j in outputs),
                progress=config.progress,
            ),
            groups=groups,
            skip=(w_lin, b_lin),
        )
        if not np.array_equal(mlp.heldout_rows, held):
            raise RuntimeError("the mlp and the linear fits held out different tokens")
        mse_mlp[outputs] = mlp.heldout_mse
        y_chunk = y if whole else sp.csr_matrix(y[:, outputs])
        part = _heldout_contexts(mlp.connector, x, y_chunk, held, groups, config.batch_tokens)
        diffs.append(part.diff)
        tokens = part.tokens
        assert mlp.connector.weight_out is not None
        w2 = mlp.connector.weight_out.detach().cpu().numpy()
        w2_large[outputs] = (np.abs(w2) >= config.w2_magnitude).sum(axis=1)
        curves.append(_curve(mlp.loss_nmse, mlp.validation_nmse).with_columns(chunk=k))
        epochs.append(len(mlp.validation_nmse))
        bests.append(mlp.best_epoch)
        connectors.append((outputs, mlp.connector))
    assert tokens is not None
    known = [b for b in bests if b is not None]
    return _LinearityFits(
        mse_linear, mse_mlp, HeldoutContexts(np.hstack(diffs), tokens), w2_large,
        pl.concat(curves), max(epochs), max(known) if known else None, len(chunks), connectors,
    )  # fmt: skip


def _curve(loss: list[float], validation: list[float]) -> pl.DataFrame:
    """Training loss per step, joined with the held-back loss at each epoch's last step."""
    per_epoch = len(loss) // max(len(validation), 1)
    steps = per_epoch * np.arange(1, len(validation) + 1) - 1
    watched = pl.DataFrame(
        {"step": steps, "validation_nmse": validation},
        schema={"step": pl.Int64, "validation_nmse": pl.Float64},
    )
    frame = pl.DataFrame({"step": np.arange(len(loss)), "nmse": loss})
    return frame.join(watched, on="step", how="left")


@torch.no_grad()
def _heldout_contexts(
    connector: SparseConnector,
    x: sp.csr_matrix,
    y: sp.csr_matrix,
    rows: np.ndarray,
    groups: np.ndarray,
    batch: int,
) -> HeldoutContexts:
    """Per held-out context: Σ (e_lin² − e_mlp²) per output, the mlp's own skip being the
    least-squares map, so both errors come from one pass over the same tokens."""
    _, inverse = np.unique(groups[rows], return_inverse=True)
    n_contexts = int(inverse.max()) + 1 if len(rows) else 0
    device = connector.weight_in.device
    diff = torch.zeros(n_contexts, connector.n_out, dtype=torch.float64, device=device)
    x, y = sp.csr_matrix(x, dtype=np.float32), sp.csr_matrix(y, dtype=np.float32)
    for start in range(0, len(rows), max(batch, 4096)):
        r = rows[start : start + max(batch, 4096)]
        inputs, target = csr_batch(x, r, str(device)), dense_rows(y, r, device)
        gain = (connector.skip_prediction(inputs) - target).double().pow(2)
        gain -= (connector(inputs) - target).double().pow(2)
        index = torch.from_numpy(inverse[start : start + len(r)]).to(device)
        diff.index_add_(0, index, gain)
    tokens = np.bincount(inverse, minlength=n_contexts).astype(np.float64)
    return HeldoutContexts(diff=diff.cpu().numpy(), tokens=tokens)


def _standardised(coef: sp.spmatrix, stats: GramStats, outputs: np.ndarray) -> sp.coo_matrix:
    """|w|·std(x_k)/std(y_j): a weight's effect in units of the output's spread."""
    _, diag = stats.gram()
    sd_in = np.sqrt(np.maximum(diag, 0))
    var = stats.y_var()[outputs]
    sd_out = np.sqrt(np.where(var > 0, var, np.inf))
    c = sp.coo_matrix(coef)
    return sp.coo_matrix(
        (np.abs(c.data) * sd_in[c.row] / sd_out[c.col], (c.row, c.col)), shape=c.shape
    )


@dataclass(frozen=True)
class SparseFit:
    """The L1 path, its sweep table, the chosen α (the elbow) and the least-squares refit
    on the chosen support: what connect and composition both read off one Gram pair."""

    path: LassoPath
    held_nmse: np.ndarray  # (alphas, outputs)
    sweep: pl.DataFrame
    chosen: int
    coef: sp.csc_matrix  # L1 weights at the chosen α
    refit: sp.csc_matrix  # least squares on the same support
    refit_intercepts: np.ndarray
    path_s: float  # seconds for the path and its sweep (the refit is cheap beside it)


def fit_sparse(
    stats: GramStats,
    stats_held: GramStats,
    config: LassoPathConfig,
    magnitude: float,
    progress: bool = False,
) -> SparseFit:
    clock = time.perf_counter()
    path = lasso_path(stats, config, progress=progress)
    held_nmse = heldout_nmse(path, stats_held)
    sweep, chosen = sweep_table(path, held_nmse, stats, magnitude)
    path_s = time.perf_counter() - clock
    coef = sp.csc_matrix(path.coef[chosen])
    refit, refit_intercepts = refit_support(stats, coef)
    return SparseFit(path, held_nmse, sweep, chosen, coef, refit, refit_intercepts, path_s)


def sweep_table(
    path: LassoPath, held_nmse: np.ndarray, stats: GramStats, magnitude: float
) -> tuple[pl.DataFrame, int]:
    alive = ~path.dead
    n_alive = max(int(alive.sum()), 1)
    mean_l1 = np.array([abs(c).sum() / n_alive for c in path.coef])
    above = np.array(
        [int((_standardised(c, stats, path.outputs).data >= magnitude).sum()) for c in path.coef]
    )
    with np.errstate(invalid="ignore"):
        held = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in held_nmse])
        train = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in path.nmse])
    front = elbow(np.nan_to_num(held, nan=np.inf), mean_l1)
    chosen = front.elbow if front.elbow >= 0 else len(path.alphas) - 1
    on_front = np.zeros(len(path.alphas), dtype=bool)
    on_front[front.indices] = True
    frame = pl.DataFrame(
        {
            "alpha": path.alphas,
            "heldout_nmse": held,
            "train_nmse": train,
            "mean_l1": mean_l1,
            "weights_nonzero": [c.nnz for c in path.coef],
            "weights_above": above,
            "converged": path.converged,
            "unconverged_outputs": path.unconverged,
            "max_gap": path.max_gap,
            "sweeps": path.n_iter,
            "on_frontier": on_front,
            "chosen": np.arange(len(path.alphas)) == chosen,
        }
    )
    return frame, int(chosen)


def weights_table(
    coef: sp.csc_matrix, refit: sp.csc_matrix, stats: GramStats, magnitude: float
) -> pl.DataFrame:
    """One row per connection: its L1 weight and its least-squares refit on the support
    (the coefficient a formula shows); `large` is judged on the refit, standardised."""
    c, r = coef.tocoo(), refit.tocoo()  # same sparsity pattern, same order
    std = _standardised(r, stats, np.arange(coef.shape[1])).tocoo()
    order = np.lexsort((-np.abs(r.data), c.col))
    return pl.DataFrame(
        {
            "output": c.col[order].astype(np.int64),
            "input": c.row[order].astype(np.int64),
            "weight": c.data[order],
            "weight_refit": r.data[order],
            "standardised": std.data[order],
            "large": std.data[order] >= magnitude,
        }
    )


def _stability(
    weights: pl.DataFrame,
    x: sp.csr_matrix,
    y: sp.csr_matrix,
    groups: np.ndarray,
    path: Any,
    chosen: int,
    config: ConnectConfig,
) -> pl.DataFrame:
    """Refit at the chosen α on two disjoint halves of the training contexts (warm-started
    down the same grid): does each connection appear in both, with the same sign, and
    how far does its weight move? Connections are estimated from estimates (SAE codes)."""
    half_a, half_b = split_rows(x.shape[0], 0.5, config.seed + 1, groups)
    grid = LassoPathConfig(**{**asdict(config.path), "alphas": tuple(path.alphas[: chosen + 1])})
    fits = []
    for rows in tqdm((half_a, half_b), desc="stability halves", disable=not config.progress):
        stats = GramStats.empty(x.shape[1], y.shape[1]).add(x[rows], y[rows])
        fits.append(sp.csc_matrix(lasso_path(stats, grid).coef[-1]))
    rows_out, rows_in = weights["output"].to_numpy(), weights["input"].to_numpy()
    wa = np.asarray(fits[0][rows_in, rows_out]).ravel()
    wb = np.asarray(fits[1][rows_in, rows_out]).ravel()
    both = (wa != 0) & (wb != 0) & (np.sign(wa) == np.sign(wb))
    with np.errstate(divide="ignore", invalid="ignore"):
        change = np.abs(wa - wb) / np.maximum(np.abs(wa), np.abs(wb))
    return weights.with_columns(
        pl.Series("weight_half_a", wa),
        pl.Series("weight_half_b", wb),
        pl.Series("in_both", both),
        pl.Series("relative_change", np.where(both, change, np.nan)),
    )


def _features_table(
    table: pl.DataFrame,
    coef: sp.csc_matrix,
    intercepts: np.ndarray,
    held_nmse: np.ndarray,
    weights: pl.DataFrame,
    w2_large: np.ndarray,
    config: ConnectConfig,
) -> pl.DataFrame:
    n_out = coef.shape[1]
    terms = np.diff(coef.indptr)
    texts = [
        formula(coef, j, float(intercepts[j]), config.formula_terms)
        for j in tqdm(range(n_out), desc="formulas", disable=not config.progress)
    ]
    columns = {
        "nmse_sparse": held_nmse,
        "n_terms": terms,
        "intercept": intercepts,
        "formula": texts,
        "w2_large": w2_large,
    }
    frame = table.with_columns(*(pl.Series(k, v) for k, v in columns.items()))
    if "in_both" in weights.columns:
        stable = weights.group_by("output").agg(pl.col("in_both").mean().alias("stable_share"))
        frame = frame.join(stable, left_on="feature", right_on="output", how="left")
    return frame


def _top_tokens(
    x: sp.csr_matrix,
    y: sp.csr_matrix,
    tokens: pl.DataFrame,
    coef: sp.csc_matrix,
    config: ConnectConfig,
    decode: Decode | None,
    in_slug: str,
    out_slug: str,
) -> pl.DataFrame:
    """Top tokens of every output feature and of every input that appears in a formula."""
    used = np.unique(coef.indices)
    parts = [
        top_tokens_table(x, tokens, used, decode, config.top_tokens).with_columns(
            pl.lit(in_slug).alias("site")
        ),
        top_tokens_table(y, tokens, np.arange(y.shape[1]), decode, config.top_tokens).with_columns(
            pl.lit(out_slug).alias("site")
        ),
    ]
    return pl.concat(parts)
