"""Exact L1 path against one SGD fit, and sparse- against dense-input SGD steps.

Two targets of the design notes ("Targets"), each timed side by side in one run:
  path vs SGD — the exact linear L1 path (20 values of α; the Gram-statistics passes and
                the held-out evaluation, from held-out sums, included) against ONE SGD fit
                of the `linear` family at one α of that grid (Adam, 5 epochs by default,
                its held-out evaluation included), on the same codes with the same held-out
                contexts.
                Target: the path is faster, with equal or lower held-out normalised MSE at
                that α.
  sparse step — one forward + backward + Adam step of the sparse-input connector
                (`linear`, `mlp`) against the same model built from dense nn.Linear layers
                fed the densified batch, at 1 % and at the real codes' density, n_in 2304
                and 16384, batch 1024. Target: dense time / sparse time ≥ 3.

The two objectives, and the α conversion between them. The exact solver (connectors/exact.py)
minimises, per output j, NMSE_j + α‖w_j‖₁. Outputs are independent, so it minimises the sum
over the n_alive alive outputs, Σ_j NMSE_j + α‖W‖₁. The SGD trainer (families.loss_terms)
minimises the MEAN over alive outputs of NMSE_j plus α_sgd times ‖W‖₁ SUMMED over all
weights: (1/n_alive) Σ_j NMSE_j + α_sgd‖W‖₁ = (1/n_alive)(Σ_j NMSE_j + n_alive·α_sgd‖W‖₁).
Both have the same minimiser when α = n_alive · α_sgd, so SGD is run at
α_sgd = α / n_alive (n_alive: outputs that vary on the training split, as the trainer counts
them). Both objectives are also reported in the trainer's units for the two fits.

Run with a run directory made by `just analyze 3` (runs/smollm2-135m-L3); `--quick` uses a
small random sparse problem instead (no run directory needed; a smoke test whose ratios say
nothing about the targets) and writes its JSON to the temporary directory unless --out is
given. `--only path` (or `steps`) reruns one comparison and keeps the other part of the
JSON as it was (each part records when it was measured).
Writes analyses/results/bench_connectors.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numba
import numpy as np
import scipy
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from coact.codes.store import CodeStore
from coact.connectors.exact import GramStats, LassoPathConfig, heldout_nmse, lasso_path
from coact.connectors.families import (
    SparseConnector,
    column_variance,
    csr_batch,
    default_hidden,
)
from coact.connectors.train import ConnectorTrainConfig, split_rows, train_connector
from coact.models.sites import SitePair
from coact.rundir.layout import CodesFiles, RunLayout

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "runs" / "smollm2-135m-L3"
SITES = SitePair.mlp(3).slugs  # ("mlp_resid.3", "mlp_out.3")
HELDOUT_FRACTION = 0.1
SEED = 0
EQUAL_LOSS_RTOL = 1e-3  # "equal or lower" held-out loss: within 0.1 %


# --- CPU accounting: how much of the machine other processes used while we timed ---------


def _machine_busy_s() -> float | None:
    """Busy CPU-seconds of the whole machine since boot (Linux /proc/stat), else None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Sharing:
    """Average number of cores that processes other than this one kept busy over a span."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), _machine_busy_s(), _own_cpu_s())

    def stop(self) -> dict[str, float | None]:
        wall, busy, own = time.perf_counter(), _machine_busy_s(), _own_cpu_s()
        w0, b0, o0 = self.start
        others = None
        if busy is not None and b0 is not None:
            others = max(0.0, ((busy - b0) - (own - o0)) / max(wall - w0, 1e-9))
        return {
            "wall_s": wall - w0,
            "own_cores": (own - o0) / max(wall - w0, 1e-9),
            "other_processes_cores": others,
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }


# --- data --------------------------------------------------------------------------------


def random_codes(n: int, width: int, k: int, rng: np.random.Generator) -> sp.csr_matrix:
    """n rows of exactly k distinct active features (drawn with Zipf-like feature
    frequencies, as SAE features have), exponential values; float32 CSR."""
    log_freq = -0.8 * np.log(np.arange(width) + 10.0)
    log_freq = log_freq[rng.permutation(width)]
    cols = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, 1024):  # Gumbel top-k: sampling k without replacement
        scores = log_freq + rng.gumbel(size=(min(1024, n - start), width))
        cols[start : start + len(scores)] = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    cols.sort(axis=1)
    values = rng.exponential(1.0, size=(n, k)).astype(np.float32)
    indptr = np.arange(0, n * k + 1, k, dtype=np.int64)
    return sp.csr_matrix((values.ravel(), cols.ravel(), indptr), shape=(n, width))


def synthetic_problem(
    n: int, n_in: int, n_out: int, k: int, seed: int
) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """Sparse codes x, outputs y = ReLU(x W + noise − 0.5) with a sparse W (each output reads
    4 inputs), and context ids of 128 tokens."""
    rng = np.random.default_rng(seed)
    x = random_codes(n, n_in, k, rng)
    w = sp.random(n_in, n_out, density=4 / n_in, random_state=seed, format="csr")
    w.data = rng.normal(0, 1, w.nnz)
    pre = np.asarray((x @ w).todense()) + 0.3 * rng.normal(size=(n, n_out))
    y = sp.csr_matrix(np.maximum(pre - 0.5, 0).astype(np.float32))
    return x, y, np.arange(n) // 128


def load_codes(codes: Path) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    store = CodeStore.open(codes)
    x, y = store.read_site(SITES[0]), store.read_site(SITES[1])
    return x, y, store.read_tokens()["context"].to_numpy()


# --- target 1: exact L1 path against one SGD fit -----------------------------------------


def _warm_up() -> None:
    """Load the compiled coordinate descent (numba cache) and torch's kernels, untimed."""
    x, y, groups = synthetic_problem(512, 64, 32, 4, seed=1)
    train, held = split_rows(x.shape[0], HELDOUT_FRACTION, SEED, groups)
    stats = GramStats.empty(64, 32).add(x[train], y[train])
    heldout_nmse(
        lasso_path(stats, LassoPathConfig(n_alphas=3)),
        GramStats.empty(64, 32).add(x[held], y[held]),
    )
    config = ConnectorTrainConfig(family="linear", alpha=1e-4, steps=2, progress=False)
    train_connector(x, y, config, groups=groups)


