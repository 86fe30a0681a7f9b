"""The parts that output and attention feature pages share: the links line, a connector's
formula, its inputs with their top tokens and contexts, where the feature fires (top
contexts and histogram), and d in its three forms."""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

from coact.models.sites import Site
from coact.report.ablation_section import context_effects, input_needs
from coact.report.charts import evidence as evidence_charts
from coact.report.embed import Figures
from coact.report.evidence import Evidence, context_lines
from coact.report.layer_graphs import GraphWriter
from coact.report.markdown import Cell, html_table, md_table, num, pct, sort_key
from coact.report.names import layer_page_name, model_backlink
from coact.report.outlier_marks import outlier_cell, outlier_mark
from coact.rundir.read import RunData

TokenTexts = Callable[[str, int], str]  # (site slug, feature) → its top tokens, HTML


def page_links(data: RunData, model: str | None) -> str:
    """A feature page's links: its layer, every feature, the model report (if any)."""
    return (
        f"[Layer {data.layer}](../{layer_page_name(data)}.md) · [all features](../features.md)"
        + model_backlink(model)
    )


def table_row(table: pl.DataFrame | None, j: int, column: str = "feature") -> dict[str, Any] | None:
    """Feature j's row of a per-feature table; None without the table or the row."""
    if table is None:
        return None
    hit = table.filter(pl.col(column) == j)
    return hit.row(0, named=True) if hit.height else None


FORMULA_HEADERS = [
    "held-out NMSE (sparse)", "terms", "intercept", "stable terms", "linear verdict",
    "active tokens",
]  # fmt: skip


def formula_cells(row: Mapping[str, Any], name: str) -> tuple[str, list[str]]:
    """A connector's formula named `name` (connect names every target "out j") and the
    cells of its summary under FORMULA_HEADERS."""
    formula = str(row.get("formula") or f"{name} = 0")
    stored, _, terms = formula.partition(" = ")
    if terms and stored != name:
        formula = f"{name} = {terms}"
    cells = [
        num(row.get("nmse_sparse")),
        num(row.get("n_terms")),
        num(row.get("intercept")),
        pct(row.get("stable_share"), 0),
        str(row.get("verdict") or row.get("status")),
        num(row.get("active_count")),
    ]
    return formula, cells


def formula_part(row: Mapping[str, Any], name: str) -> list[str]:
    """A connector's formula (`name = …`) and its summary: held-out loss, terms, verdict."""
    formula, cells = formula_cells(row, name)
    return ["```text", formula, "```", "", md_table(FORMULA_HEADERS, [cells]), ""]


def formula_beside(row: Mapping[str, Any], name: str, charts: list[str]) -> str:
    """A connector's formula and its summary as HTML, with small `charts` (figures' HTML)
    beside it; they wrap under it on a narrow window."""
    formula, cells = formula_cells(row, name)
    table = html_table(FORMULA_HEADERS, [[(c, None) for c in cells]], sortable=False)
    text = f'<pre class="coact-formula"><code>{html.escape(formula)}</code></pre>{table}'
    side = "".join(charts)
    return (
        f'<div class="coact-beside"><div class="coact-beside-text">{text}</div>'
        + (f'<div class="coact-beside-charts">{side}</div>' if side else "")
        + "</div>"
    )


def linearity_part(row: Mapping[str, Any], verdict_at: str) -> list[str]:
    """A connector's fit of one feature: the held-out MSE of least squares and of the mlp,
    the feature's variance, `verdict_at` (what the verdict is read at) with the verdict in
    bold (and the status at the point estimate, which reads d itself, where the verdict
    reads d's interval), and d in its three forms."""
    verdict = row.get("verdict") or row.get("status")
    point = f" ({row.get('status')} at the point estimate)." if row.get("verdict") else "."
    return [
        f"MSE of least squares {num(row.get('mse_linear'))}, of the mlp "
        f"{num(row.get('mse_mlp'))} (held-out tokens, code units²; variance "
        f"{num(row.get('variance'))}). {verdict_at}**{verdict}**{point}",
        "",
        _d_table(row),
        "",
    ]


