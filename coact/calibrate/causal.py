"""Causal check of connections: does ablating an input feature move the output feature
the way the connector says it should?

Connectors are fitted on co-occurrence, so a large weight may be correlation rather than
computation. For a sample of strong connections (in i → out j) the input feature is
ablated in the stream the MLP reads, x' = x − code_i · W_dec_in[i], on exactly the tokens
where it fires (nothing else changes, and the residual stream past the MLP is untouched);
the MLP's actual change in output feature j, Δy_j = encode_out(MLP(x')) − encode_out(MLP(x)),
is compared with the predictions −weight_refit_ij · code_i (the sparse formula), the
least-squares map's and the mlp connector's change when code i alone is zeroed.

Re-encoding x' may move other input codes too (an SAE's encoder is not the inverse of its
decoder), and the model sees x', not the codes: that is part of what is measured. The
prediction is judged per connection on the mean over the tokens where i fires: the sign
agrees, and the size agrees when actual / predicted lies inside `size_band`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
from torch import Tensor

from coact.connectors.families import SparseConnector, csr_batch
from coact.errors import CoactError
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import capture, mlp_output_after_edit
from coact.progress import tqdm
from coact.rundir.results import Result
from coact.sae.base import SparseAutoencoder
from coact.sae.evaluate import check_sae_fits

Connectors = Sequence[tuple[np.ndarray, SparseConnector]]
REQUIRED_COLUMNS = ("output", "input", "weight_refit", "standardised", "large")
SCHEMA = {
    "output": pl.Int64,
    "input": pl.Int64,
    "weight_refit": pl.Float64,
    "n_tokens": pl.Int64,
    "actual_mean": pl.Float64,
    "predicted_mean": pl.Float64,
    "predicted_lsq_mean": pl.Float64,
    "predicted_mlp_mean": pl.Float64,
    "corr": pl.Float64,
    "sign_agrees": pl.Boolean,
    "size_agrees": pl.Boolean,
    "judged": pl.Boolean,
}


@dataclass(frozen=True)
class CausalConfig:
    connections: int = 100  # strongest by |standardised| among large ones, stable ones first
    batch_size: int = 8  # contexts per edited forward pass
    skip_first_positions: int = 1  # BOS: no SAE is trained on it, as in collection
    size_band: tuple[float, float] = (0.5, 2.0)  # actual / predicted within: size agrees
    min_tokens: int = 5  # inputs firing on fewer tokens are reported, not judged
    progress: bool = True


@dataclass(frozen=True)
class _Clean:
    """The clean pass, per kept token (context-major, positions ≥ skip)."""

    codes_in: sp.csr_matrix  # tokens × n_in
    codes_out: np.ndarray  # tokens × len(outputs): only the sampled outputs
    outputs: np.ndarray  # sorted output features kept in codes_out
    n_positions: int  # kept positions per context


def sample_connections(weights: pl.DataFrame, n: int) -> pl.DataFrame:
    """The `n` strongest large connections by |standardised|, those found in both halves
    of the training data (`in_both`) first when the table has that column."""
    _check_columns(weights)
    large = weights.filter(pl.col("large").fill_null(False))
    keys, descending = [pl.col("standardised").abs()], [True]
    if "in_both" in weights.columns:
        keys, descending = [pl.col("in_both").fill_null(False), *keys], [True, True]
    ranked = large.sort(keys, descending=descending, maintain_order=True)
    return ranked.head(n).select("output", "input", "weight_refit")


def causal_check(
    lm: LoadedModel,
    layer: int,
    sae_in: SparseAutoencoder,
    sae_out: SparseAutoencoder,
    tokens: Tensor,
    weights: pl.DataFrame,
    connectors: Connectors | None = None,
    config: CausalConfig = CausalConfig(),
) -> pl.DataFrame:
    """One row per sampled connection, strongest first: the actual mean change of its
    output when its input is ablated, the predictions and their agreement (see the module
    docstring). Each input is ablated once for all its sampled connections."""
    check_sae_fits(
        sae_in, Site("mlp_resid", layer), lm.adapter.d_model, lm.adapter.mlp_resid_kind()
    )
    check_sae_fits(sae_out, Site("mlp_out", layer), lm.adapter.d_model)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise CoactError(
            f"tokens must be a non-empty (contexts × seq) batch, got {tuple(tokens.shape)}"
        )
    if tokens.shape[1] <= config.skip_first_positions:
        raise CoactError(
            f"contexts of {tokens.shape[1]} tokens leave nothing after skipping the first "
            f"{config.skip_first_positions} positions"
        )
    _check_columns(weights)
    _check_features(weights, sae_in.width, sae_out.width)
    if config.batch_size < 1 or config.size_band[0] > config.size_band[1]:
        raise CoactError(f"bad causal config: {config}")
    sample = sample_connections(weights, config.connections).with_row_index("rank")
    if sample.is_empty():
        return pl.DataFrame(schema=SCHEMA)
    places = _connector_places(connectors, sample["output"].to_numpy(), sae_in.width)
    model = _Model(lm, layer, sae_in, sae_out, tokens)
    clean = _clean_pass(model, sample, config)
    rows: list[tuple[int, dict[str, Any]]] = []
    inputs = np.unique(sample["input"].to_numpy())
    for i in tqdm(inputs, desc="causal check", unit="input", disable=not config.progress):
        part = sample.filter(pl.col("input") == i)
        found = _check_input(model, clean, int(i), part, connectors, places, config)
        rows.extend(zip(part["rank"].to_list(), found, strict=True))
    return pl.DataFrame([row for _, row in sorted(rows, key=lambda r: r[0])], schema=SCHEMA)


@dataclass(frozen=True, kw_only=True)
class CausalSummary(Result):
    """How many connections were checked and judged, and the share of judged ones whose
    sign, size (within the band) and both agree with the prediction (NaN when none is)."""

    connections: int
    judged: int
    share_sign_agrees: float
    share_size_agrees: float
    share_both_agree: float


def causal_summary(table: pl.DataFrame) -> CausalSummary:
    """The headline of a causal check's table (`causal_check`)."""
    judged = table.filter(pl.col("judged"))
    n = judged.height

    def share(mask: pl.Series) -> float:
        return float(mask.sum()) / n if n else float("nan")

    sign, size = judged["sign_agrees"], judged["size_agrees"]
    return CausalSummary(
        connections=table.height,
        judged=n,
        share_sign_agrees=share(sign),
        share_size_agrees=share(size),
        share_both_agree=share(sign & size),
    )