def _exact(
    x: sp.csr_matrix, y: sp.csr_matrix, train: np.ndarray, held: np.ndarray, n_alphas: int
) -> tuple[dict[str, Any], Any, np.ndarray, GramStats]:
    """One exact fit, timed by part: (times, path, held-out NMSE per α, training stats)."""
    n_in, n_out = x.shape[1], y.shape[1]
    t_start = time.perf_counter()
    stats = GramStats.empty(n_in, n_out).add(x[train], y[train])
    t_train = time.perf_counter()
    stats_held = GramStats.empty(n_in, n_out).add(x[held], y[held])
    t_gram = time.perf_counter()
    path = lasso_path(stats, LassoPathConfig(n_alphas=n_alphas))
    t_path = time.perf_counter()
    held_nmse = heldout_nmse(path, stats_held)  # from the held-out sums: no token re-read
    t_eval = time.perf_counter()
    parts: dict[str, Any] = {"total": t_eval - t_start, "gram_stats": t_gram - t_start}
    parts.update(gram_stats_train=t_train - t_start, gram_stats_heldout=t_gram - t_train)
    parts.update(path=t_path - t_gram, heldout_eval=t_eval - t_path)
    parts["path_per_alpha"] = path.seconds.tolist()
    return parts, path, held_nmse, stats