def _d_table(row: Mapping[str, Any]) -> str:
    """d in its three forms, each with its 95% interval over contexts."""
    rows = []
    for name, col in (("raw", "d"), ("/ variance", "d_fvu"), ("seed form", "d_seed")):
        rows.append(
            [
                f"d ({name})",
                num(row.get(col)),
                f"[{num(row.get(col + '_low'))}, {num(row.get(col + '_high'))}]",
            ]
        )
    return md_table(["d(j) = MSE_lin − MSE_mlp", "value", "95% interval over contexts"], rows)


def evidence_part(
    evidence: Evidence,
    slug: str,
    j: int,
    name: str,
    prefix: str,
    fig: Figures,
    data: RunData | None = None,
    histogram: bool = True,
) -> list[str]:
    """A feature's top contexts from the code store, one full-width line each (`data`: the
    run, whose context ablation underlines what each context needs), and (`histogram`) the
    histogram of its activations (chart `<prefix>-<j>-histogram`)."""
    top = evidence.top_contexts(slug, j, k=8)
    vmax = top[0].activation if top else 0.0
    effects = context_effects(data, slug, j, top) if data is not None else None
    shading = any(effects or [])
    out = [
        f"The {len(top)} largest activations of {name}, one per context (rank, activation, "
        f"then the text; hover for where it is). Colour: its activation on each token "
        f"relative to its maximum {vmax:.3g}; outlined: the activating token"
        + ("; blue underline: the share lost when that token is ablated." if shading else "."),
        "",
        context_lines(top, vmax, name, effects),
        "",
    ]
    if histogram:
        out += [histogram_figure(evidence, slug, j, name, prefix, fig), ""]
    return out


def histogram_figure(
    evidence: Evidence, slug: str, j: int, name: str, prefix: str, fig: Figures, small: bool = False
) -> str:
    """The histogram of a feature's activations (chart `<prefix>-<j>-histogram`); `small`:
    sized to sit beside the formula."""
    size = {"width": 220, "height": 110} if small else {}
    return fig.figure(
        evidence_charts.activation_histogram(
            evidence.activations(slug, j), name, evidence.n_tokens, **size
        ),
        f"{prefix}-{j}-histogram",
        "Read: the spread of its activations; a long right tail means the top contexts "
        "are exceptional, a bump near zero means it mostly fires weakly.",
    ).strip()


def inputs_part(
    data: RunData,
    weights_table: pl.DataFrame | None,
    j: int,
    in_site: str,
    evidence: Evidence | None,
    token_text: TokenTexts,
    *,
    lab: Mapping[str, Any] | None = None,
    logic: bool = False,
    needs: bool = False,
) -> list[str]:
    """The inputs table of output j of a connector (`weights_table`: its weights.parquet)
    reading `in_site`: its strongest terms, then (`logic`: a labelled site) the inputs its
    logic label `lab` added, each with its top tokens and contexts; `needs`: a column of
    what each input needs (context ablation)."""
    weights = pl.DataFrame()
    if weights_table is not None:
        weights = weights_table.filter(pl.col("output") == j).sort(
            pl.col("weight_refit").abs(), descending=True
        )
    inputs = [int(i) for i in weights["input"].to_list()] if weights.height else []
    extra = [int(i) for i in (lab or {}).get("inputs") or [] if int(i) not in inputs]
    shown = inputs[:6] + extra
    if not shown:
        return ["It has no inputs in the sparse connector.", ""]
    by_input = {int(r["input"]): r for r in weights.iter_rows(named=True)} if weights.height else {}
    row = _InputRows(data, in_site, evidence, token_text, needs)
    headers = ["input", "refit weight", "standardised", "stable", "from", "top tokens"]
    headers += ["artefact?"] if data.outliers is not None else []
    headers += ["needs (ablation)"] if needs else []
    return [
        _inputs_intro(in_site, logic, needs),
        "",
        html_table(headers, [row(i, by_input.get(i)) for i in shown], sortable=False),
        "",
        *row.cards(shown),
    ]


