"""Headlines beside the control's: each figure of a run measured again on the same
architecture with re-initialised weights (`coact.pipeline.control`), and the rule that marks
one uninformative: its value lies inside the control's interval, or, where the control has
no interval, reads the same within a stated relative tolerance. A headline a random network
reproduces says nothing about the trained one."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from coact.calibrate.causal import CausalSummary
from coact.calibrate.stage import CalibrateResult
from coact.connectors.stage import ConnectResult
from coact.jacobian.stage import JacobianResult
from coact.linearity.table import SEED_TAU, LinearityConfig, LinearShare, percent_linear, relabel
from coact.logic.stage import LogicResult
from coact.rundir.results import Result

Z95 = 1.959964  # two-sided 95 % normal quantile of the Wilson interval
NMSE_TOLERANCE = 0.05  # connector NMSE / FVU: relative difference within which two read the same
NOISE_FLOOR = "the control's share beyond d's noise floor (95 % bootstrap over contexts)"
WILSON = "Wilson 95 % interval of the control's proportion"
FISHER = "95 % interval of the control's Spearman ρ (Fisher z, variance 1.06 / (n − 3))"
# the agreement of strong connections the jacobian stage adds: its shares and correlations
AGREEMENT_SHARES = {
    "jacobian_sign": "Jacobian's sign agrees with the ablation",
    "jacobian_size": "Jacobian's size within 2× of the ablation",
    "weight_jacobian_sign": "connector weight's sign agrees with the mean Jacobian",
    "weight_jacobian_size": "connector weight within 2× of the mean Jacobian",
}
AGREEMENT_RANKS = {
    "jacobian_spearman": "Spearman ρ of the Jacobian's prediction and the ablation",
    "weight_jacobian_spearman": "Spearman ρ of connector weight and mean Jacobian",
}


@dataclass(frozen=True, kw_only=True)
class HeadlineVsControl(Result):
    """One headline: the run's value, the control's, the control's interval (or the relative
    tolerance used where it has none) and whether the value stands apart from the control."""

    label: str  # what the figure is, in words
    unit: str  # "%" or "" (a ratio such as an NMSE)
    value: float  # the run's
    control: float  # the control's
    control_low: float | None  # the control's interval (None: judged by `tolerance`)
    control_high: float | None
    tolerance: float | None  # relative, where the control has no interval
    basis: str  # what the interval (or tolerance) is
    informative: bool  # False: the value lies inside the control's interval / tolerance


@dataclass(frozen=True, kw_only=True)
class ControlSummary(Result):
    """The control run of a layer (`<run>/control/`, an ordinary run directory): where it
    is, how its model was made, its own headline results and, per figure, the run's value
    beside the control's. The control's share at the calibrated τ is read at the run's own
    calibrated τ (`tau`, `form`): the control runs no calibration of its own."""

    run_dir: str
    model: str  # the re-initialised model's name
    seed: int  # the re-initialisation's seed
    stages: list[str]  # the stages the control ran
    reused: bool  # a finished control read back, not rerun
    tau: float | None  # the run's calibrated τ the control's share is read at
    form: str | None
    connect: ConnectResult | None = None
    logic: LogicResult | None = None
    jacobian: JacobianResult | None = None
    causal: CausalSummary | None = None  # the control's causal check (the run's settings)
    figures: dict[str, HeadlineVsControl]
    timings: dict[str, float]  # the control run's own (SAE training, collection, stages)

    @property
    def uninformative(self) -> list[str]:
        """Names of the figures the control reproduces."""
        return [name for name, f in self.figures.items() if not f.informative]


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / n (NaN for n = 0)."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at 0 and n the bound is exactly 0 or 1 (rounding would move it off)
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    return low, 1.0 if successes >= n else min(1.0, centre + half)


def spearman_interval(rho: float, n: int, z: float = Z95) -> tuple[float, float]:
    """A 95 % interval of Spearman's ρ over n pairs: Fisher's z with the variance
    1.06 / (n − 3) of Fieller, Hartley and Pearson (NaN for n ≤ 3 or |ρ| = 1)."""
    if n <= 3 or not abs(rho) < 1:
        return math.nan, math.nan
    centre, half = math.atanh(rho), z * math.sqrt(1.06 / (n - 3))
    return math.tanh(centre - half), math.tanh(centre + half)


def judge(
    value: float,
    control: float,
    low: float | None = None,
    high: float | None = None,
    tolerance: float = NMSE_TOLERANCE,
) -> bool:
    """Informative (True) unless `value` lies inside the control's [low, high], or, without
    an interval, differs from the control by at most `tolerance` of the larger magnitude."""
    if low is not None and high is not None:
        slack = 1e-9 * max(1.0, abs(low), abs(high))  # a bound computed two ways may differ
        return not low - slack <= value <= high + slack
    return abs(value - control) > tolerance * max(abs(value), abs(control))


def _figure(
    label: str, value: float, control: float, interval: tuple[float, float] | None, basis: str,
    unit: str = "%",
) -> HeadlineVsControl:  # fmt: skip
    """A figure judged by the control's interval, or by the tolerance when it has none."""
    low, high = interval if interval is not None else (None, None)
    return HeadlineVsControl(
        label=label, unit=unit, value=value, control=control, control_low=low, control_high=high,
        tolerance=None if interval is not None else NMSE_TOLERANCE, basis=basis,
        informative=judge(value, control, low, high),
    )  # fmt: skip


