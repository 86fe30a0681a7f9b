"""How `connect` fits: the held-out split, the L1 path, the mlp beside least squares and
the linearity threshold it is read at first (its own module: the fits and the stage both
read it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from coact.connectors.exact import LassoPathConfig
from coact.connectors.train import ConnectorTrainConfig
from coact.linearity.table import LinearityConfig
from coact.settings import check_ranges, setting

# at most 10 epochs: it stops early when held-back training contexts stop gaining
MLP_FIT = ConnectorTrainConfig(
    family="mlp", hidden=1024, lr=1e-3, epochs=10, patience=2, batch_tokens=1024
)


@dataclass(frozen=True)
class ConnectConfig:
    heldout_fraction: float = 0.1  # of contexts, for every held-out figure
    seed: int = 0
    path: LassoPathConfig = field(default_factory=LassoPathConfig)
    magnitude: float = setting(0.05, "standardised |w| above which a weight counts as large", low=0)
    stability: bool = setting(True, "refit on two disjoint halves of the training contexts")
    # the mlp fitted beside least squares for linearity (its skip is the least-squares map);
    # its split, seed, device and outputs are set by the stage
    mlp: ConnectorTrainConfig = MLP_FIT
    w2_magnitude: float = 0.1  # |W2| above which an mlp weight counts as large (raw)
    linearity_chunk_outputs: int | None = None  # None: as many as fit LINEAR_MAP_ENTRIES
    device: str = "cpu"
    linearity: LinearityConfig = field(default_factory=LinearityConfig)
    layer_norm: float = 1.0  # for the seed's normalisation; see linearity.seed_scale
    min_layer_norm: float = 1.0
    formula_terms: int = 5
    top_tokens: int = 5
    progress: bool = True

    def __post_init__(self) -> None:
        check_ranges(self)
