"""`calibrate`: how much error can a feature carry before the model's own loss notices?

Two measurements at the output site of one layer's connectors (the MLP's output by
default; attention's output for the attention connectors), on contexts the connectors
never trained on (their held-out contexts):

1. Noise injection: isotropic Gaussian noise, and noise along the output SAE's decoder
   directions of the active features, at a range of normalised MSEs; ΔCE and KL per
   strength (`noise.parquet`).
2. Splicing: the output site replaced by the output SAE's reconstruction, by the decoded
   prediction of the linear connector (least squares), of the mlp connector, of a mix
   (linear for features whose d(j) ≤ τ, mlp for the rest) at candidate thresholds τ, and
   by zero (`splices.parquet`).

The calibrated τ is the largest candidate whose extra ΔCE over the all-mlp splice (paired
by context) stays ≤ ε, for it and every smaller candidate. The linearity table is then
relabelled at that τ with the seed's 0.001 beside it (`linearity.parquet`), and a sample of
strong MLP connections is checked causally (`causal.parquet`, see `coact.calibrate.causal`).
Whether τ is powered (the site's total effect, ε as a share of it, the half-width of the
extra ΔCE at τ, with held-out contexts added until it is ≤ ε/2) is measured last, see
`coact.calibrate.power`. The headline (`CalibrateResult`) lands in `calibrate.json`,
written last. The report draws the curves.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from coact.calibrate.causal import CausalSummary
from coact.calibrate.intervene import SplicedLogits, SpliceLosses, splice_losses, splice_summary
from coact.calibrate.noise import NOISE_KINDS, activation_variance, noise_curve
from coact.calibrate.power import (
    CalibrationPower,
    PairedLosses,
    add_until_powered,
    epsilon_share,
    paired_losses,
)
from coact.connectors.families import SparseBatch, SparseConnector
from coact.connectors.stage import ConnectResult
from coact.errors import CoactError
from coact.linearity.fits import load_linearity_connectors
from coact.linearity.table import (
    SEED_TAU,
    Form,
    LinearityConfig,
    LinearShare,
    percent_linear,
    relabel,
)
from coact.models.load import LoadedModel
from coact.models.sites import SitePair
from coact.models.tracing import capture, spliced_logits
from coact.rundir.files import atomic_write
from coact.rundir.layout import CalibrateFiles, ConnectFiles
from coact.rundir.results import Result, Timings, pair_head, result_key
from coact.sae.base import SparseAutoencoder
from coact.settings import check_ranges, setting

Splice = Callable[[Tensor], Tensor]  # the out site's activation → its replacement
_COLUMN = {"raw": "d", "fvu": "d_fvu", "seed": "d_seed"}
RESULT_VERSION = 4  # bumped when what calibrate writes changes: older results are redone


@dataclass(frozen=True)
class CalibrateConfig:
    # calibration contexts, from the connectors' held-out ones (each costs a full forward
    # pass per strength and per splice: raise it on a GPU)
    contexts: int = setting(16, "held-out contexts to measure on", low=1)
    # τ's power: held-out contexts past `contexts` are added, batch_size at a time, until
    # the extra ΔCE's 95 % half-width at τ is ≤ ε/2 (two forward passes per context)
    max_contexts: int = setting(
        64, "cap on held-out contexts used to power τ (half-width ≤ ε/2)", low=1
    )
    batch_size: int = 8
    strengths: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
    noise_kinds: tuple[str, ...] = ("isotropic", "sae")
    n_taus: int = 6  # candidate thresholds: quantiles of d over the alive features
    tolerance: float = setting(
        0.01, "ε: extra ΔCE over the mlp splice allowed, nats per token", low=0, low_open=True
    )
    form: Form = setting("seed", "form of d(j) τ applies to: raw, fvu or seed")
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    skip_first_positions: int = 1  # BOS: never encoded, never spliced
    causal: bool = setting(True, "the causal check of strong connections")
    causal_connections: int = 200  # judged ones set the three-way agreement's power
    progress: bool = True

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True, kw_only=True)
class SpliceFigures(Result):
    """One splice's cost: ΔCE over the clean model with its 95 % interval, KL, CE
    recovered (against zero ablation) and the spliced CE, in nats per token."""

    delta_ce: float
    delta_ce_low: float
    delta_ce_high: float
    kl: float
    ce_recovered: float
    ce_spliced: float


@dataclass(frozen=True, kw_only=True)
class CalibrateResult(Result):
    """The calibrated τ, the splices it rests on, the linear shares at it and at the
    seed's τ, and the causal check of strong connections (MLP pairs only)."""

    key: str
    in_site: str
    out_site: str
    directory: str
    config: CalibrateConfig
    tau: float
    tolerance: float
    form: Form
    n_contexts: int
    n_tokens: int
    ce_clean: float
    splices: dict[str, SpliceFigures]  # sae, linear, mlp, zero
    linear_calibrated: LinearShare
    linear_seed_tau: LinearShare
    causal: CausalSummary | None
    reference_variance: float
    timings: dict[str, float]
    power: CalibrationPower | None = None  # None in results written before it was measured


