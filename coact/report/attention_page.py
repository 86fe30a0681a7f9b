"""An attention feature's page (block runs): where it fires, the same-position connector
(formula, inputs, d at attention's τ), the position score, the causal check of earlier
tokens and the layer graph. Parts the run lacks are left out with a note."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from coact.models.sites import Site
from coact.report import feature_parts
from coact.report.ablation_section import ablation_section
from coact.report.charts import base as base_charts
from coact.report.embed import Figures
from coact.report.evidence import Evidence
from coact.report.feature_parts import (
    PageParts,
    TokenTexts,
    table_row,
)
from coact.report.layer_graphs import GraphWriter
from coact.report.markdown import finite, md_table, note, num, pct, token
from coact.report.outlier_marks import outlier_warning
from coact.report.select import attention_form, attention_reading, position_ranking
from coact.rundir.read import RunData

POSITION_VERDICTS = {
    "same_position": "its interval lies below τ: earlier positions add nothing the token's own "
    "features do not already give",
    "needs_context": "its interval lies above τ: earlier positions explain part of it that the "
    "token's own features cannot",
    "undecided": "its interval straddles τ: the held-out tokens cannot tell",
    "dead": "it never fires on the held-out tokens",
}
CARRIERS = {"previous": "the previous token", "decayed": "further back (the decayed sum)"}


def attention_page(parts: PageParts, j: int, reasons: Sequence[str]) -> str:
    """One attention feature of a block run (a feature of data.attn_out_site): where it
    fires, the same-position connector from data.attn_in_site (formula, inputs, d at
    attention's τ), the position score, the causal check of earlier tokens and its layer
    graph (drawn by `graphs`). Parts the run lacks are left out with a note."""
    data, evidence, fig, token_text = parts.data, parts.evidence, parts.fig, parts.token_text
    graphs, model = parts.graphs, parts.model
    site, slug, name = data.attn_out_site, Site.parse(data.attn_out_site).slug, f"attn {j}"
    row = table_row(data.attention_features, j)
    position = table_row(data.positions_table, j)
    active = next(
        (r["active_count"] for r in (row, position) if r is not None and "active_count" in r),
        None,
    )
    reason = data.outlier_reason(slug, j)
    flag = "–" if data.outliers is None else (f"⚠ {reason}" if reason else "no")
    out = [
        f"# {name}",
        "",
        f"Feature {j} of `{site}` (written by the attention of block {data.layer}). Shown "
        f"because: {'; '.join(reasons)}. " + feature_parts.page_links(data, model),
        "",
        md_table(
            ["feature", "site", "active tokens", "artefact? (outlier flag)"],
            [[name, f"`{site}`", num(active), flag]],
        ),
        "",
    ]
    out += outlier_warning(data, slug, j, name, "formula and position score")
    out += _evidence(data, j, slug, name, evidence, fig, token_text)
    out += _connector(data, j, row, name, evidence, token_text)
    out += _position_score(data, j, position, name)
    out += _causal(data, j, name)
    if graphs is not None and data.attention_weights is not None:
        out += _graph(data, j, name, graphs, fig)
    return "\n".join(out)


def _graph(data: RunData, j: int, name: str, graphs: GraphWriter, fig: Figures) -> list[str]:
    """The features its same-position connector reads and those it feeds onward."""
    nxt = data.next_site if data.composition is not None else None
    return [
        "## Layer graph",
        "",
        f"{name} in its block: the features of `{data.attn_in_site}` its same-position "
        "connector reads"
        + (f", the `{nxt}` features it feeds through the residual composition" if nxt else "")
        + f", and one hop further each way (the {graphs.top} strongest connections of each "
        "feature and hop; the exported tables hold the drawn connections with their "
        "weights). Only same-position connections are drawn: what attention brings from "
        "earlier tokens is the position score's, above.",
        "",
        *graphs.section(data, data.attn_out_site, j, "both", fig, f"attn-{j}-graph", "../"),
    ]


def _evidence(
    data: RunData,
    j: int,
    slug: str,
    name: str,
    evidence: Evidence | None,
    fig: Figures,
    token_text: TokenTexts,
) -> list[str]:
    """Its top tokens (connect's table), its top contexts and histogram (the code store),
    and its context ablation where the run has one."""
    out = ["## Evidence: where it fires", ""]
    stored = pl.DataFrame()
    if data.attention_top_tokens is not None:
        t = data.attention_top_tokens
        mine = (pl.col("site") == slug) if "site" in t.columns else pl.lit(True)
        stored = t.filter(mine & (pl.col("feature") == j)).sort("rank")
    if stored.height:
        tokens = token_text(slug, j)
        out += [f"Its top tokens (the attention connector's top_tokens): {tokens}.", ""]
    if evidence is not None and slug in evidence.store.sites:
        out += feature_parts.evidence_part(evidence, slug, j, name, "attn", fig)
    else:
        codes = data.layout.codes.name
        note_text = f"No codes of this site in the run ({codes}/): no contexts or histogram."
        out += [note(note_text), ""]
        if stored.height:
            out += _stored_activations(stored, name)
    if data.ablation is not None and data.ablation.filter(pl.col("site") == slug).height:
        out += ablation_section(data, slug, j, name, fig)
    return out


def _stored_activations(stored: pl.DataFrame, name: str) -> list[str]:
    """The largest activations connect stored, where the run has no codes of the site."""
    rows = [
        [
            str(int(r["rank"]) + 1),
            token(r.get("token")),
            num(r["activation"]),
            f"context {r.get('context', '–')}, position {r.get('position', '–')}",
        ]
        for r in stored.iter_rows(named=True)
    ]
    return [
        f"The largest activations of {name} the connect stage stored:",
        "",
        md_table(["rank", "token", "activation (code units)", "where"], rows),
        "",
    ]


def _connector(
    data: RunData,
    j: int,
    row: Mapping[str, Any] | None,
    name: str,
    evidence: Evidence | None,
    token_text: TokenTexts,
) -> list[str]:
    """The same-position connector: formula, strongest inputs, d at attention's τ."""
    out = ["## Same-position connector", ""]
    if row is None:
        return [*out, note("No same-position connector of attention in this run."), ""]
    in_site = data.attn_in_site
    form = attention_form(data)
    tau = finite(attention_reading(data)[0]) if data.attention is not None else None
    where = f"calibrated at `{data.attn_out_site}`" if data.attention_calibration else "set"
    ablated = data.ablation is not None and (
        data.ablation.filter(pl.col("site") == Site.parse(in_site).slug).height > 0
    )
    out += [
        f"{name} from the features of `{in_site}` at the same token (what attention would write "
        "if it read no other position): the sparse linear connector at the chosen α, its "
        "coefficients refitted by least squares on its inputs:",
        "",
        *feature_parts.formula_part(row, name),
        *feature_parts.inputs_part(
            data, data.attention_weights, j, in_site, evidence, token_text, needs=ablated
        ),
    ]
    column = base_charts.D_COLUMN.get(form, "d_seed")
    at = f"τ = {num(tau)} ({form} form, {where})" if tau is not None else f"its τ ({form} form)"
    d = (
        f"d ({form} form) = {num(row.get(column))}, 95% interval "
        f"[{num(row.get(column + '_low'))}, {num(row.get(column + '_high'))}]"
    )
    return [
        *out,
        "### Linearity at attention's τ",
        "",
        *feature_parts.linearity_part(row, f"{d}; at attention's {at}: "),
    ]


def _position_score(
    data: RunData, j: int, position: Mapping[str, Any] | None, name: str
) -> list[str]:
    """How much earlier positions add to the same-position fit (the position score)."""
    out = ["## Position score: does it need earlier positions?", ""]
    p = data.positions
    if p is None or data.positions_table is None:
        return [*out, note("No position score: `coact analyze --block` computes it."), ""]
    if position is None:
        return [*out, f"{name} has no row in the position score.", ""]
    form = attention_form(data)
    column = base_charts.GAIN_COLUMN.get(form, "gain_seed")
    ranked = position_ranking(data, form)["feature"].to_list()
    rank = f"rank {ranked.index(j) + 1} of {len(ranked)}" if j in ranked else "not ranked"
    verdict = str(position.get("verdict") or position.get("status"))
    carrier = CARRIERS.get(str(position.get("carrier")), "–")
    cells = [
        num(position.get(column)),
        f"[{num(position.get(column + '_low'))}, {num(position.get(column + '_high'))}]",
        verdict,
        carrier,
        num(position.get("gain_previous_alone_fvu")),
        num(position.get("gain_decayed_alone_fvu")),
        rank,
    ]
    headers = [f"gain ({form} form)", "95% interval", "verdict", "carrier"]
    headers += ["previous token alone (/ variance)", "decayed context alone (/ variance)"]
    out += [
        f"The gain from earlier positions: MSE of the same-position ridge fit − MSE of one "
        f"that also reads the previous token and a decayed sum of the ones before "
        f"({', '.join(p.summaries)}; decay {p.decay}, window {p.window} tokens), in the {form} "
        f"form, on held-out tokens, with its 95% interval over contexts; read at τ = "
        f"{num(finite(p.tau))}. Alone: the gain of each summary by itself (/ variance). "
        "Carrier: the summary that alone recovers more of the gain. Both fits are ridge "
        f"regressions, λ chosen for this feature on validation contexts (× the mean input "
        f"variance): same position {num(finite(position.get('ridge_same')))}, with earlier "
        f"positions {num(finite(position.get('ridge_context')))}.",
        "",
        md_table([*headers, "rank by gain"], [cells]),
        "",
        f"Read: **{verdict.replace('_', ' ')}**: {POSITION_VERDICTS.get(verdict, verdict)}"
        + (f"; most of the gain comes from {carrier}." if carrier != "–" else "."),
        "",
    ]
    return out


def _causal(data: RunData, j: int, name: str) -> list[str]:
    """The causal counterpart of the position score for this feature: its code with the
    earlier tokens resampled and with self-only attention (the layer page explains both)."""
    out = ["## Causal check: does it use earlier tokens?", ""]
    c, table = data.attention_causal, data.attention_causal_table
    if c is None or table is None:
        return [*out, note("No causal check of attention: `coact analyze --block` runs it."), ""]
    row = table_row(table, j)
    if row is None:
        return [*out, f"{name} has no row in the causal check.", ""]
    fvu, kept = finite(row.get("resample_fvu")), finite(row.get("resample_kept"))
    own_fvu, own_kept = finite(row.get("self_only_fvu")), finite(row.get("self_only_kept"))
    checks = [
        ["earlier tokens resampled", num(row.get("resample_active")), num(fvu), pct(kept, 0)],
        ["self-only attention", num(row.get("active")), num(own_fvu), pct(own_kept, 0)],
    ]
    line = f"Read: earlier tokens resampled: {_resampled(name, fvu, kept, c.resample.threshold)}."
    if own_kept is not None and own_fvu is not None:
        line += (
            f" Self-only attention keeps {pct(own_kept, 0)} (FVU {num(own_fvu)}); it also "
            "removes what heads read from the BOS sink, so it loses more than resampling."
        )
    out += [
        f"The model rerun on {num(c.contexts)} held-out contexts with what attention "
        "reads at every earlier token but BOS taken from another text (**resampled**), and "
        "with every head attending only to its own token (**self-only**). FVU: the squared "
        f"change of {name}'s code / its variance; kept: Σ min(c, c′) / Σ c, the share of its "
        "mass (code units summed over tokens) that survives.",
        "",
        md_table(["intervention", "tokens where it fires", "FVU", "mass kept"], checks),
        "",
        line,
        "",
    ]
    return out


def _resampled(name: str, fvu: float | None, kept: float | None, threshold: float) -> str:
    """What resampling the earlier tokens says of the feature: the share of its code kept,
    and whether that is within the context-free threshold."""
    if kept is None or fvu is None:
        return f"it never fired on the resampled targets, so the check says nothing of {name}"
    reading = f"the code keeps {pct(kept, 0)} of its mass (FVU {num(fvu)}"
    limit = finite(threshold)
    if limit is None:
        return reading + ")"
    free = fvu <= limit
    return reading + (
        f", {'within' if free else 'above'} the context-free threshold "
        f"{num(limit)}): {name} " + ("does not use" if free else "uses") + " the content of "
        "earlier tokens"
    )