def _exact_part(
    path: Any,
    held_nmse: np.ndarray,
    exact_times: list[dict[str, Any]],
    partial_s: float,
    n_alphas: int,
) -> dict[str, Any]:
    """The exact path's figures: best-of times by part, convergence, losses per α."""
    best = min(exact_times, key=lambda t: t["total"])
    return {
        "n_alphas": n_alphas,
        "alphas": path.alphas.tolist(),
        "seconds": best["total"],
        "seconds_gram_stats": best["gram_stats"],
        "seconds_gram_stats_train": best["gram_stats_train"],
        "seconds_gram_stats_heldout": best["gram_stats_heldout"],
        "seconds_path": best["path"],
        "seconds_heldout_eval": best["heldout_eval"],
        "seconds_all_repeats": [t["total"] for t in exact_times],
        "seconds_parts_all_repeats": [
            {k: v for k, v in t.items() if k != "path_per_alpha"} for t in exact_times
        ],
        "seconds_solver_per_alpha": best["path_per_alpha"],
        "seconds_path_down_to_sgd_alpha_only": partial_s,
        "tol_duality_gap": LassoPathConfig().tol,
        "converged_per_alpha": path.converged.tolist(),
        "unconverged_outputs_per_alpha": path.unconverged.tolist(),
        "max_gap_per_alpha": path.max_gap.tolist(),
        "max_sweeps_per_alpha": path.n_iter.tolist(),
        "heldout_nmse_per_alpha": np.nanmean(held_nmse, axis=1).tolist(),
        "train_nmse_per_alpha": np.nanmean(path.nmse, axis=1).tolist(),
        "nonzero_weights_per_alpha": [int(c.nnz) for c in path.coef],
    }


def _sgd_part(
    fit: Any, config: ConnectorTrainConfig, i: int, alpha: float, sgd_times: list[float]
) -> dict[str, Any]:
    w_sgd = fit.connector.weight_in.detach().double()
    return {
        "family": "linear",
        "alpha_index": i,
        "alpha_exact_units": alpha,
        "alpha_sgd_units": config.alpha,
        "alpha_conversion": "alpha_sgd = alpha_exact / n_alive (mean vs sum over outputs)",
        "epochs": config.epochs,
        "steps": len(fit.loss_nmse),
        "batch_tokens": config.batch_tokens,
        "lr": config.lr,
        "optimizer": "Adam",
        "seconds": min(sgd_times),
        "seconds_all_repeats": sgd_times,
        "weights_above_1e-6": int((w_sgd.abs() > 1e-6).sum()),
    }


def _heldout_compared(fit: Any, exact_at: np.ndarray) -> dict[str, Any]:
    """Held-out NMSE of both fits at the SGD α, over the outputs both give a finite one."""
    sgd_held = fit.heldout_nmse
    both = np.isfinite(sgd_held) & np.isfinite(exact_at)
    return {
        "outputs_compared": int(both.sum()),
        "exact": float(exact_at[both].mean()),
        "sgd": float(sgd_held[both].mean()),
        "exact_own_total": float(np.nanmean(exact_at)),
        "sgd_own_total": fit.heldout_nmse_total,
    }


def _objectives(path: Any, i: int, fit: Any, alpha_sgd: float) -> dict[str, Any]:
    """Training objectives in the trainer's units: mean alive NMSE + α_sgd‖W‖₁."""
    exact_train_nmse = float(np.nanmean(path.nmse[i]))
    exact_l1 = float(abs(path.coef[i]).sum())
    sgd_l1 = float(fit.connector.weight_in.detach().double().abs().sum())
    return {
        "units": "mean alive train NMSE + alpha_sgd * sum|W|",
        "exact": exact_train_nmse + alpha_sgd * exact_l1,
        "exact_train_nmse": exact_train_nmse,
        "exact_l1": exact_l1,
        "sgd": fit.train_nmse_total + alpha_sgd * sgd_l1,
        "sgd_train_nmse": fit.train_nmse_total,
        "sgd_l1": sgd_l1,
    }


