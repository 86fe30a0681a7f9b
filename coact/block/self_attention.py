"""Does an attention-output feature use other positions? Two complementary causal checks.

Both compare, per feature of the attn_out[ℓ] SAE, the codes c of the real attn_out[ℓ]
with the codes c' of what attention writes under an intervention. A feature that the
intervention leaves alone (low fvu, `kept` near 1) does not need what it took away.

Self-only attention (`self_only_check`). With softmax weight 1 on the token itself, each
head of attention at layer ℓ returns its own value vector, so what attention would write
has a closed form (the adapter's `self_only_attention`): W_o·concat_h(W_v·norm(x) + b_v) +
b_o from resid_pre[ℓ]. A feature it reproduces is computed from the token itself. One it
loses is not necessarily carried from other tokens, though: heads that park attention on
the BOS sink read a constant value (the same in every context), and self-only attention
takes that constant away too, although such heads use the content of no other token.

Resampled context (`resample_check`). At a target position t, what attention reads at
every earlier position except the first `skip_first_positions` (BOS, the sink, identical
across contexts) is replaced by what it reads at the same positions of another context
(the donor); t itself and BOS keep their own, and attn_out[ℓ] is read at t. The stream is
written as the input of attention's norm (resid_pre[ℓ]), so only attention sees it, not
the residual skip; positions after t do not matter (causal attention). The pattern keeps
its sink, and the content of earlier tokens changes: a feature whose code at t survives
(low `resample_fvu`) does not use that content; one that changes does. Targets are spread
over positions skip + 1 (the first with an earlier position to resample) to the last.
Read the two together: a feature lost by self-only attention that survives resampling
leans on the sink (or on its own token through a pattern that self-only breaks), not on
the content of context.

Per feature j, over every token kept (self-only: every position after the first
`skip_first_positions` of each context; resampled: every (context, target) pair), with c
the real code and c' the intervened one:

    active          tokens with c > 0
    self_active     tokens with c' > 0 (self-only; `resample_active` for resampling)
    sum_sq_real     Σ c²
    sum_sq_error    Σ (c − c')²
    self_only_fvu   Σ (c − c')² / Σ (c − mean c)², NaN for a feature never active
                    (`resample_fvu` for resampling)
    kept            Σ min(c, c') / Σ c, NaN when Σ c = 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from coact.errors import CoactError
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import attention_output_with_input, capture
from coact.progress import tqdm
from coact.rundir.results import Result
from coact.sae.base import SparseAutoencoder


@dataclass(frozen=True)
class SelfOnlyConfig:
    batch_size: int = 8  # contexts per forward pass
    skip_first_positions: int = 1  # positions dropped from each context (BOS)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.skip_first_positions < 0:
            raise CoactError(
                f"need batch_size ≥ 1 and skip_first_positions ≥ 0, got {self.batch_size}, "
                f"{self.skip_first_positions}"
            )


@dataclass(frozen=True)
class ResampleConfig:
    batch_size: int = 8  # contexts per forward pass (each run as `targets` replicas)
    targets: int = 8  # target positions per context, spread evenly, the last one included
    skip_first_positions: int = 1  # positions neither resampled nor targeted (BOS)
    seed: int = 0  # picks the donor shift
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.targets < 1 or self.skip_first_positions < 0:
            raise CoactError(
                f"need batch_size ≥ 1, targets ≥ 1 and skip_first_positions ≥ 0, got "
                f"{self.batch_size}, {self.targets}, {self.skip_first_positions}"
            )


@torch.no_grad()
def self_only_check(
    lm: LoadedModel,
    sae_out: SparseAutoencoder,
    tokens: Tensor,
    layer: int,
    config: SelfOnlyConfig = SelfOnlyConfig(),
) -> pl.DataFrame:
    """Per feature of `sae_out` (the attn_out[layer] SAE), how the codes of self-only
    attention compare with those of the real attention output on `tokens` (n_ctx, seq):
    one row per latent, the columns of the module docstring."""
    skip = config.skip_first_positions
    _check_tokens(tokens, skip + 1, skip)
    resid, attn = Site("resid_pre", layer), Site("attn_out", layer)
    lm.adapter.check(attn)
    tally = _Tally(sae_out.width)
    starts = range(0, tokens.shape[0], config.batch_size)
    for start in tqdm(starts, desc=f"self-only attention {layer}", disable=not config.progress):
        acts = capture(lm, tokens[start : start + config.batch_size], [resid, attn])
        own = lm.adapter.self_only_attention(lm.model, layer, acts[resid])
        c = sae_out.encode(acts[attn][:, skip:]).flatten(0, 1)
        tally.add(c, sae_out.encode(own[:, skip:]).flatten(0, 1))
    return tally.table("self_active", "self_only_fvu")


@dataclass(frozen=True, kw_only=True)
class SelfOnlySummary(Result):
    """Alive features (active at least once), how many (and what percent) of them keep
    self_only_fvu ≤ threshold (attention not needed beyond the token itself), and their
    median fvu."""

    features: int
    alive: int
    threshold: float
    self_only: int
    percent_self_only: float
    median_self_only_fvu: float


@dataclass(frozen=True, kw_only=True)
class ResampleSummary(Result):
    """Alive features, how many (and what percent) keep resample_fvu ≤ threshold (the
    content of earlier tokens not needed), and their median fvu."""

    features: int
    alive: int
    threshold: float
    context_free: int
    percent_context_free: float
    median_resample_fvu: float


def self_only_summary(table: pl.DataFrame, threshold: float = 0.5) -> SelfOnlySummary:
    """The headline of `self_only_check`'s table."""
    return SelfOnlySummary(**_summary(table, "self_only_fvu", "self_only", threshold))