def share_figure(label: str, value: LinearShare, control: LinearShare) -> HeadlineVsControl:
    """Percent linear: inside the control's bracket beyond d's noise floor (its Wilson
    interval where the table has no noise floor) is uninformative."""
    low, high = control.percent_linear_confident, control.percent_linear_possible
    if low is not None and high is not None:
        return _figure(
            label, value.percent_linear, control.percent_linear, (low, high), NOISE_FLOOR
        )
    lo, hi = wilson(control.linear, control.alive)
    interval = (100 * lo, 100 * hi)
    return _figure(label, value.percent_linear, control.percent_linear, interval, WILSON)


def share_at(features: Path, tau: float, form: str) -> LinearShare:
    """A connect stage's linear share read again at another τ (no refitting)."""
    table = pl.read_parquet(features)
    return percent_linear(relabel(table, LinearityConfig(tau=tau, form=form)))  # type: ignore[arg-type]


def linearity_figures(
    features: Path, control_features: Path, calibrated: CalibrateResult | None
) -> dict[str, HeadlineVsControl]:
    """The linear share at the seed's τ and, with a calibration, at the run's calibrated τ
    (the control's table read at that same τ)."""
    seed = (SEED_TAU, "seed")
    at_seed = share_figure(
        f"linear share at the seed's τ = {SEED_TAU:g} (of alive features)",
        share_at(features, *seed), share_at(control_features, *seed),
    )  # fmt: skip
    out = {"linear_share_seed_tau": at_seed}
    if calibrated is not None:
        at = (calibrated.tau, calibrated.form)
        out["linear_share_calibrated_tau"] = share_figure(
            f"linear share at the calibrated τ = {calibrated.tau:.3g} (of alive features)",
            calibrated.linear_calibrated, share_at(control_features, *at),
        )  # fmt: skip
    return out


def connector_figures(real: ConnectResult, control: ConnectResult) -> dict[str, HeadlineVsControl]:
    """Held-out NMSE (= FVU) of the sparse connector, least squares and the mlp."""
    basis = f"relative tolerance {100 * NMSE_TOLERANCE:g} %"
    fits = {
        "nmse_sparse": ("sparse connector", real.heldout_nmse_sparse, control.heldout_nmse_sparse),
        "nmse_linear": ("least-squares fit", real.heldout_nmse_linear, control.heldout_nmse_linear),
        "nmse_mlp": ("mlp fit", real.heldout_nmse_mlp, control.heldout_nmse_mlp),
    }
    return {
        f"connector_{key}": _figure(
            f"held-out NMSE (FVU) of the {name}", value, other, None, basis, unit=""
        )
        for key, (name, value, other) in fits.items()
        if math.isfinite(value) and math.isfinite(other)
    }