def path_vs_sgd(
    x: sp.csr_matrix,
    y: sp.csr_matrix,
    groups: np.ndarray,
    *,
    n_alphas: int,
    pick: int,
    epochs: int,
    repeats: int,
) -> dict[str, Any]:
    """Exact path and SGD fit alternately, `repeats` times each; times are best of them
    (the fits are deterministic, so losses come from the first)."""
    n = x.shape[0]
    _warm_up()
    sharing = Sharing()
    train, held = split_rows(n, HELDOUT_FRACTION, SEED, groups)
    parts, path, exact_held, stats = _exact(x, y, train, held, n_alphas)
    exact_times, sgd_times, partial_times = [parts], [], []
    i = pick if pick >= 0 else n_alphas // 2
    alpha = float(path.alphas[i])
    n_alive = int((column_variance(y, train) > 0).sum())  # as train_connector counts them
    alpha_sgd = alpha / n_alive
    config = ConnectorTrainConfig(family="linear", alpha=alpha_sgd, epochs=epochs,
                                  heldout_fraction=HELDOUT_FRACTION, seed=SEED,
                                  progress=False)  # fmt: skip
    down_to_i = LassoPathConfig(alphas=tuple(float(a) for a in path.alphas[: i + 1]))
    fit = None
    for r in range(repeats):
        if r:
            exact_times.append(_exact(x, y, train, held, n_alphas)[0])
        start = time.perf_counter()
        fitted = train_connector(x, y, config, groups=groups)
        sgd_times.append(time.perf_counter() - start)
        fit = fit or fitted
        # The path down to the SGD α only (its first i + 1 values): what one α costs.
        start = time.perf_counter()
        lasso_path(stats, down_to_i)
        partial_times.append(time.perf_counter() - start)
    assert fit is not None
    if not np.array_equal(fit.heldout_rows, held):
        raise RuntimeError("SGD and the exact path held out different tokens")
    shared = sharing.stop()
    exact = _exact_part(path, exact_held, exact_times, min(partial_times), n_alphas)
    exact_s, sgd_s, partial_s = exact["seconds"], min(sgd_times), min(partial_times)

    compared = _heldout_compared(fit, exact_held[i])
    sgd_loss, exact_loss = compared["sgd"], compared["exact"]
    faster = exact_s < sgd_s
    not_worse = exact_loss <= sgd_loss * (1 + EQUAL_LOSS_RTOL)
    return {
        "timing": f"best of {repeats}, exact and SGD alternating",
        "tokens": n,
        "train_tokens": len(train),
        "heldout_tokens": len(held),
        "heldout_contexts": len(np.unique(groups[held])),
        "n_in": x.shape[1],
        "n_out": y.shape[1],
        "input_nonzeros_per_token": x.nnz / n,
        "output_nonzeros_per_token": y.nnz / n,
        "alive_outputs_exact": int((~path.dead).sum()),
        "alive_outputs_sgd": n_alive,
        "exact": exact,
        "sgd": _sgd_part(fit, config, i, alpha, sgd_times),
        "heldout_nmse_at_sgd_alpha": compared,
        "train_objective_at_sgd_alpha": _objectives(path, i, fit, alpha_sgd),
        "ratio_sgd_time_over_exact_time": sgd_s / exact_s,
        "ratio_sgd_time_over_exact_time_one_alpha": sgd_s / partial_s,
        "heldout_nmse_sgd_minus_exact": sgd_loss - exact_loss,
        "target": {
            "exact_faster": faster,
            "exact_heldout_equal_or_lower": not_worse,
            "equal_tolerance_relative": EQUAL_LOSS_RTOL,
            "met": faster and not_worse,
        },
        "machine_sharing": shared,
    }


# --- target 2: sparse-input against dense-input SGD steps --------------------------------


class DenseConnector(nn.Module):
    """The dense-input counterpart of a SparseConnector: nn.Linear layers on a dense batch."""

    def __init__(self, family: str, n_in: int, n_out: int, hidden: int | None) -> None:
        super().__init__()
        torch.manual_seed(SEED)
        if family == "linear":
            self.net: nn.Module = nn.Linear(n_in, n_out)
        elif family == "mlp":
            assert hidden is not None
            self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))
        else:
            raise ValueError(f"no dense counterpart for {family!r}")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _adam(model: nn.Module) -> torch.optim.Optimizer:
    """As the trainer does: the fused Adam where there is one."""
    try:
        return torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=1e-3)


