"""Is the calibrated τ powered? The interval of the extra loss τ was picked on, and the rule
that adds contexts until it is tight enough to tell ε apart from zero.

The figure τ rests on is the paired extra ΔCE at τ over the all-mlp splice: per context,
CE summed under the τ splice minus CE summed under the mlp splice (the same contexts under
both), over the predicted positions summed. Its 95 % half-width is a t-interval over
contexts, the unit sampled independently (tokens of one context are correlated), of that
token-weighted mean: the ratio estimate Σ extra / Σ n linearised, which is the plain
t-interval of per-context means when every context has the same length, as in
calibration. Contexts are added in batches until the half-width is ≤ ε/2, or a cap is
reached and τ is flagged underpowered.

Where the added contexts come from: the rest of the connectors' held-out contexts, past
the first `contexts` that τ was picked on (the pipeline hands calibration all of them:
`heldout_fraction` of the stored contexts, about 79 at the default 100k tokens). They are
already tokenized, no connector was fitted on them, and they are drawn from the corpus
exactly as the first ones were; fresh contexts past the stored ones would mean reading
and tokenizing the corpus again inside a stage. So the cap is min(`max_contexts`, the
held-out contexts); when the held-out set is the tighter one, the result says so (store
more codes, `--tokens`, to hold out more).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from coact.calibrate.intervene import SplicedLogits
from coact.calibrate.losses import context_losses
from coact.models.load import LoadedModel


@dataclass(frozen=True)
class PairedLosses:
    """Per context: the extra CE (nats, summed over predicted positions) of one splice over
    a reference splice, and the predicted positions summed over."""

    extra: np.ndarray  # (contexts,) float64
    n_tokens: np.ndarray  # (contexts,) int64

    def __len__(self) -> int:
        return len(self.extra)

    def joined(self, more: PairedLosses) -> PairedLosses:
        return PairedLosses(
            np.concatenate([self.extra, more.extra]), np.concatenate([self.n_tokens, more.n_tokens])
        )


def paired_interval(paired: PairedLosses, level: float = 0.95) -> tuple[float, float]:
    """(Σ extra / Σ n, its t half-width over contexts); the half-width is inf under two
    contexts. The standard error is that of a ratio estimate: the spread of the residuals
    extra_c − mean·n_c over contexts, over √C and the mean context length."""
    extra = np.asarray(paired.extra, dtype=np.float64)
    n = np.asarray(paired.n_tokens, dtype=np.float64)
    contexts = len(extra)
    point = float(extra.sum() / n.sum())
    if contexts < 2:
        return point, math.inf
    residual = extra - point * n
    se = math.sqrt(float((residual**2).sum()) / (contexts - 1) / contexts) / float(n.mean())
    return point, float(stats.t.ppf(0.5 + level / 2, contexts - 1)) * se


@dataclass(frozen=True)
class PowerRun:
    """Where the rule stopped: the extra ΔCE and its half-width over the contexts used."""

    extra_delta_ce: float
    halfwidth: float
    n_contexts: int
    batches_added: int
    powered: bool


def add_until_powered(
    first: PairedLosses,
    more: Callable[[int, int], PairedLosses],
    *,
    target: float,
    cap: int,
    step: int,
    level: float = 0.95,
) -> PowerRun:
    """Add contexts [used, used + step) through `more` until the half-width is ≤ target or
    `cap` contexts are used (the last batch may be smaller); powered when it got there."""
    if step < 1:
        raise ValueError(f"step must be ≥ 1, got {step}")
    paired, batches = first, 0
    point, halfwidth = paired_interval(paired, level)
    while halfwidth > target and len(paired) < cap:
        used = len(paired)
        paired = paired.joined(more(used, min(used + step, cap)))
        batches += 1
        point, halfwidth = paired_interval(paired, level)
    return PowerRun(point, halfwidth, len(paired), batches, bool(halfwidth <= target))


@torch.no_grad()
def paired_losses(
    lm: LoadedModel,
    tokens: Tensor,
    spliced: SplicedLogits,
    name: str,
    reference: str,
    *,
    batch_size: int = 8,
    skip_first_positions: int = 1,
) -> PairedLosses:
    """Per context of `tokens`: CE under splice `name` minus CE under `reference` (no clean
    pass: the difference needs none)."""
    extra, n_tokens = [], []
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(lm.device)
        logits_of = spliced(batch)
        under = context_losses(logits_of(name), batch, skip_first_positions)
        base = context_losses(logits_of(reference), batch, skip_first_positions)
        extra.append(under.ce - base.ce)
        n_tokens.append(under.n_tokens)
    return PairedLosses(np.concatenate(extra), np.concatenate(n_tokens))


@dataclass(frozen=True)
class CalibrationPower:
    """Is τ powered: the site's total effect (zero-ablation ΔCE on the calibration
    contexts) and ε as a share of it; the paired extra ΔCE at τ over the mlp splice with
    its 95 % half-width over the contexts used, against the target ε/2; the contexts used,
    the cap and the held-out contexts there were (all in nats per token)."""

    total_effect: float
    epsilon_share: float  # ε / total effect (NaN when zeroing the site costs nothing)
    extra_delta_ce: float
    halfwidth: float
    target_halfwidth: float  # ε/2
    n_contexts_used: int
    n_contexts_cap: int  # min(max_contexts, held-out contexts), never under `contexts`
    n_contexts_available: int  # held-out contexts calibration was handed
    powered: bool

    def shortfall(self) -> str | None:
        """Why τ is underpowered, in words; None when it is powered."""
        if self.powered:
            return None
        limit = (
            f"all {self.n_contexts_available} held-out contexts (store more codes, --tokens, "
            "to hold out more)"
            if self.n_contexts_cap >= self.n_contexts_available
            else f"the cap of {self.n_contexts_cap} contexts (max_contexts)"
        )
        return (
            f"the 95% half-width of the extra ΔCE, ±{self.halfwidth:.4f} nats, stays above "
            f"ε/2 = {self.target_halfwidth:.4f} after {limit}"
        )


def epsilon_share(tolerance: float, total_effect: float) -> float:
    """ε over the site's total effect; NaN when the total effect is not positive."""
    return tolerance / total_effect if total_effect > 0 else math.nan


__all__ = [
    "CalibrationPower",
    "PairedLosses",
    "PowerRun",
    "add_until_powered",
    "epsilon_share",
    "paired_interval",
    "paired_losses",
]
