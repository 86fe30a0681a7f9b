"""The measurements behind the metric sheet: each route's replacement of the MLP output on
held-out tokens (its FVU, L0, dead latents, and CE / KL when spliced into the model), how
many inputs each output feature rests on, and whether each route's slopes agree with the
model's own Jacobian and with the model's ablation of strong connections.

Routes (rows of the sheet): `transcoder` (TC(mlp_in)), `transcoder_skip` (its skip path
alone: the transcoder's linear part), `sae_linear` and `sae_mlp` (the output SAE decoding
the linear or mlp connector's prediction from the input SAE's codes: the SAE route),
`sae_out` (the output SAE's own reconstruction of the MLP output: the SAE route's
ceiling) and `zero` (the MLP output zero-ablated, the baseline of CE recovered).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from scipy.stats import spearmanr
from torch import Tensor
from torch.func import jacrev, vmap

from coact.calibrate.intervene import splice_losses, splice_summary
from coact.connectors.families import SparseConnector
from coact.models.adapters import resolve
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import capture, spliced_logits
from coact.sae.base import SparseAutoencoder
from coact.transcoder.model import SkipTranscoder

ROUTES = ("transcoder", "transcoder_skip", "sae_linear", "sae_mlp", "sae_out", "zero")
Connectors = list[tuple[np.ndarray, SparseConnector]]


@dataclass(frozen=True)
class Models:
    """What the sheet compares: the two SAEs, the connectors between them and the
    transcoder, at one layer of one model."""

    lm: LoadedModel
    layer: int
    sae_in: SparseAutoencoder
    sae_out: SparseAutoencoder
    connectors: Connectors
    tc: SkipTranscoder

    @property
    def sites(self) -> tuple[Site, Site, Site]:
        """(the stream the MLP reads, the MLP module's input, the MLP's output)."""
        return (
            Site("mlp_resid", self.layer),
            Site("mlp_in", self.layer),
            Site("mlp_out", self.layer),
        )

    def norm(self) -> Callable[[Tensor], Tensor]:
        module: Callable[[Tensor], Tensor] = resolve(
            self.lm.model, self.lm.adapter.mlp_input_point(self.layer).path
        )
        return module

    def transcoder_block(self) -> Callable[[Tensor], Tensor]:
        """stream ↦ TC(norm(stream)): the transcoder in the MLP's place."""
        norm, tc = self.norm(), self.tc
        return lambda stream: tc(norm(stream))