def resample_donors(n_contexts: int, seed: int = 0) -> Tensor:
    """Donor of each context i: context (i + shift) mod n, with one shift in 1..n − 1
    drawn from `seed`, so that no context is its own donor."""
    if n_contexts < 2:
        raise CoactError(
            f"resampled context needs at least 2 contexts (each takes its donor from another), "
            f"got {n_contexts}"
        )
    gen = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(1, n_contexts, (), generator=gen))
    return (torch.arange(n_contexts) + shift) % n_contexts


def resample_targets(seq: int, targets: int, skip: int) -> Tensor:
    """Up to `targets` positions spread evenly over skip + 1 .. seq − 1 (the positions with
    an earlier position to resample), the last one always included."""
    first = skip + 1
    if seq <= first:
        raise CoactError(
            f"contexts of {seq} positions leave none to check after skipping the first {skip} "
            "(a target needs an earlier position to resample)"
        )
    steps = min(targets, seq - first)
    if steps == 1:
        return torch.tensor([seq - 1])
    # At most one step per position, so the rounded positions stay distinct.
    return torch.linspace(first, seq - 1, steps, dtype=torch.float64).round().long()


@torch.no_grad()
def resample_check(
    lm: LoadedModel,
    sae_out: SparseAutoencoder,
    tokens: Tensor,
    layer: int,
    config: ResampleConfig = ResampleConfig(),
) -> pl.DataFrame:
    """Per feature of `sae_out` (the attn_out[layer] SAE), how its codes at the target
    positions of `tokens` (n_ctx, seq) change when attention reads the donor context's
    resid_pre[layer] at the earlier positions (BOS and the target itself kept): one row per
    latent, the columns of the module docstring. Each context runs as one replica per
    target, `batch_size` contexts (batch_size · targets sequences) per pass."""
    skip = config.skip_first_positions
    _check_tokens(tokens, skip + 1, skip)
    donors = resample_donors(tokens.shape[0], config.seed)
    positions = resample_targets(tokens.shape[1], config.targets, skip)
    resid, attn = Site("resid_pre", layer), Site("attn_out", layer)
    lm.adapter.check(attn)
    k = len(positions)
    replicas = torch.arange(k)
    tally = _Tally(sae_out.width)
    starts = range(0, tokens.shape[0], config.batch_size)
    for start in tqdm(starts, desc=f"resampled context {layer}", disable=not config.progress):
        own_tokens = tokens[start : start + config.batch_size]
        b = own_tokens.shape[0]
        both = torch.cat([own_tokens, tokens[donors[start : start + b]]])  # contexts, donors
        acts = capture(lm, both, [resid, attn])
        own, donor = acts[resid][:b], acts[resid][b:]
        stream = own.unsqueeze(1).repeat(1, k, 1, 1)  # (b, k, seq, d): replica j targets t_j
        for j, t in enumerate(positions.tolist()):
            stream[:, j, skip:t] = donor[:, skip:t]
        out = attention_output_with_input(
            lm, own_tokens.repeat_interleave(k, dim=0), layer, stream.flatten(0, 1)
        )
        at = positions.to(out.device)
        resampled = out.unflatten(0, (b, k))[:, replicas.to(out.device), at]  # (b, k, d)
        real = acts[attn][:b][:, at]
        tally.add(sae_out.encode(real).flatten(0, 1), sae_out.encode(resampled).flatten(0, 1))
    return tally.table("resample_active", "resample_fvu")


