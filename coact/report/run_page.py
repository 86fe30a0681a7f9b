"""The run's page (docs/index.md): what was studied, every stage's headline as a sentence,
the SAEs' quality and training curves, the code store's size and the timings; and the SAE
quality table's rows, which the model page shares."""

from __future__ import annotations

import html
import math

from coact.pipeline.summary import SiteSummary
from coact.report.charts import sae as sae_charts
from coact.report.embed import Figures
from coact.report.markdown import md_table, note, num, pct
from coact.report.names import layer_page_name, run_file
from coact.rundir.read import RunData
from coact.sae.evaluate import SaeReport

SAE_COLUMNS = ("site", "width", "FVE", "L0", "dead")  # the SAE tables' leading columns


def index_page(data: RunData, fig: Figures, n_pages: int, model: str | None = None) -> str:
    """The run's page; `model`: a relative link to the model report this layer is part of."""
    out = [*_intro(data, n_pages, model), "## Headline", ""]
    out += [f"- {line}" for line in headline(data)]
    out += ["", "## SAE quality", "", *_sae_quality(data, fig)]
    out += _codes_and_timings(data)
    out += [f"Go on to [layer {data.layer}]({layer_page_name(data)}.md).", ""]
    return "\n".join(out)


def _intro(data: RunData, n_pages: int, model: str | None) -> list[str]:
    """The title, the model run it belongs to, the sites studied and where to go next."""
    layer = layer_page_name(data)
    out = [f"# coact report: {data.model}, layer {data.layer}", ""]
    if model is not None:
        out += [
            f'Layer {data.layer} of a model run: <a href="{html.escape(model, True)}">the model '
            "report</a> compares every layer.",
            "",
        ]
    block = (
        f", and the block's [attention]({layer}.md#attention) and [residual "
        f"composition]({layer}.md#residual-composition)"
        if data.has_block
        else ""
    )
    return [
        *out,
        f"How the SAE features that block {data.layer}'s MLP reads (`{data.in_site}`) turn "
        f"into the features it writes (`{data.out_site}`). Run directory: "
        f"`{data.run_dir}`; corpus `{data.config.corpus}`.",
        "",
        f"[The layer page]({layer}.md) has the connectors, linearity, calibration and logic "
        f"labels{block}; [all features](features.md) lists every output feature, and "
        f"{n_pages} of them have a page with their evidence.",
        "",
    ]


def ce_recovered(report: SiteSummary | SaeReport) -> float | None:
    """(CE ablated − CE spliced) / (CE ablated − CE clean); None when the two are equal."""
    value = report.ce_recovered
    return value if math.isfinite(value) else None


def sae_cells(site: str, width: int | None, q: SiteSummary | SaeReport) -> list[str]:
    """The leading cells of an SAE's row (`SAE_COLUMNS`): site, width, FVE, L0, dead share."""
    return [f"`{site}`", num(width), num(q.fve), num(q.l0, ".1f"), pct(q.dead_fraction)]


def _sae_quality(data: RunData, fig: Figures) -> list[str]:
    """Each SAE's evaluation on held-out contexts, and its training curve where trained."""
    out: list[str] = []
    sites = data.sites()
    if sites:
        rows = [
            [
                *sae_cells(site, q.width if isinstance(q, SiteSummary) else None, q),
                *(num(v, ".3f") for v in (q.ce_clean, q.ce_spliced, q.ce_ablated)),
                pct(ce_recovered(q)),
                num(q.n_tokens),
            ]
            for site, q in sites.items()
        ]
        ce = ("CE clean (nats)", "CE spliced (nats)", "CE ablated (nats)", "CE recovered")
        out += [
            md_table([*SAE_COLUMNS, *ce, "eval tokens"], rows),
            "",
            "FVE: fraction of the site's variance (about its mean) the SAE explains on held-out "
            "contexts; L0: active latents per token; CE recovered: (CE ablated − CE spliced) / "
            "(CE ablated − CE clean), with the site zeroed for CE ablated.",
            "",
        ]
    else:
        where = f"{data.layout.summary.name} or {data.layout.sae_eval.name}/"
        out += [note(f"No SAE evaluation was found ({where})."), ""]
    if data.sae_logs:
        out += [
            fig.figure(
                sae_charts.sae_training(data.sae_logs),
                "sae-training",
                "Read: FVU should fall and level off, and the dead share stay small; a curve "
                "still falling at the end means the SAE saw too few tokens.",
            ),
            "",
        ]
    return out


def _codes_and_timings(data: RunData) -> list[str]:
    """The code store's bytes per token per site, and each stage's seconds."""
    out: list[str] = []
    codes = data.summary.codes.bytes_per_token if data.summary else {}
    if codes:
        headers = ["site", "stored bytes / token", "ideal (nonzeros × (index + value))"]
        rows = [
            [f"`{k}`", num(v["stored"], ".1f"), num(v["ideal"], ".1f"),
             num(v["dense_float32"], ".0f")]
            for k, v in codes.items()
        ]  # fmt: skip
        out += ["## Feature codes", "", md_table([*headers, "dense float32"], rows), ""]
    timings = data.summary.timings if data.summary else {}
    if timings:
        out += ["## Timings", "", timings_table(timings), ""]
    return out