def candidate_taus(d: np.ndarray, n_taus: int) -> np.ndarray:
    """Ascending thresholds: one under every d (all features use the mlp), the quantiles
    of d in between, the largest d (all linear), and the seed's 0.001 if in range."""
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return np.array([SEED_TAU])
    below = d.min() - max(abs(d.min()), 1e-12) * 1e-6
    grid = np.quantile(d, np.linspace(0, 1, n_taus + 1))
    taus = np.concatenate([[below], grid, [SEED_TAU] if d.min() <= SEED_TAU <= d.max() else []])
    return np.unique(taus)


def pick_tau(taus: np.ndarray, extra_ce: np.ndarray, tolerance: float) -> float:
    """The largest τ whose extra ΔCE, and that of every smaller τ, is ≤ tolerance."""
    order = np.argsort(taus)
    ok = np.cumprod(extra_ce[order] <= tolerance).astype(bool)
    if not ok.any():
        return float(taus[order][0])
    return float(taus[order][np.flatnonzero(ok).max()])


@contextmanager
def forward_clock(lm: LoadedModel) -> Iterator[list[float]]:
    """Seconds spent inside the model's forward passes (hooks on the root module); a pass
    stopped early by nnsight is counted up to its stop via the next pass or the exit."""
    total = [0.0]
    started: list[float] = []

    def pre(*_: Any) -> None:
        if started:  # the previous pass stopped early: count it up to now
            total[0] += time.perf_counter() - started.pop()
        started.append(time.perf_counter())

    def post(*_: Any) -> None:
        if started:
            total[0] += time.perf_counter() - started.pop()

    handles = [
        lm.model.register_forward_pre_hook(pre),
        lm.model.register_forward_hook(post),
    ]
    try:
        yield total
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Predictor:
    """Decoded connector predictions for one batch, computed once, mixed per τ."""

    linear: Tensor  # batch × seq × n_out codes
    mlp: Tensor


def _predict(
    codes: Tensor, connectors: list[tuple[np.ndarray, SparseConnector]], n_out: int
) -> _Predictor:
    rows = codes.reshape(-1, codes.shape[-1]).float()
    flat = _sparse_rows(rows)
    linear = torch.zeros(rows.shape[0], n_out, device=codes.device)  # decoded on that device
    mlp = torch.zeros(rows.shape[0], n_out, device=codes.device)
    for outputs, connector in connectors:
        index = torch.as_tensor(outputs, device=codes.device)
        linear[:, index] = connector.skip_prediction(flat).to(codes.device)
        mlp[:, index] = connector(flat).to(codes.device)
    shape = (*codes.shape[:-1], n_out)
    return _Predictor(linear.reshape(shape), mlp.reshape(shape))


def _sparse_rows(dense: Tensor) -> SparseBatch:
    """Row-major (indices, offsets, values) of a dense batch of codes: what connectors read."""
    mask = dense != 0
    offsets = torch.zeros(dense.shape[0] + 1, dtype=torch.long, device=dense.device)
    offsets[1:] = mask.sum(1).cumsum(0)
    return SparseBatch(mask.nonzero()[:, 1], offsets, dense[mask])


def _replace_after(out: Tensor, new: Tensor, skip: int) -> Tensor:
    result = out.clone()
    result[:, skip:] = new[:, skip:].to(out.dtype)
    return result