def resample_summary(table: pl.DataFrame, threshold: float = 0.5) -> ResampleSummary:
    """The headline of `resample_check`'s table."""
    return ResampleSummary(**_summary(table, "resample_fvu", "context_free", threshold))


class _Tally:
    """Per-feature sums, over tokens, of the real codes c and the intervened codes c'."""

    def __init__(self, width: int) -> None:
        self.width, self.n = width, 0
        self.sums = {k: np.zeros(width) for k in ("active", "other", "c", "c2", "err", "kept")}

    def add(self, c: Tensor, c_other: Tensor) -> None:
        """Codes (tokens, width) of the same tokens, real and intervened."""
        c, c_other = c.double(), c_other.double()
        batch = {
            "active": (c > 0).sum(0),
            "other": (c_other > 0).sum(0),
            "c": c.sum(0),
            "c2": (c * c).sum(0),
            "err": ((c - c_other) ** 2).sum(0),
            "kept": torch.minimum(c, c_other).sum(0),
        }
        for key, value in batch.items():
            self.sums[key] += value.to("cpu", torch.float64).numpy()
        self.n += c.shape[0]

    def table(self, other_active: str, fvu_column: str) -> pl.DataFrame:
        """One row per feature: the columns of the module docstring."""
        sums = self.sums
        variance = sums["c2"] - sums["c"] ** 2 / max(self.n, 1)  # Σ (c − mean c)²
        with np.errstate(divide="ignore", invalid="ignore"):
            fvu = np.where((sums["active"] > 0) & (variance > 0), sums["err"] / variance, np.nan)
            kept = np.where(sums["c"] > 0, sums["kept"] / sums["c"], np.nan)
        return pl.DataFrame(
            {
                "feature": np.arange(self.width, dtype=np.int64),
                "active": sums["active"].astype(np.int64),
                other_active: sums["other"].astype(np.int64),
                "sum_sq_real": sums["c2"],
                "sum_sq_error": sums["err"],
                fvu_column: fvu,
                "kept": kept,
            }
        )


def _check_tokens(tokens: Tensor, min_positions: int, skip: int) -> None:
    if tokens.ndim != 2:
        raise CoactError(f"tokens must be (contexts, positions), got shape {tuple(tokens.shape)}")
    if tokens.shape[1] < min_positions:
        raise CoactError(
            f"contexts of {tokens.shape[1]} positions leave none after skipping the first {skip}"
        )


def _summary(table: pl.DataFrame, fvu_column: str, label: str, threshold: float) -> dict[str, Any]:
    """Alive features, how many of them have `fvu_column` ≤ threshold (as `label`, and its
    percent of the alive ones) and their median fvu."""
    alive = table.filter(pl.col("active") > 0)
    fvu = alive[fvu_column].to_numpy().astype(np.float64)
    finite = fvu[np.isfinite(fvu)]
    count = int((finite <= threshold).sum())
    return {
        "features": table.height,
        "alive": alive.height,
        "threshold": threshold,
        label: count,
        f"percent_{label}": 100.0 * count / alive.height if alive.height else math.nan,
        f"median_{fvu_column}": float(np.median(finite)) if len(finite) else math.nan,
    }