def _inputs_intro(in_site: str, logic: bool, needs: bool) -> str:
    """What the inputs table shows, and (`needs`) how to read its ablation column."""
    return (
        f"Inputs are features of `{in_site}`: the connector's terms by |refitted weight| "
        "(standardised: |w|·std(in)/std(out); stable: kept with the same sign when refitted on "
        "each half of the tokens)"
        + (", then inputs the logic stage added" if logic else "")
        + ". Their top tokens, and under the table their top contexts (colour: the input's "
        "own activation), show what each reads"
        + (
            "; *needs*: per top context, the preceding token whose replacement (context "
            "ablation) lowers the input most, how far back, and the share lost."
            if needs
            else "."
        )
    )


class _InputRows:
    """One row of an inputs table per input: its weight, top tokens and top contexts."""

    def __init__(
        self,
        data: RunData,
        in_site: str,
        evidence: Evidence | None,
        token_text: TokenTexts,
        needs: bool,
    ) -> None:
        self.data, self.evidence, self.token_text, self.needs = data, evidence, token_text, needs
        self.slug = Site.parse(in_site).slug

    def _examples(self, i: int) -> str:
        """The input's three top contexts, coloured by its own activation, one per line."""
        if self.evidence is None or self.slug not in self.evidence.store.sites:
            return ""
        contexts = self.evidence.top_contexts(self.slug, i, k=3, before=10, after=2)
        vmax = contexts[0].activation if contexts else 0.0
        return context_lines(contexts, vmax, f"in {i}")

    def cards(self, shown: list[int]) -> list[str]:
        """One card per input under the table: its name, top tokens and top contexts at
        full width (never squeezed into a table cell)."""
        cards = []
        for i in shown:
            examples = self._examples(i)
            if not examples:
                continue
            head = (
                f"<strong>in {i}</strong>{outlier_mark(self.data, self.slug, i)} "
                f'<span class="coact-note">top tokens: {self.token_text(self.slug, i)}</span>'
            )
            cards.append(f'<div class="coact-card"><div class="coact-card-head">{head}</div>'
                         f"{examples}</div>")  # fmt: skip
        if not cards:
            return []
        return ['<div class="coact-cards">' + "".join(cards) + "</div>", ""]

    def __call__(self, i: int, w: Mapping[str, Any] | None) -> list[Cell]:
        """Input i's cells; `w`: its connector weights, None for an input logic added."""
        data, slug = self.data, self.slug
        where = "connector" if w is not None else "logic (added from co-activations)"
        cells: list[Cell] = []
        if data.outliers is not None:
            cells.append(outlier_cell(data, slug, i))
        if self.needs:
            cells.append((input_needs(data, i, slug), None))
        return [
            (f"in {i}{outlier_mark(data, slug, i)}", i),
            (num(w["weight_refit"]) if w else "–", sort_key(w["weight_refit"]) if w else ""),
            (num(w["standardised"]) if w else "–", sort_key(w["standardised"]) if w else ""),
            (num(w.get("in_both")) if w else "–", None),
            (html.escape(where), None),
            (self.token_text(slug, i), None),
            *cells,
        ]


@dataclass(frozen=True)
class PageParts:
    """What a feature page reads besides its feature: the run, the code store's evidence
    (None without codes), where its charts go, the token texts, the layer graphs' writer
    (block runs) and the link to a model report."""

    data: RunData
    evidence: Evidence | None
    fig: Figures
    token_text: TokenTexts
    graphs: GraphWriter | None = None
    model: str | None = None
    pages: frozenset[int] = frozenset()  # the output features that have a page

    def node_link(self, site: str, feature: int) -> str | None:
        """Where a layer-graph node on a feature page leads: an output feature's page, or
        its line in the feature browser; None for other sites' features."""
        if site != self.data.out_site:
            return None
        return f"out-{feature}.html" if feature in self.pages else f"../features.html#out-{feature}"