def calibrate(
    lm: LoadedModel,
    pair: SitePair,
    sae_in: SparseAutoencoder,
    sae_out: SparseAutoencoder,
    tokens: Tensor,
    connect_dir: str | Path,
    out_dir: str | Path,
    config: CalibrateConfig = CalibrateConfig(),
) -> CalibrateResult:
    """Measure noise curves and splices at `pair.out_site`, pick τ, relabel, check
    connections (MLP pairs); write the tables and return (and write) the headline."""
    connected, files = ConnectFiles(Path(connect_dir)), CalibrateFiles(Path(out_dir))
    if not connected.features.is_file():
        raise CoactError(f"no linearity table at {connected.features}; run `coact connect` first")
    features = pl.read_parquet(connected.features)
    connectors = load_linearity_connectors(connected.connectors, str(lm.device))
    skip = config.skip_first_positions
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] <= skip + 1:
        raise CoactError(f"calibration needs a batch of contexts, got {tuple(tokens.shape)}")
    pool = tokens[: max(config.contexts, config.max_contexts)]  # what τ's power may add
    key = _key(lm, pair, sae_in, sae_out, pool, connected, config)
    if (previous := CalibrateResult.finished(files, key)) is not None:
        return previous
    files.path.mkdir(parents=True, exist_ok=True)
    setup = _Setup(
        lm, pair, sae_in, sae_out, pool[: config.contexts], pool, int(tokens.shape[0]),
        connected, features, connectors, config,
    )  # fmt: skip
    tokens = setup.tokens
    measured = _measure(setup)
    calibrated = relabel(features, LinearityConfig(tau=measured.tau, form=config.form))
    seed_labels = relabel(features, LinearityConfig(tau=SEED_TAU, form=config.form))
    table = calibrated.select("feature", "d", "d_fvu", "d_seed", "status", "verdict").with_columns(
        seed_status=seed_labels["status"], seed_verdict=seed_labels["verdict"]
    )
    atomic_write(files.noise, measured.noise.write_parquet)
    atomic_write(files.splices, measured.splices.write_parquet)
    atomic_write(files.linearity, table.write_parquet)
    if measured.causal is not None:
        atomic_write(files.causal, measured.causal.write_parquet)
    result = _result(measured, key, pair, files, config, tokens, calibrated, seed_labels)
    result.write(files.result)
    return result


@dataclass(frozen=True)
class _Setup:
    """What every measurement of one calibration reads."""

    lm: LoadedModel
    pair: SitePair
    sae_in: SparseAutoencoder
    sae_out: SparseAutoencoder
    tokens: Tensor  # the contexts τ is picked on
    pool: Tensor  # those, then the held-out contexts τ's power may add, up to the cap
    available: int  # held-out contexts calibration was handed
    connected: ConnectFiles
    features: pl.DataFrame  # the linearity table
    connectors: list[tuple[np.ndarray, SparseConnector]]  # the fits it rests on
    config: CalibrateConfig


@dataclass
class _Measured:
    """What calibration measured in the model: curves, splices, τ, the causal table."""

    noise: pl.DataFrame
    splices: pl.DataFrame
    tau: float
    variance: float
    causal: pl.DataFrame | None
    power: CalibrationPower
    timings: dict[str, float]


def _measure(setup: _Setup) -> _Measured:
    timings = Timings()
    started = time.perf_counter()
    lm, pair, config = setup.lm, setup.pair, setup.config
    with forward_clock(lm) as forward_s:
        with timings.part("noise"):
            variance = activation_variance(
                lm, setup.tokens, pair.out_site, batch_size=config.batch_size,
                skip_first_positions=config.skip_first_positions,
            )  # fmt: skip
            noise = pl.concat([_noise(setup, variance, kind) for kind in config.noise_kinds])

        with timings.part("splices"):
            table, losses = _splices(setup)
            splices = _with_implied_nmse(
                table, setup.features, setup.sae_out, variance, config.form
            )
        extra = splices.filter(pl.col("tau").is_not_null())
        tau = pick_tau(
            extra["tau"].to_numpy(), extra["extra_delta_ce"].to_numpy(), config.tolerance
        )
        with timings.part("power"):
            power = _power(setup, splices, losses, tau)

        causal_table = None
        if config.causal and pair == SitePair.mlp(pair.out_site.layer):
            with timings.part("causal"):
                causal_table = _causal(setup)
    timings["forward_s"] = forward_s[0]
    timings["total_s"] = time.perf_counter() - started
    return _Measured(noise, splices, tau, variance, causal_table, power, timings)


def _key(
    lm: LoadedModel,
    pair: SitePair,
    sae_in: SparseAutoencoder,
    sae_out: SparseAutoencoder,
    tokens: Tensor,
    connected: ConnectFiles,
    config: CalibrateConfig,
) -> str:
    """What a calibration depends on: model, sites, SAEs, tokens, the connectors' result
    and the config."""
    from coact.codes.collect import sae_fingerprint

    fitted = ConnectResult.read(connected.result)
    inputs = [
        lm.fingerprint(), str(pair.in_site), str(pair.out_site), sae_fingerprint(sae_in),
        sae_fingerprint(sae_out), fitted.key if fitted is not None else "",
        hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest(),
    ]  # fmt: skip
    return result_key(inputs, config, RESULT_VERSION)