def _check_columns(weights: pl.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in weights.columns]
    if missing:
        raise CoactError(
            f"the weights table lacks column(s) {', '.join(missing)}; pass the "
            "weights.parquet written by `coact connect`"
        )


def _check_features(weights: pl.DataFrame, n_in: int, n_out: int) -> None:
    for column, width, sae in (("input", n_in, "input"), ("output", n_out, "output")):
        values = weights[column].to_numpy()
        bad = values[(values < 0) | (values >= width)]
        if len(bad):
            raise CoactError(
                f"the weights table names {column} feature {int(bad[0])}, but the {sae} SAE "
                f"has {width} features; the table and the SAEs do not belong together"
            )


def _connector_places(
    connectors: Connectors | None, outputs: np.ndarray, n_in: int
) -> dict[int, tuple[int, int]]:
    """Output feature → (chunk, column) in the fitted connectors."""
    if connectors is None:
        return {}
    places: dict[int, tuple[int, int]] = {}
    for k, (chunk, connector) in enumerate(connectors):
        if connector.n_in != n_in:
            raise CoactError(
                f"connector chunk {k} reads {connector.n_in} input features but the input "
                f"SAE has {n_in}; the connectors and the SAE do not belong together"
            )
        places.update({int(j): (k, c) for c, j in enumerate(chunk)})
    unknown = sorted({int(j) for j in outputs} - places.keys())
    if unknown:
        raise CoactError(f"output feature {unknown[0]} is in no connector chunk")
    return places


@dataclass(frozen=True)
class _Model:
    """What every pass of the check runs: the model, its layer, both SAEs, the contexts."""

    lm: LoadedModel
    layer: int
    sae_in: SparseAutoencoder
    sae_out: SparseAutoencoder
    tokens: Tensor


@torch.no_grad()
def _clean_pass(model: _Model, sample: pl.DataFrame, config: CausalConfig) -> _Clean:
    """Input codes (all features, sparse) and the sampled outputs' codes, once."""
    lm, layer, tokens = model.lm, model.layer, model.tokens
    sae_in, sae_out = model.sae_in, model.sae_out
    skip = config.skip_first_positions
    outputs = np.unique(sample["output"].to_numpy())
    sites = [Site("mlp_resid", layer), Site("mlp_out", layer)]
    codes_in, codes_out = [], []
    for start in range(0, tokens.shape[0], config.batch_size):
        acts = capture(lm, tokens[start : start + config.batch_size], sites)
        stream, out = (acts[s][:, skip:].reshape(-1, lm.adapter.d_model) for s in sites)
        codes_in.append(sp.csr_matrix(_numpy(sae_in.encode(stream))))
        codes_out.append(_numpy(sae_out.encode(out))[:, outputs])
    return _Clean(
        sp.vstack(codes_in, format="csr"),
        np.vstack(codes_out),
        outputs,
        max(tokens.shape[1] - skip, 0),
    )


def _check_input(
    model: _Model,
    clean: _Clean,
    i: int,
    part: pl.DataFrame,
    connectors: Connectors | None,
    places: dict[int, tuple[int, int]],
    config: CausalConfig,
) -> list[dict[str, Any]]:
    """Ablate input i wherever it fires; one result row per connection from i."""
    outputs = part["output"].to_numpy()
    columns = np.searchsorted(clean.outputs, outputs)
    column_i = clean.codes_in[:, i].toarray().ravel()
    rows = np.flatnonzero(column_i > 0)
    code = column_i[rows]
    actual = np.zeros((0, len(outputs)))
    if len(rows):
        actual = _actual_change(model, clean, i, rows, code, config.batch_size)[:, columns]
    weight = part["weight_refit"].to_numpy()
    formula = -code[:, None] * weight[None, :]
    lsq = mlp = np.full((len(rows), len(outputs)), np.nan)
    if connectors is not None and len(rows):
        lsq, mlp = _connector_change(clean.codes_in[rows], i, outputs, connectors, places)
    return [
        _row(int(j), i, float(weight[c]), actual[:, c], formula[:, c], lsq[:, c], mlp[:, c], config)
        for c, j in enumerate(outputs)
    ]


