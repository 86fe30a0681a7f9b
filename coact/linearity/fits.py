"""The fits the linearity table rests on: per chunk of outputs, least squares and an mlp
started from it (its fixed skip is the least-squares map), both without L1, and per
held-out context Σ(e_lin² − e_mlp²) for d's noise floor. The fitted connectors are saved
so later stages (splicing, causal checks) predict with exactly these fits."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from coact.connectors.config import ConnectConfig
from coact.connectors.exact import GramStats, linear_fit, mse
from coact.connectors.families import SparseConnector, csr_batch, dense_rows
from coact.connectors.train import train_connector
from coact.errors import CoactError
from coact.linearity.table import HeldoutContexts
from coact.progress import tqdm
from coact.rundir.files import atomic_write

LINEAR_MAP_ENTRIES = 2**26  # dense least-squares map per chunk: 512 MiB in float64


@dataclass
class LinearityFits:
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
    meta = {"chunks": str(len(connectors))}
    for k, (outputs, connector) in enumerate(connectors):
        tensors[f"{k}.outputs"] = torch.as_tensor(outputs, dtype=torch.int64)
        tensors.update(connector.to_tensors(prefix=f"{k}."))
        meta.update({f"{k}.{name}": v for name, v in connector.describe().items()})
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
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for k in range(int(meta["chunks"])):
        prefix = f"{k}."
        described = {m[len(prefix) :]: v for m, v in meta.items() if m.startswith(prefix)}
        connector = SparseConnector.from_tensors(described, tensors, prefix, device)
        out.append((tensors[f"{k}.outputs"].numpy(), connector))
    return out


def linearity_fits(
    x: sp.csr_matrix,
    y: sp.csr_matrix,
    stats: GramStats,
    stats_held: GramStats,
    groups: np.ndarray,
    held: np.ndarray,
    config: ConnectConfig,
) -> LinearityFits:
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
        settings = replace(
            config.mlp, heldout_fraction=config.heldout_fraction, seed=config.seed,
            device=config.device, outputs=None if whole else tuple(int(j) for j in outputs),
            progress=config.progress,
        )  # fmt: skip
        mlp = train_connector(
            x,
            y,
            settings,
            groups=groups,
            skip=(w_lin, b_lin),
        )
        if not np.array_equal(mlp.heldout_rows, held):
            raise RuntimeError("the mlp and the linear fits held out different tokens")
        mse_mlp[outputs] = mlp.heldout_mse
        y_chunk = y if whole else sp.csr_matrix(y[:, outputs])
        part = _heldout_contexts(mlp.connector, x, y_chunk, held, groups, config.mlp.batch_tokens)
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
    return LinearityFits(
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