def timings_table(timings: dict[str, float]) -> str:
    """Each stage's seconds, as the run and model pages show them."""
    return md_table(["stage", "seconds"], [[k, num(v, ".1f")] for k, v in timings.items()])


def headline(data: RunData) -> list[str]:
    """The run's headline figures as short sentences."""
    lines = []
    if data.summary:
        lines.append(f"Feature codes stored for {data.summary.tokens:,} tokens.")
    lines += _connect_headline(data)
    lines += _calibrate_headline(data)
    lines += block_headline(data)
    lines += _evidence_headline(data)
    g = data.logic
    if g is None:
        lines.append(f"Features were not labelled (no {run_file(data, data.layout.logic.result)}).")
    else:
        counts = ", ".join(f"{k} {v:,}" for k, v in g.counts.items() if v)
        lines.append(f"Logic labels of the output features: {counts}.")
    return lines


def _connect_headline(data: RunData) -> list[str]:
    """The chosen sparse connector, the families' losses and the linear share."""
    c = data.connect
    if c is None:
        return [f"Connectors were not fitted (no {run_file(data, data.layout.connect.result)})."]
    s = c.share
    line = (
        f"Linear at τ = {c.tau:g} ({c.form} form): {s.percent_linear:.1f}% of "
        f"{s.alive:,} alive output features ({s.dead:,} dead)"
    )
    if s.percent_linear_confident is not None:
        line += (
            f"; beyond d's noise floor between {s.percent_linear_confident:.1f}% and "
            f"{s.percent_linear_possible:.1f}%"
        )
    return [
        f"Sparse linear connector: chosen α = {c.alpha:.3g} (elbow, {c.alpha_index + 1} "
        f"of {c.n_alphas}), held-out NMSE {c.heldout_nmse_sparse:.3f} with "
        f"{c.weights_per_output:.1f} weights per output; least squares "
        f"{c.heldout_nmse_linear:.3f}, mlp {c.heldout_nmse_mlp:.3f} "
        f"({c.tokens_heldout:,} held-out tokens).",
        line + ".",
    ]


def _calibrate_headline(data: RunData) -> list[str]:
    """The calibrated τ, what each splice costs and the causal check's agreement."""
    k = data.calibrate
    if k is None:
        return [f"τ was not calibrated (no {run_file(data, data.layout.calibrate.result)})."]
    cal = k.linear_calibrated
    lines = [
        f"Calibrated τ = {k.tau:.3g} ({k.form} form; ε = {k.tolerance:g} nats per "
        f"token of extra loss over the mlp splice, {k.n_tokens:,} tokens): "
        f"{cal.percent_linear:.1f}% of {cal.alive:,} alive features are linear."
    ]
    sp = k.splices
    parts = [
        f"{name} {sp[name].delta_ce:+.4f} nats ({pct(sp[name].ce_recovered, 0)} recovered)"
        for name in ("sae", "linear", "mlp", "zero")
        if name in sp
    ]
    if parts:
        lines.append("Spliced MLP output, ΔCE: " + "; ".join(parts) + ".")
    if k.causal:
        ca = k.causal
        lines.append(
            f"Causal check of {ca.judged:,} strong connections: sign agrees "
            f"{pct(ca.share_sign_agrees, 0)}, size within 2× {pct(ca.share_size_agrees, 0)}."
        )
    return lines


def block_headline(data: RunData) -> list[str]:
    """Attention and composition in one sentence each (nothing for a run without them)."""
    from coact.report.select import attention_reading, attention_share

    lines = []
    a, p, share = data.attention, data.positions, attention_share(data)
    if a is not None and share is not None:
        tau, form = attention_reading(data)
        line = (
            f"Attention ({a.in_site} → {a.out_site}): {share.percent_linear:.1f}% of "
            f"{share.alive:,} alive features linear at τ = {tau:.3g} ({form} form)"
        )
        if p is not None:
            line += f"; {p.share.percent_same_position:.1f}% need no earlier position"
        lines.append(line + ".")
    c = data.composition
    if c is not None:
        shares = ", ".join(f"{site} {v:.2f}" for site, v in c.variance_share_ls.items())
        lines.append(
            f"Residual composition of {c.target}: held-out R² {c.r2_sparse:.3f} sparse "
            f"({c.weights_per_output:.1f} weights per feature), {c.r2_ls:.3f} least "
            f"squares; variance share per source {shares}."
        )
    return lines


def _evidence_headline(data: RunData) -> list[str]:
    """How many features each site flags as outliers, and what the context ablation ran."""
    lines = []
    o = data.outlier_summary
    if o is not None and o.sites:
        parts = []
        for slug, s in o.sites.items():
            kinds = ", ".join(
                f"{name} {count:,}"
                for count, name in (
                    (s.first_tokens, "first tokens"),
                    (s.first_delimiter, "first delimiter"),
                    (s.high_norm, "high norm"),
                )
                if count
            )
            parts.append(
                f"`{slug}` {s.flagged:,} of {s.alive:,} alive" + (f" ({kinds})" if kinds else "")
            )
        lines.append(
            "Outlier features (possible artefacts, ⚠ in tables): " + "; ".join(parts) + "."
        )
    a = data.ablation_summary
    if a is not None:
        lines.append(
            f"Context ablation: {a.contexts:,} top contexts of {a.features:,} features, "
            f"{a.sequences:,} sequences rerun up to the site ({a.seconds:.0f} s)."
        )
    return lines
