"""One interface for every fitted connector, however it was fitted: the exact L1 path and
least squares (`LinearConnector`) and the SGD families (`coact.connectors.families.
SparseConnector`) both predict output codes from sparse input codes, expose their weights,
and save to and load from one safetensors file (`load_connector` reads either)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from coact.errors import CoactError
from coact.rundir.files import atomic_write


@runtime_checkable
class Connector(Protocol):
    """Codes of one site in (tokens × n_in, sparse), predicted codes of the other out
    (tokens × n_out, dense); its (first-layer) weights, n_in × its width; a file."""

    @property
    def n_in(self) -> int: ...

    @property
    def n_out(self) -> int: ...

    def predict(self, codes: sp.spmatrix) -> np.ndarray: ...

    def weights(self) -> sp.spmatrix | np.ndarray: ...

    def save(self, path: str | Path) -> None: ...


@dataclass(frozen=True, eq=False)
class LinearConnector:
    """ŷ = x W + b: the exact path's connector (L1 weights at one α, or least squares on
    a support or on every input), W n_in × n_out, sparse or dense."""

    weight: sp.spmatrix | np.ndarray
    intercept: np.ndarray

    def __post_init__(self) -> None:
        if self.weight.shape[1] != len(self.intercept):
            raise CoactError(
                f"a linear connector of {self.weight.shape[1]} outputs has "
                f"{len(self.intercept)} intercepts"
            )

    @property
    def n_in(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n_out(self) -> int:
        return int(self.weight.shape[1])

    def predict(self, codes: sp.spmatrix) -> np.ndarray:
        out = sp.csr_matrix(codes) @ self.weight
        out = out.toarray() if sp.issparse(out) else np.asarray(out)
        return np.asarray(out + self.intercept)

    def weights(self) -> sp.spmatrix | np.ndarray:
        return self.weight

    def save(self, path: str | Path) -> None:
        w = sp.coo_matrix(self.weight)
        tensors = {
            "row": torch.from_numpy(w.row.astype(np.int64)),
            "col": torch.from_numpy(w.col.astype(np.int64)),
            "value": torch.from_numpy(w.data.astype(np.float64)),
            "intercept": torch.from_numpy(np.asarray(self.intercept, dtype=np.float64)),
        }
        meta = {"kind": "linear", "shape": json.dumps(list(w.shape))}
        atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> LinearConnector:
        with safe_open(str(path), framework="pt") as f:
            shape = tuple(json.loads(f.metadata()["shape"]))
            row, col, value, intercept = (
                f.get_tensor(k).numpy() for k in ("row", "col", "value", "intercept")
            )
        return cls(sp.csc_matrix((value, (row, col)), shape=shape), intercept)


def load_connector(path: str | Path, device: str = "cpu") -> Connector:
    """Whichever connector `path` holds (written by its `save`)."""
    from coact.connectors.families import SparseConnector

    path = Path(path)
    if not path.is_file():
        raise CoactError(f"no saved connector at {path}")
    with safe_open(str(path), framework="pt") as f:
        kind = (f.metadata() or {}).get("kind")
    if kind == "linear":
        return LinearConnector.load(path)
    if kind == "sparse":
        return SparseConnector.load(path, device=device)
    raise CoactError(f"{path} is not a saved connector (kind {kind!r})")
