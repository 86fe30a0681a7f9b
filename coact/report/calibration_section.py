"""The layer page's calibration of τ: what noise of each size costs the model, the τ curve
(every chart drawn here from the calibrate stage's tables), each splice's cost, and the
causal check of strong connections."""

from __future__ import annotations

import polars as pl

from coact.calibrate.power import CalibrationPower
from coact.calibrate.stage import CalibrateResult
from coact.report.charts import calibrate as calibrate_charts
from coact.report.embed import Figures
from coact.report.markdown import md_table, note, num, pct
from coact.rundir.read import RunData


def threshold_figure(
    fig: Figures, splices: pl.DataFrame | None, k: CalibrateResult, name: str
) -> str | None:
    """The τ curve of a calibration (the MLP's or attention's): extra loss per candidate τ
    against ε; None when its splices have no candidate τ."""
    if splices is None or not splices.filter(pl.col("tau").is_not_null()).height:
        return None
    return fig.figure(
        calibrate_charts.threshold_curve(splices, k.tau, k.tolerance),
        name,
        "Read: τ is the rightmost point whose extra loss, and that of every point left of "
        "it, stays under the dashed ε line.",
    )


def calibration_section(data: RunData, fig: Figures) -> list[str]:
    """The noise curves, the τ curve, the splices and the causal check of the MLP's τ."""
    out = ["## Calibration of τ against the model's loss", ""]
    k = data.calibrate
    if k is None:
        return [*out, note("τ was not calibrated: `coact calibrate RUN` measures it."), ""]
    if data.noise is not None and data.noise.height:
        out.append(
            fig.figure(
                calibrate_charts.noise_curves(data.noise, data.out_site),
                "noise",
                "Read: how many nats of next-token loss each size of error costs; if the "
                "SAE-shaped curve lies above the isotropic one, error along feature directions "
                "hurts more.",
            )
        )
    threshold = threshold_figure(fig, data.splices, k, "threshold")
    if threshold is not None:
        out.append(threshold)
    if k.power is not None:
        out += [power_paragraph(k.power, k.n_contexts, k.tolerance), ""]
    if data.splices is not None and data.splices.height:
        out += _splices_part(data.splices, fig)
    if data.causal is not None and data.causal.height:
        out.append(
            fig.figure(
                calibrate_charts.causal(data.causal),
                "causal",
                "Read: points on the diagonal are connections whose formula predicts the model's "
                "own change; points in the wrong quadrant have the wrong sign.",
            )
        )
        if (ca := k.causal) is not None:
            out += [
                "",
                f"Of {ca.judged:,} judged connections (of {ca.connections:,} checked), the "
                f"sign agrees for {pct(ca.share_sign_agrees, 0)}, the size within 2× for "
                f"{pct(ca.share_size_agrees, 0)}, both for {pct(ca.share_both_agree, 0)}.",
            ]
    out.append("")
    return out


def power_paragraph(p: CalibrationPower, n_contexts: int, tolerance: float) -> str:
    """Is τ powered: the site's total effect, ε as a share of it, the extra ΔCE's
    half-width at τ against ε/2, in words."""
    if p.epsilon_share == p.epsilon_share:  # not NaN
        share = f"ε = {tolerance:g} nats is {pct(p.epsilon_share)} of it"
        if p.epsilon_share >= 1:
            share += ", as much as zeroing it costs: ε rules out no splice"
    else:
        share = f"zeroing it does not raise the loss, so ε = {tolerance:g} nats is no share of it"
    verdict = (
        f"The half-width is within ε/2 = {p.target_halfwidth:.4g}: τ is powered."
        if p.powered
        else f"τ is underpowered: {p.shortfall()}."
    )
    return (
        f"**Power.** Zeroing the site costs {p.total_effect:+.4f} nats per token (its total "
        f"effect, on the {n_contexts} calibration contexts); {share}. At τ the extra ΔCE over "
        f"the mlp splice is {p.extra_delta_ce:+.3g} ± {p.halfwidth:.3g} nats (95 % t-interval "
        f"over {p.n_contexts_used} contexts, paired by context; contexts are added until the "
        f"half-width is ≤ ε/2, up to {p.n_contexts_cap}). {verdict}"
    )


def _splices_part(splices: pl.DataFrame, fig: Figures) -> list[str]:
    """The splices' chart and table: each one's CE, ΔCE with its interval, KL, CE recovered."""
    named = splices.filter(pl.col("tau").is_null())
    rows = [
        [
            r["splice"],
            num(r["ce_spliced"], ".4f"),
            f"{r['delta_ce']:+.4f} [{r['delta_ce_low']:+.4f}, {r['delta_ce_high']:+.4f}]",
            num(r["kl"], ".4f"),
            pct(r["ce_recovered"]),
            num(r["n_tokens"]),
        ]
        for r in named.iter_rows(named=True)
    ]
    headers = ["splice", "CE spliced (nats)", "ΔCE (nats, 95% interval)", "KL (nats)"]
    return [
        fig.figure(
            calibrate_charts.splices(splices),
            "splices",
            "Read: a splice near zero costs the model nothing; compare linear and mlp with "
            "the SAE's own reconstruction (the floor) and with zero ablation (the ceiling).",
        ),
        "",
        md_table([*headers, "CE recovered", "tokens"], rows),
        "",
    ]