def _linear_masks(setup: _Setup, taus: np.ndarray) -> dict[str, Tensor]:
    """Per candidate τ ("tau i"): the output features whose predictions are linear's (the
    dead ones and those with d ≤ τ); the rest take the mlp connector's."""
    features, form = setup.features, setup.config.form
    d = features[_COLUMN[form]].to_numpy().astype(float)
    alive = (features["status"] != "dead").to_numpy()
    return {f"tau {i}": torch.as_tensor(~alive | (d <= t)) for i, t in enumerate(taus)}


def _splicer(setup: _Setup, masks: dict[str, Tensor]) -> SplicedLogits:
    """Per batch: the connectors' predictions decoded once (linear, mlp, and each mask's
    mix), then the logits under any named splice."""
    lm, sae_in, sae_out = setup.lm, setup.sae_in, setup.sae_out
    skip = setup.config.skip_first_positions
    site_in, site_out = setup.pair.in_site, setup.pair.out_site

    def spliced(batch: Tensor) -> Callable[[str], Tensor]:
        stream = capture(lm, batch, [site_in])[site_in]
        predicted = _predict(sae_in.encode(stream), setup.connectors, sae_out.width)
        decoded = {"linear": predicted.linear, "mlp": predicted.mlp}
        decoded.update(
            {
                k: torch.where(m.to(predicted.linear.device), predicted.linear, predicted.mlp)
                for k, m in masks.items()
            }
        )
        decoded = {k: sae_out.decode(v) for k, v in decoded.items()}
        return lambda name: spliced_logits(
            lm, batch, site_out, _splice_fn(name, decoded, sae_out, skip)
        )

    return spliced


def _splices(setup: _Setup) -> tuple[pl.DataFrame, SpliceLosses]:
    """CE and KL of every splice per context, then token-weighted means with intervals;
    the τ rows also carry their extra ΔCE over the all-mlp splice, paired by context."""
    lm, features, config = setup.lm, setup.features, setup.config
    skip = config.skip_first_positions
    d = features[_COLUMN[config.form]].to_numpy().astype(float)
    alive = (features["status"] != "dead").to_numpy()
    taus = candidate_taus(d[alive], config.n_taus)
    masks = _linear_masks(setup, taus)
    names = ["sae", "linear", "mlp", *masks, "zero"]
    losses = splice_losses(
        lm, setup.tokens, names, _splicer(setup, masks), batch_size=config.batch_size,
        skip_first_positions=skip, progress=config.progress,
    )  # fmt: skip
    frame = splice_summary(
        losses, reference="mlp", n_boot=config.n_boot, seed=config.seed, level=config.level
    )
    tau_of = {name: float(t) for name, t in zip(masks, taus, strict=True)}
    linear_count = {name: int(mask.sum()) - int((~alive).sum()) for name, mask in masks.items()}
    frame = frame.insert_column(
        1, pl.Series("tau", [tau_of.get(k) for k in names], dtype=pl.Float64)
    ).insert_column(
        2, pl.Series("features_linear", [linear_count.get(k) for k in names], dtype=pl.Int64)
    )
    return frame, losses


def _power(
    setup: _Setup, splices: pl.DataFrame, losses: SpliceLosses, tau: float
) -> CalibrationPower:
    """The site's total effect and ε's share of it; then the extra ΔCE at the chosen τ
    over the mlp splice, on the calibration contexts and, while its half-width is above
    ε/2, on held-out contexts added a batch at a time (the τ picked stays the one picked)."""
    config = setup.config
    zero = splices.row(by_predicate=pl.col("splice") == "zero", named=True)
    chosen = splices.row(by_predicate=pl.col("tau") == tau, named=True)["splice"]
    mlp, at_tau = losses.ce[:, losses.column("mlp")], losses.ce[:, losses.column(chosen)]
    first = PairedLosses(at_tau - mlp, losses.n_tokens)
    spliced = _splicer(setup, {"tau": _linear_masks(setup, np.array([tau]))["tau 0"]})

    def more(lo: int, hi: int) -> PairedLosses:
        return paired_losses(
            setup.lm, setup.pool[lo:hi], spliced, "tau", "mlp", batch_size=config.batch_size,
            skip_first_positions=config.skip_first_positions,
        )  # fmt: skip

    cap = max(len(first), int(setup.pool.shape[0]))
    target = config.tolerance / 2
    run = add_until_powered(
        first, more, target=target, cap=cap, step=config.batch_size, level=config.level
    )
    total = float(zero["delta_ce"])
    return CalibrationPower(
        total_effect=total,
        epsilon_share=epsilon_share(config.tolerance, total),
        extra_delta_ce=run.extra_delta_ce,
        halfwidth=run.halfwidth,
        target_halfwidth=target,
        n_contexts_used=run.n_contexts,
        n_contexts_cap=cap,
        n_contexts_available=setup.available,
        powered=run.powered,
    )