def label_figures(real: LogicResult, control: LogicResult) -> dict[str, HeadlineVsControl]:
    """Per label class, its share of alive output features (DEAD ones aside), judged
    against the Wilson interval of the control's share."""
    alive = {k: v for k, v in real.counts.items() if k != "DEAD"}
    control_alive = {k: v for k, v in control.counts.items() if k != "DEAD"}
    n, m = sum(alive.values()), sum(control_alive.values())
    if not n or not m:
        return {}
    out = {}
    for label, count in alive.items():
        k = control_alive.get(label, 0)
        lo, hi = wilson(k, m)
        out[f"labels_{label}"] = _figure(
            f"{label} labels (of alive features)",
            100 * count / n, 100 * k / m, (100 * lo, 100 * hi), WILSON,
        )  # fmt: skip
    return out


def causal_figures(real: CausalSummary, control: CausalSummary) -> dict[str, HeadlineVsControl]:
    """The causal check's agreement shares (percent of judged connections)."""
    if not real.judged or not control.judged:
        return {}
    shares = {
        "sign": (real.share_sign_agrees, control.share_sign_agrees),
        "size": (real.share_size_agrees, control.share_size_agrees),
        "both": (real.share_both_agree, control.share_both_agree),
    }
    words = {"sign": "sign agrees", "size": "size within 2×", "both": "sign and size agree"}
    out = {}
    for key, (value, other) in shares.items():
        lo, hi = wilson(round(other * control.judged), control.judged)
        out[f"causal_{key}"] = _figure(
            f"causal check: {words[key]} (of judged strong connections)",
            100 * value, 100 * other, (100 * lo, 100 * hi), WILSON,
        )  # fmt: skip
    return out


def jacobian_figures(real: JacobianResult, control: JacobianResult) -> dict[str, HeadlineVsControl]:
    """The jacobian stage's linearity score (the share of scored features it calls linear,
    the median nonlinearity) and its agreement of strong connections."""
    out: dict[str, HeadlineVsControl] = {}
    n = control.features_scored
    if real.features_scored and n:
        lo, hi = wilson(round(control.share_linear * n), n)
        out["jacobian_share_linear"] = _figure(
            "Jacobian linearity score: features linear (of scored features)",
            100 * real.share_linear, 100 * control.share_linear, (100 * lo, 100 * hi), WILSON,
        )  # fmt: skip
    medians = (real.median_nonlinearity, control.median_nonlinearity)
    if all(math.isfinite(v) for v in medians):
        basis = f"relative tolerance {100 * NMSE_TOLERANCE:g} %"
        out["jacobian_median_nonlinearity"] = _figure(
            "Jacobian linearity score: median nonlinearity", *medians, None, basis, unit=""
        )
    if real.agreement is not None and control.agreement is not None:
        out |= _agreement_figures(real, control)
    return out


def _agreement_figures(
    real: JacobianResult, control: JacobianResult
) -> dict[str, HeadlineVsControl]:
    """Agreement shares (Wilson) and rank correlations (Fisher z) of strong connections."""
    a, b = real.agreement, control.agreement
    assert a is not None and b is not None
    out: dict[str, HeadlineVsControl] = {}
    if not a.judged or not b.judged:
        return out
    for name, words in AGREEMENT_SHARES.items():
        value, other = getattr(a, name), getattr(b, name)
        if math.isfinite(value) and math.isfinite(other):
            lo, hi = wilson(round(other * b.judged), b.judged)
            out[f"agreement_{name}"] = _figure(
                f"{words} (of judged strong connections)", 100 * value, 100 * other,
                (100 * lo, 100 * hi), WILSON,
            )  # fmt: skip
    for name, words in AGREEMENT_RANKS.items():
        value, other = getattr(a, name), getattr(b, name)
        interval = spearman_interval(other, b.judged)
        if math.isfinite(value) and all(math.isfinite(v) for v in interval):
            out[f"agreement_{name}"] = _figure(words, value, other, interval, FISHER, unit="")
    return out
