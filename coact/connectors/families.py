"""Connector families F_out ≈ f(F_in) whose first layer reads sparse codes without densifying.

Input codes are ~1 % dense, so a dense tokens × n_in batch would spend almost all its time
multiplying zeros. The first layer is therefore `embedding_bag` (a gather-and-sum over the
active inputs' weight rows) fed with CSR parts, and so is its weight gradient (over the
transposed batch); later layers are small and dense.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn import functional as F

from coact.rundir.files import atomic_write

FAMILIES = ("linear", "relu", "mlp", "two-relu", "sae-connector")
TWO_LAYER = frozenset({"mlp", "two-relu", "sae-connector"})
HIDDEN_CAP = 4096  # default hidden width is 4·n_out, capped so CPU fits stay minutes long


class SparseBatch(NamedTuple):
    """CSR parts of a batch: `offsets` is the row pointer (rows + 1 long, include_last_offset)."""

    indices: Tensor  # int64 column of each nonzero
    offsets: Tensor  # int64 row pointer
    values: Tensor  # float32 value of each nonzero

    @property
    def n_rows(self) -> int:
        return int(self.offsets.shape[0]) - 1


Batch = SparseBatch | tuple[Tensor, Tensor, Tensor] | Tensor


def csr_batch(
    matrix: sp.csr_matrix, rows: np.ndarray | None = None, device: str = "cpu"
) -> SparseBatch:
    """The tensors the sparse first layer needs for `rows` of a scipy CSR matrix (all if None)."""
    m = sp.csr_matrix(matrix if rows is None else matrix[np.asarray(rows)])
    parts = (m.indices.astype(np.int64), m.indptr.astype(np.int64), m.data.astype(np.float32))
    return SparseBatch(*(torch.from_numpy(a).to(device) for a in parts))


def as_batch(x: Batch) -> SparseBatch:
    """Accept a torch sparse CSR tensor or an (indices, offsets, values) triple."""
    if isinstance(x, Tensor):
        if x.layout != torch.sparse_csr:
            raise TypeError("connectors read sparse input: pass a CSR tensor or csr_batch(...)")
        return SparseBatch(x.col_indices().long(), x.crow_indices().long(), x.values().float())
    return SparseBatch(*x)


def default_hidden(n_out: int) -> int:
    return max(1, min(4 * n_out, HIDDEN_CAP))


def _bag(batch: SparseBatch, dense: Tensor) -> Tensor:
    """Row i of the result: Σ values × dense[indices] over row i's nonzeros (CSR · dense)."""
    i, offsets, values = batch
    return F.embedding_bag(
        i, dense, offsets, mode="sum", per_sample_weights=values, include_last_offset=True
    )


def transpose(batch: SparseBatch, n_cols: int) -> SparseBatch:
    """The CSR parts of the transposed batch (a stable counting sort of the nonzeros).
    On CPU scipy's single-threaded CSR → CSC conversion does it: torch's stable argsort
    slows ~200× when another process holds a core, and this runs every backward step."""
    if batch.indices.device.type == "cpu":
        csc = sp.csr_matrix(
            (batch.values.detach().numpy(), batch.indices.numpy(), batch.offsets.numpy()),
            shape=(batch.n_rows, n_cols),
        ).tocsc()
        parts = (csc.indices.astype(np.int64), csc.indptr.astype(np.int64), csc.data)
        return SparseBatch(*(torch.from_numpy(np.ascontiguousarray(a)) for a in parts))
    order = torch.argsort(batch.indices, stable=True)
    rows = torch.repeat_interleave(
        torch.arange(batch.n_rows, device=order.device), batch.offsets.diff()
    )
    counts = torch.bincount(batch.indices, minlength=n_cols).cumsum(0)
    return SparseBatch(rows[order], F.pad(counts, (1, 0)), batch.values[order])


