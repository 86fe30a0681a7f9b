"""The layer page's connector sections: each family's held-out loss, the α sweep and its
Pareto frontier, then linearity (d per feature and the linear share at each τ). The share
table and the family chart serve attention's section too."""

from __future__ import annotations

from coact.block.positions import PositionShare
from coact.connectors.stage import ConnectResult
from coact.linearity.table import LinearShare
from coact.report.charts import connect as connect_charts
from coact.report.embed import Figures
from coact.report.markdown import md_table, note, num
from coact.rundir.read import RunData


def family_losses(c: ConnectResult) -> list[tuple[str, float]]:
    """The held-out NMSE of each connector family a connect stage fitted."""
    return [
        ("sparse linear (chosen α)", c.heldout_nmse_sparse),
        ("least squares (no L1)", c.heldout_nmse_linear),
        ("mlp (no L1)", c.heldout_nmse_mlp),
    ]


def share_row(name: str, s: LinearShare | PositionShare) -> list[str]:
    """A share table's row: the counts, the percent and its bracket beyond d's noise."""
    if isinstance(s, PositionShare):
        counts = (s.same_position, s.needs_context)
        percent, low, high = (
            s.percent_same_position,
            s.percent_same_position_confident,
            s.percent_same_position_possible,
        )
    else:
        counts = (s.linear, s.nonlinear)
        percent, low, high = s.percent_linear, s.percent_linear_confident, s.percent_linear_possible
    bracket = "–" if low is None else f"{low:.1f}% – {high:.1f}%"
    return [name, *(num(n) for n in (*counts, s.dead, s.alive)), f"{percent:.1f}%", bracket]


def connectors_section(data: RunData, fig: Figures) -> list[str]:
    """The MLP's connectors: the mlp's training curve, the α sweep, each family's loss and
    the Pareto frontier the α is chosen on."""
    out = ["## Connectors: loss per family", ""]
    c = data.connect
    if c is None:
        return [*out, note("Connectors were not fitted: `coact connect RUN` fits them."), ""]
    held = c.tokens_heldout
    if data.mlp_curve is not None and data.mlp_curve.height:
        out.append(
            fig.figure(
                connect_charts.mlp_curve(data.mlp_curve, c.tokens_train),
                "mlp-curve",
                "Read: the validation loss should level off where training stopped; a gap "
                "that widens means the mlp overfits, a curve still falling means more epochs "
                "would add to d.",
            )
        )
    if data.sweep is not None and data.sweep.height:
        out.append(
            fig.figure(
                connect_charts.lasso_path(data.sweep, held),
                "lasso-path",
                "Read: held-out loss falls as α shrinks and more weights join; where it stops "
                "falling, more weights only fit noise.",
            )
        )
    families = family_losses(c)
    if data.hidden is not None and "connector_heldout_nmse" in data.hidden.columns:
        families.append(("sae-connector", float(data.hidden["connector_heldout_nmse"][0])))
    out += [
        fig.figure(
            connect_charts.family_losses(families, held),
            "families",
            "Read: the gap between least squares and the mlp is what nonlinearity adds on "
            "average; the sparse connector trades loss for a few readable weights.",
        ),
        "",
        "## Choosing α: the Pareto frontier",
        "",
    ]
    if data.sweep is not None and data.sweep.height:
        out += [
            fig.figure(
                connect_charts.pareto(data.sweep, held),
                "pareto",
                "Read: points on the grey frontier are the best trade-offs; the diamond (the "
                "elbow) is where more weight stops buying much lower loss.",
            ),
            "",
        ]
    return out


def linearity_section(data: RunData, fig: Figures) -> list[str]:
    """d per output feature against each τ, and the linear share at the connect stage's,
    the calibrated and the seed study's τ."""
    out = ["## Linearity: what the mlp adds per feature", ""]
    c, f = data.connect, data.features
    if c is None or f is None:
        return [*out, note("No linearity table: `coact connect RUN` makes it."), ""]
    form = c.form
    taus: dict[str, float] = {f"τ = {c.tau:g} (connect)": c.tau}
    tau_cal, form_cal = data.tau()
    if tau_cal is not None and form_cal == form:
        taus[f"τ = {tau_cal:.3g} (calibrated)"] = tau_cal
    out.append(
        fig.figure(
            connect_charts.d_distribution(f, form, taus, c.tokens_heldout),
            "d-distribution",
            "Read: features left of a dashed τ are linear at that τ; colour shows whether d's "
            "95% interval lies wholly below τ (linear), above it (nonlinear) or across it.",
        )
    )
    out += ["", "The linear share of alive output features at each threshold:", ""]
    rows = [share_row(f"{c.tau:g} ({form}, connect stage)", c.share)]
    if data.calibrate is not None:
        k = data.calibrate
        rows.append(share_row(f"{k.tau:.3g} ({k.form}, calibrated)", k.linear_calibrated))
        connect_is_seed = abs(c.tau - 0.001) < 1e-12 and form == "seed"
        if not connect_is_seed:
            rows.append(share_row("0.001 (seed, the seed study's)", k.linear_seed_tau))
    headers = ["τ (form)", "linear", "nonlinear", "dead", "alive", "% linear"]
    out += [
        md_table([*headers, "% linear beyond noise (at least – at most)"], rows),
        "",
        "The seed study (Pythia-70m-deduped, 3072-feature SAEs, τ = 0.001) found 78.8 / 95.9 / "
        "97.8 / 98.0 / 98.9% linear for MLP layers 1–5; other models and SAEs need not match.",
        "",
    ]
    return out