def step_pair(
    family: str,
    x: sp.csr_matrix,
    n_out: int,
    batch: int,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Seconds of one training step of the sparse and the dense model on the same batches,
    alternating (sparse, dense) so that both meet the same load from other processes: the
    batch built from scipy CSR rows, then forward + backward + Adam."""
    n_in = x.shape[1]
    hidden = default_hidden(n_out) if family == "mlp" else None
    rng = np.random.default_rng(SEED)
    row_sets = [rng.choice(x.shape[0], batch, replace=False) for _ in range(warmup + repeats)]
    target = torch.relu(torch.randn(batch, n_out, generator=torch.Generator().manual_seed(0)))
    weights = torch.ones(n_out)

    def loss(pred: Tensor) -> Tensor:  # the trainer's normalised MSE (unit variances here)
        return ((pred - target).pow(2).mean(0) * weights).sum() / n_out

    feeds: dict[str, Callable[[np.ndarray], Any]] = {
        "sparse": lambda rows: csr_batch(x, rows, "cpu"),
        "dense": lambda rows: torch.from_numpy(x[rows].toarray()),
    }
    models: dict[str, nn.Module] = {
        "sparse": SparseConnector(family, n_in, n_out, hidden=hidden, bias=True, seed=SEED),
        "dense": DenseConnector(family, n_in, n_out, hidden),
    }
    optimizers = {name: _adam(model) for name, model in models.items()}
    times: dict[str, dict[str, list[float]]] = {
        m: {"batch": [], "step": [], "adam": []} for m in models
    }
    for r in range(warmup + repeats):
        for name, model in models.items():
            start = time.perf_counter()
            inputs = feeds[name](row_sets[r])
            built = time.perf_counter()
            value = loss(model(inputs))
            optimizers[name].zero_grad(set_to_none=True)
            value.backward()
            stepped = time.perf_counter()
            optimizers[name].step()
            done = time.perf_counter()
            if r >= warmup:
                times[name]["batch"].append(built - start)
                times[name]["step"].append(done - built)
                times[name]["adam"].append(done - stepped)
    result: dict[str, Any] = {"family": family, "n_in": n_in, "n_out": n_out, "hidden": hidden}
    for name, t in times.items():
        total = np.add(t["batch"], t["step"])
        result[name] = {
            "seconds_total": float(np.median(total)),
            "seconds_step": float(np.median(t["step"])),
            "seconds_batch": float(np.median(t["batch"])),
            "seconds_adam_update": float(np.median(t["adam"])),
            "seconds_total_best": float(total.min()),
            "seconds_total_all": total.tolist(),
        }
    sparse, dense = result["sparse"], result["dense"]
    result["ratio_dense_over_sparse"] = dense["seconds_total"] / sparse["seconds_total"]
    result["ratio_dense_over_sparse_step_only"] = dense["seconds_step"] / sparse["seconds_step"]
    result["ratio_dense_over_sparse_best"] = (
        dense["seconds_total_best"] / sparse["seconds_total_best"]
    )
    result["ratio_dense_over_sparse_paired_median"] = float(
        np.median(np.divide(dense["seconds_total_all"], sparse["seconds_total_all"]))
    )
    return result


def sparse_vs_dense(
    widths: list[int],
    densities: dict[str, float],
    families: list[str],
    n_out: int,
    batch: int,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    sharing = Sharing()
    cells = []
    for n_in in widths:
        for label, density in densities.items():
            k = max(1, round(density * n_in))
            x = random_codes(batch * 4, n_in, k, np.random.default_rng(SEED))
            for family in families:
                cell = step_pair(family, x, n_out, batch, warmup, repeats)
                cell.update(density_label=label, density=k / n_in, nonzeros_per_row=k)
                cell["met"] = cell["ratio_dense_over_sparse"] >= 3
                cells.append(cell)
                print(
                    f"  {family:6s} n_in {n_in:5d} density {k / n_in:.4f}: "
                    f"sparse {cell['sparse']['seconds_total'] * 1e3:7.1f} ms, "
                    f"dense {cell['dense']['seconds_total'] * 1e3:7.1f} ms, "
                    f"{cell['ratio_dense_over_sparse']:.1f}× (best of: "
                    f"{cell['ratio_dense_over_sparse_best']:.1f}×)",
                    flush=True,
                )
    worst = min(c["ratio_dense_over_sparse"] for c in cells)
    at_one_percent = [c for c in cells if c["density_label"] == "1%"]
    return {
        "batch": batch,
        "n_out": n_out,
        "warmup": warmup,
        "repeats": repeats,
        "timing": f"median of {repeats} steps after {warmup} warm-up steps, sparse and dense "
        "alternating; total = building the batch from scipy CSR rows + forward + backward + "
        "Adam (fused where available); no L1 term (as in the linearity fits)",
        "cells": cells,
        "min_ratio": worst,
        "min_ratio_best_of": min(c["ratio_dense_over_sparse_best"] for c in cells),
        "target": {
            "ratio": 3.0,
            "met_at_1_percent": all(c["ratio_dense_over_sparse"] >= 3 for c in at_one_percent),
            "met_everywhere": worst >= 3,
        },
        "machine_sharing": sharing.stop(),
    }


# --- main --------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small random problem, no run dir")
    parser.add_argument(
        "--codes", default=str(RunLayout.of(RUN).codes), help="code store of the run"
    )
    parser.add_argument("--alphas", type=int, default=20, help="values of α on the path")
    parser.add_argument("--alpha-index", type=int, default=-1, help="SGD's α (default: middle)")
    parser.add_argument("--epochs", type=int, default=5, help="SGD epochs at that α")
    parser.add_argument("--threads", type=int, default=2, help="torch and numba threads")
    parser.add_argument("--fit-repeats", type=int, default=2, help="path and SGD runs, best of")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps (target 2)")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--only",
        choices=("path", "steps"),
        default=None,
        help="run one comparison and replace only its part of the existing JSON",
    )
    return parser.parse_args()


class Problem(NamedTuple):
    """The codes both comparisons run on, and how much of each comparison to run."""

    x: sp.csr_matrix
    y: sp.csr_matrix
    groups: np.ndarray
    source: str
    widths: list[int]
    families: list[str]
    repeats: int
    fit_repeats: int


def problem(args: argparse.Namespace) -> Problem:
    if args.quick:
        x, y, groups = synthetic_problem(20_000, 512, 512, 8, seed=SEED)
        source = "synthetic: 20,000 tokens, 512 → 512 features, 8 active inputs per token"
        return Problem(x, y, groups, source, [2304], ["linear", "mlp"], min(args.repeats, 3), 1)
    codes = Path(args.codes)
    if not CodesFiles(codes).manifest.exists():
        print(
            f"no code store at {codes}: create it with `just analyze 3` "
            "(or run with --quick for a synthetic problem)",
            file=sys.stderr,
        )
        sys.exit(2)
    x, y, groups = load_codes(codes)
    source = f"{codes.relative_to(ROOT) if codes.is_relative_to(ROOT) else codes}: {SITES}"
    families = ["linear", "mlp"]
    return Problem(x, y, groups, source, [2304, 16384], families, args.repeats, args.fit_repeats)


def out_path(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if args.quick:
        return Path(tempfile.gettempdir()) / "bench_connectors.quick.json"
    return ROOT / "analyses" / "results" / "bench_connectors.json"


def run_path(args: argparse.Namespace, data: Problem, stamp: str) -> dict[str, Any]:
    print(f"target 1: exact L1 path ({args.alphas} α) vs one SGD fit, on {data.source}", flush=True)
    first = path_vs_sgd(data.x, data.y, data.groups, n_alphas=args.alphas,
                        pick=args.alpha_index, epochs=args.epochs,
                        repeats=data.fit_repeats)  # fmt: skip
    first["measured_at"] = stamp
    held = first["heldout_nmse_at_sgd_alpha"]
    print(
        f"  exact {first['exact']['seconds']:.1f} s (path {first['exact']['seconds_path']:.1f}"
        f" s), SGD {first['sgd']['seconds']:.1f} s ({args.epochs} epochs): "
        f"SGD/exact time {first['ratio_sgd_time_over_exact_time']:.2f}×; held-out NMSE at "
        f"α = {first['sgd']['alpha_exact_units']:.4g}: exact {held['exact']:.4f}, "
        f"SGD {held['sgd']:.4f}",
        flush=True,
    )
    return first


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def note_sharing(result: dict[str, Any]) -> None:
    """Whether other processes shared the machine while the parts were timed."""
    parts = [result[k] for k in ("exact_path_vs_sgd", "sparse_vs_dense_step") if k in result]
    others = [
        part["machine_sharing"]["other_processes_cores"]
        for part in parts
        if part["machine_sharing"]["other_processes_cores"] is not None
    ]
    result["shared_machine"] = bool(others) and max(others) > 0.25
    result["shared_machine_note"] = (
        "other processes kept on average "
        + ", ".join(f"{o:.2f}" for o in others)
        + " cores busy during the two parts (of "
        + f"{os.cpu_count()}); timings are noisier when this is well above 0"
        if others
        else "unknown (no /proc/stat)"
    )


def print_targets(result: dict[str, Any]) -> None:
    if "exact_path_vs_sgd" in result:
        t1 = result["exact_path_vs_sgd"]["target"]
        print(
            f"target 1 (exact path faster, held-out loss not worse): "
            f"{'met' if t1['met'] else 'NOT met'} (faster: {t1['exact_faster']}, "
            f"loss: {t1['exact_heldout_equal_or_lower']})"
        )
    if "sparse_vs_dense_step" in result:
        second = result["sparse_vs_dense_step"]
        print(
            f"target 2 (sparse step ≥ 3× dense): min ratio {second['min_ratio']:.1f}×, "
            f"{'met' if second['target']['met_everywhere'] else 'NOT met everywhere'}"
        )
    print(f"machine shared: {result['shared_machine']} ({result['shared_machine_note']})")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.get_num_threads()))
    began = time.perf_counter()
    data = problem(args)
    real_density = data.x.nnz / (data.x.shape[0] * data.x.shape[1])

    out = out_path(args)
    result: dict[str, Any] = {}
    if args.only is not None and out.exists():
        result = json.loads(out.read_text())
        if result.get("quick") != args.quick or result.get("source") != data.source:
            sys.exit(f"{out} holds another problem: rerun both parts (drop --only)")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    if args.only in (None, "path"):
        result["exact_path_vs_sgd"] = run_path(args, data, stamp)
    if args.only in (None, "steps"):
        print("target 2: sparse- vs dense-input SGD step (batch 1024)", flush=True)
        densities = {"1%": 0.01, "codes": real_density}
        second = sparse_vs_dense(data.widths, densities, data.families, 2304, 1024, 2, data.repeats)
        second["measured_at"] = stamp
        result["sparse_vs_dense_step"] = second

    result.update(
        benchmark="bench_connectors",
        quick=args.quick,
        source=data.source,
        machine=machine(),
        seconds_total=time.perf_counter() - began,
    )
    note_sharing(result)
    first_keys = ["benchmark", "quick", "source", "machine", "exact_path_vs_sgd"]
    result = {k: result[k] for k in [*first_keys, *result] if k in result}  # stable order
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    print_targets(result)
    print(f"wrote {out} in {math.ceil(time.perf_counter() - began)} s")


if __name__ == "__main__":
    main()