class _SparseTimesDense(torch.autograd.Function):
    """X · W with both directions as gathers: the weight gradient Xᵀ · grad is another
    embedding_bag over Xᵀ's CSR, about twice as fast on CPU as autograd's scatter-add."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, batch: SparseBatch) -> Tensor:
        ctx.batch, ctx.n_in = batch, weight.shape[0]
        return _bag(batch, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _bag(transpose(ctx.batch, ctx.n_in), grad.contiguous()), None


class SparseConnector(nn.Module):
    """Every family in one module: a sparse first layer, then the family's nonlinearities.

    The first-layer weight is stored n_in × width (one row per input feature) so the
    embedding_bag gather reads contiguous rows; `first_layer_weight()` gives width × n_in.
    """

    def __init__(
        self,
        family: str,
        n_in: int,
        n_out: int,
        *,
        hidden: int | None = None,
        bias: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"unknown connector family {family!r}; use one of {FAMILIES}")
        self.family, self.n_in, self.n_out = family, int(n_in), int(n_out)
        self.two_layer = family in TWO_LAYER
        self.hidden = (hidden or default_hidden(n_out)) if self.two_layer else None
        width = self.hidden or self.n_out
        gen = torch.Generator().manual_seed(seed)

        def uniform(*shape: int, fan_in: int) -> nn.Parameter:
            bound = 1 / math.sqrt(max(fan_in, 1))
            return nn.Parameter((torch.rand(*shape, generator=gen) * 2 - 1) * bound)

        # A convex linear fit needs no symmetry breaking; zeros leave unseen inputs at 0.
        if family == "linear":
            self.weight_in = nn.Parameter(torch.zeros(self.n_in, width))
        else:
            self.weight_in = uniform(self.n_in, width, fan_in=self.n_in)
        self.bias_in = nn.Parameter(torch.zeros(width)) if bias else None
        self.weight_out = uniform(self.n_out, width, fan_in=width) if self.hidden else None
        self.bias_out = nn.Parameter(torch.zeros(self.n_out)) if bias and self.hidden else None
        self.last_hidden: Tensor | None = None  # for the sae-connector's hidden L1 and stats
        self.skip_weight: Tensor | None = None  # fixed linear term, see set_linear_skip
        self.skip_bias: Tensor | None = None

    def set_linear_skip(self, weight: Tensor, bias: Tensor) -> None:
        """Add a fixed (untrained) linear map ŷ += W x + b, W n_in × n_out, and start the
        trained part at zero: the fit starts from that linear map and can only add to it.
        With non-negative codes W x = W ReLU(x), so the sum is still an mlp (its hidden
        layer widened by an identity block): linearity compares the best linear fit with an
        mlp that starts no worse than it."""
        if weight.shape != (self.n_in, self.n_out):
            raise ValueError(f"skip weight must be {(self.n_in, self.n_out)}, got {weight.shape}")
        device = self.weight_in.device
        self.skip_weight = weight.detach().float().to(device).contiguous()
        self.skip_bias = bias.detach().float().to(device)
        with torch.no_grad():
            (self.weight_out if self.weight_out is not None else self.weight_in).zero_()
            for b in (self.bias_out if self.hidden else self.bias_in,):
                if b is not None:
                    b.zero_()

    def first_layer(self, x: Batch) -> Tensor:
        """W x (+ b) as a sparse-times-dense product: batch × width, no dense batch × n_in."""
        out = _SparseTimesDense.apply(self.weight_in, as_batch(x))
        return out if self.bias_in is None else out + self.bias_in

    def forward(self, x: Batch) -> Tensor:
        z = self.first_layer(x)
        if self.weight_out is not None:
            h = torch.relu(z)
            self.last_hidden = h
            z = F.linear(h, self.weight_out, self.bias_out)
        if self.skip_weight is not None and self.skip_bias is not None:
            z = z + _bag(as_batch(x), self.skip_weight) + self.skip_bias
        return torch.relu(z) if self.family in ("relu", "two-relu") else z

    def skip_prediction(self, x: Batch) -> Tensor:
        """The fixed linear term alone (W x + b of `set_linear_skip`)."""
        if self.skip_weight is None or self.skip_bias is None:
            raise ValueError("this connector has no linear skip")
        return _bag(as_batch(x), self.skip_weight) + self.skip_bias

    def first_layer_weight(self) -> Tensor:
        return self.weight_in.T

    def weight_l1(self) -> Tensor:
        return self.weight_in.abs().sum()

    def hidden_l1(self) -> Tensor:
        """Mean over the last batch of ‖h‖₁; zero for families without that penalty."""
        if self.family != "sae-connector" or self.last_hidden is None:
            return torch.zeros((), device=self.weight_in.device)
        return self.last_hidden.abs().sum(-1).mean()

    def l1_penalty(self) -> Tensor:
        """‖W1‖₁, plus mean ‖h‖₁ of the last batch for the sae-connector (equal weights);
        the trainer weights the two terms separately (alpha, alpha_hidden)."""
        return self.weight_l1() + self.hidden_l1()

    # the interface every connector shares (`coact.connectors.interface.Connector`)
    @torch.no_grad()
    def predict(self, codes: sp.spmatrix, batch: int = 4096) -> np.ndarray:
        """Predicted output codes (tokens × n_out), a batch of rows at a time."""
        x = sp.csr_matrix(codes, dtype=np.float32)
        device = str(self.weight_in.device)
        parts = [
            self(csr_batch(x, np.arange(i, min(i + batch, x.shape[0])), device)).cpu().numpy()
            for i in range(0, x.shape[0], batch)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.n_out), np.float32)

    def weights(self) -> np.ndarray:
        """The first layer, n_in × width (the layer that reads the input features)."""
        return self.weight_in.detach().cpu().numpy()

    def to_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """Its parameters and fixed skip, keyed for one safetensors file."""
        tensors = {
            f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in self.state_dict().items()
        }
        if self.skip_weight is not None and self.skip_bias is not None:
            tensors[f"{prefix}skip_weight"] = self.skip_weight.cpu().contiguous()
            tensors[f"{prefix}skip_bias"] = self.skip_bias.cpu().contiguous()
        return tensors

    def describe(self) -> dict[str, str]:
        """What rebuilds it: the family and the shapes (safetensors metadata are strings)."""
        hidden = "" if self.hidden is None else str(self.hidden)
        bias = str(self.bias_in is not None)
        return {"family": self.family, "n_in": str(self.n_in), "n_out": str(self.n_out),
                "hidden": hidden, "bias": bias}  # fmt: skip

    @classmethod
    def from_tensors(
        cls, meta: dict[str, str], tensors: dict[str, Tensor], prefix: str = "", device: str = "cpu"
    ) -> SparseConnector:
        """The inverse of `to_tensors` + `describe`."""
        hidden = int(meta["hidden"]) if meta.get("hidden") else None
        connector = cls(
            meta["family"], int(meta["n_in"]), int(meta["n_out"]), hidden=hidden,
            bias=meta.get("bias", "True") == "True",
        )  # fmt: skip
        connector.load_state_dict({k: tensors[f"{prefix}{k}"] for k in connector.state_dict()})
        if f"{prefix}skip_weight" in tensors:
            connector.skip_weight = tensors[f"{prefix}skip_weight"].to(device)
            connector.skip_bias = tensors[f"{prefix}skip_bias"].to(device)
        return connector.to(device).eval().requires_grad_(False)

    def save(self, path: str | Path) -> None:
        meta = {"kind": "sparse", **self.describe()}
        tensors = self.to_tensors()
        atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> SparseConnector:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            return cls.from_tensors(dict(f.metadata()), tensors, device=device)


def column_variance(y: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    """Population variance per column on `rows`; 0 where it does not vary beyond rounding
    (such outputs are dead there: excluded, never divided by)."""
    sub, n = y[rows], max(len(rows), 1)
    mean = np.asarray(sub.sum(axis=0), dtype=np.float64).ravel() / n
    mean_sq = np.asarray(sub.multiply(sub).sum(axis=0), dtype=np.float64).ravel() / n
    variance = mean_sq - mean**2
    return np.where(variance > 1e-9 * mean_sq, variance, 0.0)


def dense_rows(y: sp.csr_matrix, rows: np.ndarray, device: str | torch.device = "cpu") -> Tensor:
    """Rows of the output codes, dense float32: the prediction they meet is dense anyway."""
    return torch.from_numpy(y[rows].toarray().astype(np.float32)).to(device)


def loss_terms(
    connector: SparseConnector,
    x: SparseBatch,
    y: Tensor,
    weights: Tensor,
    alpha: float = 0.0,
    alpha_hidden: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """(normalised MSE, L1 term) of one batch; `weights` is 1/variance on alive outputs, 0
    on dead ones, so the mean runs over alive outputs only."""
    pred = connector(x)
    n_alive = (weights > 0).sum().clamp_min(1)
    nmse = ((pred - y).pow(2).mean(0) * weights).sum() / n_alive
    l1 = alpha * connector.weight_l1() if alpha else pred.new_zeros(())
    if alpha_hidden:
        l1 = l1 + alpha_hidden * connector.hidden_l1()
    return nmse, l1