@torch.no_grad()
def _actual_change(
    model: _Model, clean: _Clean, i: int, rows: np.ndarray, code: np.ndarray, batch_size: int
) -> np.ndarray:
    """Δ codes of the sampled outputs (tokens where i fires × outputs), running the model
    only on the contexts that contain i, `batch_size` contexts per pass."""
    lm, layer, tokens = model.lm, model.layer, model.tokens
    sae_in, sae_out = model.sae_in, model.sae_out
    skip = tokens.shape[1] - clean.n_positions
    context, position = np.divmod(rows, clean.n_positions)
    direction = _decoder_row(sae_in, i, lm.device)
    contexts = np.unique(context)
    parts = []
    for start in range(0, len(contexts), batch_size):
        chosen = contexts[start : start + batch_size]
        mask = np.isin(context, chosen)
        local = np.searchsorted(chosen, context[mask])
        where = (torch.as_tensor(local), torch.as_tensor(position[mask] + skip))
        delta = torch.zeros(len(chosen), tokens.shape[1], lm.adapter.d_model, device=lm.device)
        amounts = torch.as_tensor(code[mask], dtype=delta.dtype, device=lm.device)
        delta[where] = -amounts[:, None] * direction[None, :]
        batch = tokens[torch.as_tensor(chosen)]
        _, out = mlp_output_after_edit(lm, batch, layer, _adder(delta))
        edited = _numpy(sae_out.encode(out[where]))[:, clean.outputs]
        parts.append(edited - clean.codes_out[rows[mask]])
    return np.vstack(parts).astype(np.float64)


def _adder(delta: Tensor) -> Callable[[Tensor], Tensor]:
    def edit(stream: Tensor) -> Tensor:
        return stream + delta.to(stream.dtype)

    return edit


def _decoder_row(sae: SparseAutoencoder, i: int, device: torch.device) -> Tensor:
    """Feature i's decoder direction: the W_dec row, or decode(e_i) − decode(0)."""
    weight = getattr(sae, "W_dec", None)
    if isinstance(weight, Tensor):
        return weight[i].detach().to(device, torch.float32)
    basis = torch.zeros(2, sae.width, device=device)
    basis[1, i] = 1.0
    decoded = sae.decode(basis).detach().float()
    return decoded[1] - decoded[0]


@torch.no_grad()
def _connector_change(
    codes: sp.csr_matrix,
    i: int,
    outputs: np.ndarray,
    connectors: Connectors,
    places: dict[int, tuple[int, int]],
) -> tuple[np.ndarray, np.ndarray]:
    """(least-squares, mlp) change of each output when code i alone is zeroed."""
    ablated = codes.tolil(copy=True)
    ablated[:, i] = 0
    ablated = sp.csr_matrix(ablated)
    lsq = np.zeros((codes.shape[0], len(outputs)))
    mlp = np.zeros_like(lsq)
    by_chunk: dict[int, list[tuple[int, int]]] = {}
    for c, j in enumerate(outputs):
        k, column = places[int(j)]
        by_chunk.setdefault(k, []).append((c, column))
    for k, pairs in by_chunk.items():
        connector = connectors[k][1]
        device = str(connector.weight_in.device)
        before, after = csr_batch(codes, device=device), csr_batch(ablated, device=device)
        cs, cols = (list(t) for t in zip(*pairs, strict=True))
        lsq[:, cs] = _numpy(connector.skip_prediction(after) - connector.skip_prediction(before))[
            :, cols
        ]
        mlp[:, cs] = _numpy(connector(after) - connector(before))[:, cols]
    return lsq, mlp


def _row(
    output: int,
    i: int,
    weight: float,
    actual: np.ndarray,
    formula: np.ndarray,
    lsq: np.ndarray,
    mlp: np.ndarray,
    config: CausalConfig,
) -> dict[str, Any]:
    n = len(actual)
    actual_mean, predicted_mean = _mean(actual), _mean(formula)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = actual_mean / predicted_mean
    low, high = config.size_band
    return {
        "output": output,
        "input": i,
        "weight_refit": weight,
        "n_tokens": n,
        "actual_mean": actual_mean,
        "predicted_mean": predicted_mean,
        "predicted_lsq_mean": _mean(lsq),
        "predicted_mlp_mean": _mean(mlp),
        "corr": _corr(actual, formula),
        "sign_agrees": bool(n) and bool(np.sign(actual_mean) == np.sign(predicted_mean)),
        "size_agrees": bool(n) and bool(low <= ratio <= high),
        "judged": n >= config.min_tokens,
    }


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over tokens; NaN when fewer than 3 or either is constant."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()
