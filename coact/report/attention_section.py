"""The layer page's attention section (block runs): attention's own τ, its connectors'
loss and linearity at that τ, the share of features that need no earlier position, and the
causal check of whether attention uses earlier tokens."""

from __future__ import annotations

from coact.report.calibration_section import threshold_figure
from coact.report.charts import block as block_charts
from coact.report.charts import connect as connect_charts
from coact.report.connectors_section import family_losses, share_row
from coact.report.embed import Figures
from coact.report.evidence import TokenText
from coact.report.markdown import md_table, note
from coact.report.positions_section import positions_part
from coact.report.select import attention_reading, attention_share
from coact.rundir.read import RunData


def attention_where(data: RunData) -> tuple[float, str, str]:
    """(τ, form, where it comes from) that attention's shares are read at."""
    tau, form = attention_reading(data)
    if data.attention_calibration is not None:
        return tau, form, f"calibrated at {data.attn_out_site}"
    cal, _ = data.tau()
    same = cal is not None and abs(cal - tau) <= 1e-12 * max(1, tau)
    return tau, form, "the MLP's calibrated τ" if same else "set"


def attention_section(data: RunData, fig: Figures, token_text: TokenText) -> list[str]:
    """Attention of the block: its connectors' loss and linearity at attention's own τ, and
    how much its features need earlier positions."""
    out = ["## Attention", ""]
    if data.attention is None and data.positions is None:
        return [*out, note("Attention was not analysed: `coact analyze --block` does it."), ""]
    tau, form, where = attention_where(data)
    out += [
        f"Attention of block {data.layer} reads `{data.attn_in_site}` and writes "
        f"`{data.attn_out_site}`. The same connectors as the MLP's, fitted on the same tokens "
        f"(same position: the features at token t from those at t), and read at τ = "
        f"{tau:.3g} ({form} form, {where}). Attention also reads earlier positions: the "
        "position score below says how much they add.",
        "",
    ]
    out += _attention_threshold(data, fig)
    out += _connector_charts(data, fig, tau, form, where)
    out += _shares_table(data, tau, form)
    if data.positions is not None and data.positions_table is not None:
        out += positions_part(data, fig, token_text, tau, form)
    out += _causal_part(data, fig)
    return out


def _attention_threshold(data: RunData, fig: Figures) -> list[str]:
    """Attention's own calibration: its τ curve, as the MLP's section draws the MLP's."""
    k = data.attention_calibration
    if k is None:
        return []
    chart = threshold_figure(fig, data.attention_splices, k, "attention-threshold")
    if chart is None:
        return []
    line = (
        f"Attention's τ = {k.tau:.3g} is calibrated like the MLP's, at "
        f"`{data.attn_out_site}`: the largest threshold whose splice (least squares for the "
        f"features under it, the mlp for the rest) costs at most ε = {k.tolerance:g} "
        f"nats per token more than the all-mlp splice, on {k.n_tokens:,} tokens of "
        f"{k.n_contexts} held-out contexts."
    )
    return [line, "", chart, ""]


def _connector_charts(data: RunData, fig: Figures, tau: float, form: str, where: str) -> list[str]:
    """The attention connectors' family losses and d per feature at attention's τ."""
    a = data.attention
    if a is None:
        return []
    held = a.tokens_heldout
    out = [
        fig.figure(
            connect_charts.family_losses(family_losses(a), held, "Attention connector families"),
            "attention-families",
            "Read: how much of each attention feature the same-position features explain; "
            "the gap between least squares and the mlp is what nonlinearity adds, and a "
            "loss near 1 means the feature depends on other positions or on nothing here.",
        )
    ]
    if data.attention_features is not None:
        out.append(
            fig.figure(
                connect_charts.d_distribution(
                    data.attention_features, form, {f"τ = {tau:.3g} ({where})": tau}, held
                ),
                "attention-d-distribution",
                "Read: attention features left of the dashed τ are linear in the "
                "same-position features; colour: d's 95% interval below τ, above it or "
                "across it.",
            )
        )
    return out


def _shares_table(data: RunData, tau: float, form: str) -> list[str]:
    """Attention's linear share and same-position share side by side, and how each is read."""
    rows = []
    share = attention_share(data)
    if share is not None:
        rows.append(share_row(f"linear at τ = {tau:.3g} ({form})", share))
    if data.positions is not None:
        rows.append(share_row("same position (gain ≤ τ)", data.positions.share))
    headers = ["share of alive attention features", "yes", "no", "dead", "alive", "% yes"]
    return [
        "",
        md_table([*headers, "% yes beyond noise (at least – at most)"], rows),
        "",
        "Linear: d = MSE_lin − MSE_mlp ≤ τ. Same position: the gain from earlier positions "
        "(MSE of the same-position ridge fit − MSE of one that also reads the previous "
        "token and a decayed sum of the ones before, each with λ per feature chosen on "
        "validation contexts) ≤ τ. The bracket counts the features "
        "whose 95% interval lies below τ (at least) and those whose interval does not lie "
        "above it (at most).",
        "",
    ]


def _causal_part(data: RunData, fig: Figures) -> list[str]:
    """The position score's causal counterpart: resampled earlier tokens and self-only
    attention per feature, and how often they agree with the predictive verdict."""
    c, table = data.attention_causal, data.attention_causal_table
    if c is None or table is None:
        return []
    r, s = c.resample, c.self_only
    out = [
        "### Causal check: does attention use earlier tokens?",
        "",
        f"The position score above is predictive. Here the model is run with what attention "
        f"reads at every earlier token but BOS taken from another text (**resampled**), and "
        f"with every head attending only to its own token (**self-only**), on "
        f"{c.contexts} held-out contexts. A feature counts as context-free when its "
        f"FVU under the intervention is ≤ {r.threshold:g}: "
        f"{r.percent_context_free:.1f}% of {r.alive:,} alive features "
        f"under resampling, {s.percent_self_only:.1f}% under self-only attention "
        f"(median FVU {r.median_resample_fvu:.3g} and "
        f"{s.median_self_only_fvu:.3g}). Self-only attention also removes what "
        "heads read from the BOS sink, so it loses more than resampling.",
        "",
    ]
    agreement = c.agreement
    if not agreement:
        return out
    rows = [
        [verdict, str(agreement[f"{key}_context_free"]), str(agreement[f"{key}_uses_context"])]
        for verdict, key in (("same position", "same_position"), ("needs context", "needs_context"))
    ]
    out += [md_table(["predictive verdict", "context-free (resampled)", "uses context"], rows), ""]
    if "gain_fvu" in table.columns:
        out += [
            fig.figure(
                block_charts.position_causal(table, r.threshold, c.contexts, c.targets),
                "position-causal",
                "Read: features in the lower left are same-position by both measures, "
                "those in the upper right need earlier tokens by both; red points below "
                "the line are predicted to need context but do not change when it does.",
            ),
            "",
        ]
    return out
