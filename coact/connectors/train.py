"""SGD fits of connector families on sparse codes, with a deterministic held-out split.

The loss is the normalised MSE (each output's MSE / its training-split variance, averaged
over outputs that vary there) so features and layers of different scales weigh alike;
outputs that never vary are dead: excluded, never NaN. The held-out split takes whole
contexts (or token blocks): tokens of one context are correlated, a per-token split leaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from coact.codes.store import CodeStore
from coact.connectors import families as fam
from coact.connectors.families import SparseConnector, column_variance, csr_batch, dense_rows
from coact.errors import CoactError
from coact.progress import tqdm
from coact.settings import check_ranges, setting


@dataclass(frozen=True)
class ConnectorTrainConfig:
    family: str = "linear"
    bias: bool = True
    hidden: int | None = None  # None: 4·n_out capped at families.HIDDEN_CAP
    alpha: float = 0.0  # weight of ‖W1‖₁
    alpha_hidden: float = 0.0  # weight of mean ‖h‖₁ (sae-connector)
    lr: float = 1e-3
    batch_tokens: int = 1024
    epochs: int = setting(1, "most epochs of the fit (it stops early with `patience`)", low=1)
    steps: int | None = None  # set: exactly this many steps (epochs cycle), epochs ignored
    patience: int | None = None  # set: stop after this many epochs without validation gain
    validation_fraction: float = 0.1  # of training contexts, watched when patience is set
    heldout_fraction: float = 0.1
    block_tokens: int = 128  # held-out unit when no context ids are given
    seed: int = 0
    device: str = "cpu"
    outputs: tuple[int, ...] | None = None  # fit only these output features
    inputs: tuple[int, ...] | None = None  # read only these input features
    layer_norm: float = 1.0  # for the seed's normalisation, see seed_normalised_mse
    min_layer_norm: float = 1.0
    progress: bool = True

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.family not in fam.FAMILIES:
            raise CoactError(f"unknown connector family {self.family!r}; use one of {fam.FAMILIES}")
        if not 0 <= self.heldout_fraction < 1:
            raise CoactError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if min(self.batch_tokens, self.epochs, self.layer_norm, self.min_layer_norm) <= 0:
            raise CoactError("batch_tokens, epochs and layer norms must be positive")
        if self.steps is not None and self.steps < 0:
            raise CoactError(f"steps must be ≥ 0, got {self.steps}")
        if self.patience is not None and (self.patience < 1 or self.steps is not None):
            raise CoactError("patience must be ≥ 1 and needs epochs, not a fixed step count")
        if not 0 < self.validation_fraction < 1:
            raise CoactError(
                f"validation_fraction must be in (0, 1), got {self.validation_fraction}"
            )


def seed_normalised_mse(
    mse: np.ndarray | float, layer_norm: float, min_layer_norm: float
) -> np.ndarray | float:
    """The seed study's normalisation, MSE × (min layer norm / layer norm)², for replication.

    `layer_norm`: the typical norm of this layer's output activations; `min_layer_norm`: the
    smallest over the layers compared. Rescaling every layer to the quietest one's scale is
    how the seed made MSEs (and its τ = 0.001) comparable; our measure is the normalised MSE."""
    return mse * (min_layer_norm / layer_norm) ** 2


def split_rows(
    n: int, fraction: float, seed: int, groups: np.ndarray | None = None, block: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): whole groups (contexts, else blocks) drawn from `seed`."""
    groups = np.arange(n) // block if groups is None else np.asarray(groups)
    if len(groups) != n:
        raise CoactError(f"{len(groups)} context ids for {n} tokens")
    _, inverse = np.unique(groups, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if n else 0
    n_held = round(fraction * n_groups)
    if fraction > 0 and n_groups > 1:
        n_held = min(max(n_held, 1), n_groups - 1)
    held = np.random.default_rng(seed).permutation(n_groups)[:n_held]
    mask = np.isin(inverse, held)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


@torch.no_grad()
def _sums(
    connector: SparseConnector, x: sp.csr_matrix, y: sp.csr_matrix, rows: np.ndarray, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-output squared-error sums over `rows`, and how often each hidden unit fired."""
    device = connector.weight_in.device
    sse = torch.zeros(connector.n_out, dtype=torch.float64, device=device)
    fired = torch.zeros(connector.hidden or 0, dtype=torch.long, device=device)
    for start in range(0, len(rows), batch):
        r = rows[start : start + batch]
        error = connector(csr_batch(x, r, str(device))) - dense_rows(y, r, device)
        sse += error.double().pow(2).sum(0)
        if connector.hidden and connector.last_hidden is not None:
            fired += (connector.last_hidden > 0).sum(0)
    return sse.cpu().numpy(), fired.cpu().numpy()


def per_output_mse(
    connector: SparseConnector,
    x: sp.csr_matrix,
    y: sp.csr_matrix,
    rows: np.ndarray | None = None,
    *,
    batch_tokens: int = 4096,
) -> np.ndarray:
    """MSE of each output on `rows` (all if None); x, y already restricted to the
    connector's inputs and outputs. NaN when there are no rows."""
    rows = np.arange(x.shape[0]) if rows is None else np.asarray(rows)
    sse, _ = _sums(connector, x, y, rows, batch_tokens)
    return sse / len(rows) if len(rows) else np.full(connector.n_out, np.nan)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


@dataclass
class TrainedConnector:
    """A fitted connector, its per-step curves, and per-output losses on both splits.

    Outputs with no variance on the training split are dead: excluded from the loss and
    NaN in every normalised figure; totals average over the others."""

    connector: SparseConnector
    config: ConnectorTrainConfig
    inputs: np.ndarray  # original input-feature index of each connector input
    outputs: np.ndarray  # original output-feature index of each connector output
    train_rows: np.ndarray
    heldout_rows: np.ndarray
    loss_nmse: list[float]  # one entry per step
    loss_l1: list[float]  # one entry per step, already weighted by alpha, alpha_hidden
    train_variance: np.ndarray  # 0 where dead
    train_mse: np.ndarray
    heldout_variance: np.ndarray  # 0 where constant on the held-out tokens
    heldout_mse: np.ndarray  # NaN when nothing is held out
    hidden_fired: np.ndarray  # tokens (both splits) on which each hidden unit fired
    validation_nmse: list[float] = field(default_factory=list)  # per epoch, with patience
    best_epoch: int | None = None  # the epoch whose weights were kept, with patience

    @property
    def dead_outputs(self) -> np.ndarray:
        return self.train_variance == 0

    @property
    def heldout_nmse(self) -> np.ndarray:
        return _ratio(self.heldout_mse, np.where(self.dead_outputs, 0, self.heldout_variance))

    @property
    def heldout_seed_mse(self) -> np.ndarray:
        norms = (self.config.layer_norm, self.config.min_layer_norm)
        return np.asarray(seed_normalised_mse(self.heldout_mse, *norms))

    @property
    def train_nmse_total(self) -> float:
        return _nanmean(_ratio(self.train_mse, self.train_variance))

    @property
    def heldout_nmse_total(self) -> float:
        return _nanmean(self.heldout_nmse)

    @property
    def heldout_seed_mse_total(self) -> float:
        return _nanmean(np.where(self.dead_outputs, np.nan, self.heldout_seed_mse))

    @property
    def hidden_l0(self) -> float | None:
        """Mean active hidden units per token (two-layer families; None otherwise)."""
        n = len(self.train_rows) + len(self.heldout_rows)
        return float(self.hidden_fired.sum() / n) if self.connector.hidden else None

    @property
    def dead_hidden(self) -> int | None:
        return int((self.hidden_fired == 0).sum()) if self.connector.hidden else None


def _nanmean(a: np.ndarray) -> float:
    finite = np.isfinite(a)
    return float(a[finite].mean()) if finite.any() else float("nan")


def _adam(connector: SparseConnector, lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(connector.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(connector.parameters(), lr=lr)


def train_connector(
    x: sp.csr_matrix,
    y: sp.csr_matrix,
    config: ConnectorTrainConfig = ConnectorTrainConfig(),
    *,
    groups: np.ndarray | None = None,
    skip: tuple[np.ndarray, np.ndarray] | None = None,
) -> TrainedConnector:
    """Fit F_out ≈ f(F_in) by Adam on shuffled sparse batches; `groups` (context id per
    token) sets the held-out unit, else blocks of `config.block_tokens` tokens. `skip`
    (W n_in × n_out, b over the fitted inputs and outputs): a fixed linear term the fit
    starts from and adds to, see `SparseConnector.set_linear_skip`."""
    x, y = sp.csr_matrix(x, dtype=np.float32), sp.csr_matrix(y, dtype=np.float32)
    if x.shape[0] != y.shape[0]:
        raise CoactError(f"input codes have {x.shape[0]} tokens, output codes {y.shape[0]}")
    inputs = np.arange(x.shape[1]) if config.inputs is None else np.asarray(config.inputs)
    outputs = np.arange(y.shape[1]) if config.outputs is None else np.asarray(config.outputs)
    x = x if config.inputs is None else sp.csr_matrix(x[:, inputs])
    y = y if config.outputs is None else sp.csr_matrix(y[:, outputs])
    c = config
    train, held = split_rows(x.shape[0], c.heldout_fraction, c.seed, groups, c.block_tokens)
    if len(train) == 0:
        raise CoactError("no training tokens: the codes are empty")
    variance = column_variance(y, train)
    weights = torch.from_numpy(_ratio(np.ones_like(variance), variance)).nan_to_num(0.0)
    weights = weights.float().to(c.device)
    connector = fam.SparseConnector(
        c.family, x.shape[1], y.shape[1], hidden=c.hidden, bias=c.bias, seed=c.seed
    ).to(c.device)
    if skip is not None:
        connector.set_linear_skip(
            torch.as_tensor(np.asarray(skip[0])), torch.as_tensor(np.asarray(skip[1]))
        )
    optimizer = _adam(connector, c.lr)
    rng = np.random.default_rng(c.seed)
    fit_rows, watch = train, np.empty(0, dtype=np.int64)
    if c.patience is not None:  # early stopping watches contexts carved out of training
        sub_groups = None if groups is None else np.asarray(groups)[train]
        keep, seen = split_rows(len(train), c.validation_fraction, c.seed + 1, sub_groups)
        fit_rows, watch = train[keep], train[seen]
    per_epoch = -(-len(fit_rows) // c.batch_tokens)
    log_nmse, log_l1, watched = [], [], []  # type: list[float], list[float], list[float]
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    steps = range(c.epochs * per_epoch if c.steps is None else c.steps)
    for step in tqdm(steps, desc=f"fitting {c.family} connector", disable=not c.progress):
        if step % per_epoch == 0:  # a fresh shuffle each epoch
            order = rng.permutation(fit_rows)
        rows = order[(step % per_epoch) * c.batch_tokens :][: c.batch_tokens]
        batch, target = csr_batch(x, rows, c.device), dense_rows(y, rows, c.device)
        nmse, l1 = fam.loss_terms(connector, batch, target, weights, c.alpha, c.alpha_hidden)
        optimizer.zero_grad(set_to_none=True)
        (nmse + l1).backward()
        optimizer.step()
        log_nmse.append(float(nmse.detach()))
        log_l1.append(float(l1.detach()))
        if len(watch) and (step + 1) % per_epoch == 0:
            epoch = len(watched)
            watched.append(_watched_nmse(connector, x, y, watch, variance, c.batch_tokens))
            if best is None or watched[-1] < best[0]:
                state = {k: v.detach().clone() for k, v in connector.state_dict().items()}
                best = (watched[-1], epoch, state)
            elif epoch - best[1] >= (c.patience or 1):
                break
    if best is not None:
        connector.load_state_dict(best[2])
    connector.eval().requires_grad_(False)
    train_sse, fired_train = _sums(connector, x, y, train, max(c.batch_tokens, 4096))
    held_sse, fired_held = _sums(connector, x, y, held, max(c.batch_tokens, 4096))
    held_mse = held_sse / len(held) if len(held) else np.full(y.shape[1], np.nan)
    return TrainedConnector(
        *(connector, c, inputs, outputs, train, held, log_nmse, log_l1),
        *(variance, train_sse / len(train), column_variance(y, held), held_mse),
        hidden_fired=fired_train + fired_held,
        validation_nmse=watched,
        best_epoch=None if best is None else best[1],
    )


def _watched_nmse(
    connector: SparseConnector,
    x: sp.csr_matrix,
    y: sp.csr_matrix,
    rows: np.ndarray,
    variance: np.ndarray,
    batch: int,
) -> float:
    """Mean normalised MSE on the early-stopping contexts (outputs alive in training)."""
    was_training = connector.training
    connector.eval()
    sse, _ = _sums(connector, x, y, rows, max(batch, 4096))
    connector.train(was_training)
    return _nanmean(_ratio(sse / max(len(rows), 1), variance))


def train_connector_from_store(
    store: CodeStore,
    in_slug: str,
    out_slug: str,
    config: ConnectorTrainConfig = ConnectorTrainConfig(),
) -> TrainedConnector:
    """Fit on two sites of a code store, holding out whole contexts."""
    x, y = store.read_site(in_slug), store.read_site(out_slug)
    return train_connector(x, y, config, groups=store.read_tokens()["context"].to_numpy())
