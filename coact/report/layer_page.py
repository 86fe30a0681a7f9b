"""The layer page (docs/layer-<ℓ>.md): the MLP's connectors, linearity, calibration and
logic labels, then (block runs) attention and the residual composition, the outlier
features, and the table of the features with a page of their own; each section lives in
its own module."""

from __future__ import annotations

import html
from collections.abc import Collection, Mapping

from coact.report.attention_section import attention_section
from coact.report.calibration_section import calibration_section
from coact.report.composition_section import composition_section
from coact.report.connectors_section import connectors_section, linearity_section
from coact.report.control_section import control_section
from coact.report.embed import Figures
from coact.report.evidence import TokenText
from coact.report.features_table import features_table
from coact.report.jacobian_section import jacobian_section, trust_section
from coact.report.layer_graphs import GraphWriter
from coact.report.logic_section import logic_section
from coact.report.markdown import note
from coact.report.names import model_backlink
from coact.report.outliers_section import outliers_section
from coact.report.transcoder_section import transcoder_section
from coact.rundir.read import RunData


def layer_page(
    data: RunData,
    fig: Figures,
    featured: Mapping[int, list[str]],
    pages: Collection[int],
    *,
    token_text: TokenText | None = None,
    graphs: GraphWriter | None = None,
    model: str | None = None,
) -> str:
    """The layer: the MLP's connectors, linearity, calibration and labels, then (for a
    block run) attention and the residual composition. `token_text` gives features' top
    tokens, `graphs` draws and exports layer graphs (none without it), `model` links the
    model report."""
    token_text = token_text or TokenText(data.top_tokens, data.attention_top_tokens)
    out = [
        f"# Layer {data.layer}: {data.in_site} → {data.out_site}",
        "",
        f"[Back to the run](index.md) · [all features](features.md){model_backlink(model)}",
        "",
    ]
    out += mismatch_warnings(data)
    out += trust_section(data)
    out += control_section(data)
    out += connectors_section(data, fig)
    out += linearity_section(data, fig)
    out += calibration_section(data, fig)
    out += jacobian_section(data)
    out += transcoder_section(data)
    out += logic_section(data, fig, pages)
    if data.has_block:
        out += attention_section(data, fig, token_text)
        out += composition_section(data, fig, graphs)
    out += outliers_section(data, pages)
    out += ["## Features", ""]
    if featured:
        out += [
            f"The {len(featured)} features with a page, and why each was picked; click a column "
            "header to sort. [All features](features.md) has every output feature.",
            "",
            features_table(data, featured, pages, prefix="features/"),
            "",
        ]
    else:
        out += [note("No feature pages: the run has no linearity table or no codes."), ""]
    return "\n".join(out)


def mismatch_warnings(data: RunData) -> list[str]:
    """What `--allow-mismatch` let through (summary.json's warnings), at the top of the page:
    figures from a mismatched SAE or a failed fit must not be read without it."""
    warnings = data.summary.warnings if data.summary is not None else []
    if not warnings:
        return []
    items = [f"    - {html.escape(warning)}" for warning in warnings]
    return ['!!! warning "Run with --allow-mismatch"', "", *items, ""]