def _noise(setup: _Setup, variance: float, kind: str) -> pl.DataFrame:
    config = setup.config
    if kind not in NOISE_KINDS:
        raise CoactError(f"unknown noise kind {kind!r}; use one of {NOISE_KINDS}")
    return noise_curve(
        setup.lm, setup.tokens, setup.pair.out_site, config.strengths, kind,
        sae=setup.sae_out, batch_size=config.batch_size, seed=config.seed,
        skip_first_positions=config.skip_first_positions, n_boot=config.n_boot,
        level=config.level, reference_variance=variance,
    )  # fmt: skip


def _splice_fn(
    name: str, decoded: dict[str, Tensor], sae_out: SparseAutoencoder, skip: int
) -> Splice:
    if name == "zero":
        return lambda out: _replace_after(out, torch.zeros_like(out), skip)
    if name == "sae":
        return lambda out: _replace_after(out, sae_out.decode(sae_out.encode(out)), skip)
    return lambda out: _replace_after(out, decoded[name], skip)


def _with_implied_nmse(
    splices: pl.DataFrame,
    features: pl.DataFrame,
    sae_out: SparseAutoencoder,
    variance: float,
    form: Form,
) -> pl.DataFrame:
    """Per τ: Σ over the features it calls linear of d_raw(j)·‖decoder row j‖², over the
    site's variance: the extra normalised MSE that splice adds if feature errors are
    independent. It places each splice on the noise curves' x axis."""
    norms = sae_out.W_dec.detach().float().pow(2).sum(1).cpu().numpy()
    raw = np.maximum(features["d"].to_numpy().astype(float), 0.0)
    in_form = features[_COLUMN[form]].to_numpy().astype(float)
    alive = (features["status"] != "dead").to_numpy()
    implied = [
        None if tau is None else float((raw * norms)[alive & (in_form <= tau)].sum() / variance)
        for tau in splices["tau"].to_list()
    ]
    return splices.with_columns(pl.Series("implied_extra_nmse", implied, dtype=pl.Float64))


def _causal(setup: _Setup) -> pl.DataFrame:
    from coact.calibrate.causal import CausalConfig, causal_check

    config = setup.config
    weights = pl.read_parquet(setup.connected.weights)
    settings = CausalConfig(
        connections=config.causal_connections,
        batch_size=config.batch_size,
        skip_first_positions=config.skip_first_positions,
    )
    return causal_check(
        setup.lm, setup.pair.out_site.layer, setup.sae_in, setup.sae_out, setup.tokens,
        weights, setup.connectors, settings,
    )  # fmt: skip


def _result(
    measured: _Measured,
    key: str,
    pair: SitePair,
    files: CalibrateFiles,
    config: CalibrateConfig,
    tokens: Tensor,
    calibrated: pl.DataFrame,
    seed_labels: pl.DataFrame,
) -> CalibrateResult:
    from coact.calibrate.causal import causal_summary

    rows = {r["splice"]: r for r in measured.splices.iter_rows(named=True)}
    fields = ("delta_ce", "delta_ce_low", "delta_ce_high", "kl", "ce_recovered", "ce_spliced")
    splices = {
        name: SpliceFigures(**{f: rows[name][f] for f in fields})
        for name in ("sae", "linear", "mlp", "zero")
    }
    return CalibrateResult(
        **pair_head(key, pair, files),
        config=config,
        tau=measured.tau,
        tolerance=config.tolerance,
        form=config.form,
        n_contexts=int(tokens.shape[0]),
        n_tokens=int(rows["zero"]["n_tokens"]),
        ce_clean=float(rows["zero"]["ce_clean"]),
        splices=splices,
        linear_calibrated=percent_linear(calibrated),
        linear_seed_tau=percent_linear(seed_labels),
        causal=causal_summary(measured.causal) if measured.causal is not None else None,
        reference_variance=measured.variance,
        timings=measured.timings,
        power=measured.power,
    )


__all__ = ["CalibrateConfig", "CalibrateResult", "calibrate", "candidate_taus", "pick_tau"]