def connector_codes(connectors: Connectors, codes: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
    """(linear, mlp) connector predictions of the output codes from input codes (N × n_in)."""
    with warnings.catch_warnings():  # torch calls its sparse CSR support beta
        warnings.simplefilter("ignore", UserWarning)
        rows = codes.float().cpu().to_sparse_csr()
    linear, mlp = torch.zeros(codes.shape[0], n_out), torch.zeros(codes.shape[0], n_out)
    for outputs, connector in connectors:
        index, here = torch.as_tensor(outputs), rows.to(connector.weight_in.device)
        linear[:, index] = connector.skip_prediction(here).cpu()
        mlp[:, index] = connector(here).cpu()
    return linear.to(codes.device), mlp.to(codes.device)


@torch.no_grad()
def route_outputs(models: Models, stream: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Each route's MLP output for rows of (stream, mlp_in, mlp_out), and the codes whose L0
    and dead latents the sheet reports ("codes:<route>")."""
    tc, sae_in, sae_out = models.tc, models.sae_in, models.sae_out
    tc_codes, out_codes = tc.encode(x), sae_out.encode(y)
    linear, mlp = connector_codes(models.connectors, sae_in.encode(stream), sae_out.width)
    return {
        "transcoder": tc.decode(tc_codes, x),
        "transcoder_skip": tc.skip_output(x),
        "sae_linear": sae_out.decode(linear),
        "sae_mlp": sae_out.decode(mlp),
        "sae_out": sae_out.decode(out_codes),
        "zero": torch.zeros_like(y),
        "codes:transcoder": tc_codes,
        "codes:sae_out": out_codes,
    }


class _Sums:
    """Per route: squared error of the MLP output; per dictionary: L0 and latents fired."""

    def __init__(self) -> None:
        self.sq_err: dict[str, float] = dict.fromkeys(ROUTES, 0.0)
        self.sum_y: Tensor | None = None
        self.sum_y2, self.n = 0.0, 0
        self.l0: dict[str, float] = {}
        self.fired: dict[str, Tensor] = {}

    def add(self, y: Tensor, outputs: dict[str, Tensor]) -> None:
        for route in ROUTES:
            self.sq_err[route] += float((y - outputs[route]).pow(2).sum())
        self.sum_y = y.sum(0) if self.sum_y is None else self.sum_y + y.sum(0)
        self.sum_y2 += float(y.pow(2).sum())
        self.n += y.shape[0]
        for name in ("transcoder", "sae_out"):
            codes = outputs[f"codes:{name}"] > 0
            self.l0[name] = self.l0.get(name, 0.0) + float(codes.sum())
            fired = codes.any(0)
            self.fired[name] = fired if name not in self.fired else self.fired[name] | fired

    def frame(self) -> pl.DataFrame:
        assert self.sum_y is not None
        variance = self.sum_y2 - float(self.sum_y.pow(2).sum()) / self.n
        # the dictionary whose latents a route writes through (none: the skip path, zero)
        of = {"transcoder": "transcoder", "sae_linear": "sae_out", "sae_mlp": "sae_out"}
        of["sae_out"] = "sae_out"
        return pl.DataFrame(
            {
                "route": list(ROUTES),
                "fvu": [self.sq_err[r] / variance for r in ROUTES],
                "l0": [self.l0[of[r]] / self.n if r in of else 0.0 for r in ROUTES],
                "dead_fraction": [
                    1.0 - float(self.fired[of[r]].float().mean()) if r in of else None
                    for r in ROUTES
                ],
                "n_tokens_fvu": self.n,
            }
        )


def outputs_and_splices(
    models: Models, tokens: Tensor, *, batch_size: int, skip: int, n_boot: int, seed: int
) -> pl.DataFrame:
    """One row per route: FVU of the MLP output, L0 and dead latents of its dictionary, and
    ΔCE, KL(clean ‖ spliced) and CE recovered (against zero ablation) with the route's
    output spliced in place of the MLP's on every position after the first `skip`."""
    lm, sums = models.lm, _Sums()
    site_out = models.sites[2]

    def spliced(batch: Tensor) -> Callable[[str], Tensor]:
        acts = capture(lm, batch, list(models.sites))
        stream, x, y = (acts[s][:, skip:].float() for s in models.sites)
        d = stream.shape[-1]
        rows = route_outputs(models, stream.reshape(-1, d), x.reshape(-1, d), y.reshape(-1, d))
        sums.add(y.reshape(-1, d), rows)

        def replace(name: str) -> Callable[[Tensor], Tensor]:
            new = rows[name].reshape(y.shape)

            def fn(out: Tensor) -> Tensor:
                result = out.clone()
                result[:, skip:] = new.to(out.dtype)
                return result

            return fn

        return lambda name: spliced_logits(lm, batch, site_out, replace(name))

    losses = splice_losses(
        lm, tokens, list(ROUTES), spliced, batch_size=batch_size, skip_first_positions=skip,
        desc=f"transcoder sheet, layer {models.layer}",
    )  # fmt: skip
    table = splice_summary(losses, n_boot=n_boot, seed=seed)
    keep = ("splice", "delta_ce", "delta_ce_low", "delta_ce_high", "kl", "ce_recovered",
            "ce_recovered_low", "ce_recovered_high", "n_tokens", "n_contexts")  # fmt: skip
    table = table.select(keep).rename({"splice": "route"})
    return sums.frame().join(table, on="route", how="left", maintain_order="left")


def mean_norm_jacobian(norm: Callable[[Tensor], Tensor], streams: Tensor, n: int = 64) -> Tensor:
    """The MLP's norm's Jacobian (d × d) averaged over `n` evenly spaced token streams: the
    linear map that carries an input SAE direction to what the transcoder reads."""
    rows = streams[torch.linspace(0, streams.shape[0] - 1, min(n, streams.shape[0])).long()]
    with torch.no_grad():
        jacobians = vmap(jacrev(lambda v: norm(v[None])[0]))(rows.float())
    return jacobians.mean(0)


def mass_counts(mass: np.ndarray, share: float) -> np.ndarray:
    """Per column of a non-negative (inputs × outputs) mass matrix, the fewest inputs whose
    mass reaches `share` of the column's total (0 for an all-zero column)."""
    ordered = -np.sort(-mass, axis=0)
    total = ordered.sum(0)
    reached = np.cumsum(ordered, axis=0) >= share * total[None, :] - 1e-12 * total[None, :]
    counts = reached.argmax(0) + 1
    return np.where(total > 0, counts, 0)


def virtual_weights(models: Models, streams: Tensor) -> Tensor:
    """The transcoder's encoder read through the input SAE's decoder and the norm's mean
    Jacobian: V[i, t] = W_dec_in[i] · Jₙₒᵣₘᵀ · W_enc_tc[:, t] (input features × latents)."""
    jac = mean_norm_jacobian(models.norm(), streams)
    return models.sae_in.W_dec.float() @ jac.T @ models.tc.W_enc.float()


def connections_per_output(
    models: Models, streams: Tensor, sae_weights: pl.DataFrame, share: float
) -> tuple[float, float]:
    """(SAE route, transcoder): the mean number of input features holding `share` of an
    output's |weight| × mean input code, over outputs with any weight. The SAE route reads
    the connector's weights at the chosen α (its least-squares refit), the transcoder its
    virtual weights onto its live latents."""
    with torch.no_grad():
        mean_code = models.sae_in.encode(streams).mean(0).cpu().numpy().astype(np.float64)
        virtual = virtual_weights(models, streams).abs().cpu().numpy().astype(np.float64)
        alive = (models.tc.encode(models.norm()(streams)) > 0).any(0).cpu().numpy()
    tc_counts = mass_counts(virtual[:, alive] * mean_code[:, None], share)
    n_in, n_out = models.sae_in.width, models.sae_out.width
    dense = np.zeros((n_in, n_out))
    if sae_weights.height:
        rows, cols = sae_weights["input"].to_numpy(), sae_weights["output"].to_numpy()
        dense[rows, cols] = np.abs(sae_weights["weight_refit"].to_numpy()) * mean_code[rows]
    sae_counts = mass_counts(dense, share)
    sae_counts = sae_counts[sae_counts > 0]
    tc_counts = tc_counts[tc_counts > 0]
    return (
        float(sae_counts.mean()) if len(sae_counts) else float("nan"),
        float(tc_counts.mean()) if len(tc_counts) else float("nan"),
    )


def agreement(
    reference: np.ndarray, other: np.ndarray, band: tuple[float, float]
) -> tuple[float, float, float]:
    """(sign, size, Spearman) agreement of `other` with `reference` over connections: the
    share with the same nonzero sign, the share with reference / other inside `band`, and
    the rank correlation (NaN under three connections)."""
    if len(reference) == 0:
        return float("nan"), float("nan"), float("nan")
    sign = (np.sign(reference) == np.sign(other)) & (other != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(other != 0, reference / np.where(other != 0, other, 1.0), np.nan)
    size = (ratio >= band[0]) & (ratio <= band[1])
    rho = (
        float(spearmanr(reference, other).statistic)
        if len(reference) >= 3 and np.ptp(reference) > 0 and np.ptp(other) > 0
        else float("nan")
    )
    return float(sign.mean()), float(size.mean()), rho
