"""The logic label on an output feature's page: the label and the rule that decided it, its
statistics, the truth table over its inputs, the co-activation chart and the co-activation
modes where it fires or is suppressed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from coact.report.charts import logic as logic_charts
from coact.report.embed import Figures
from coact.report.evidence import Evidence
from coact.report.logic_section import describe_label
from coact.report.markdown import Cell, html_table, md_table, note, num, sort_key
from coact.report.names import run_file
from coact.report.outlier_marks import flagged_inputs, outlier_text
from coact.rundir.read import RunData


def logic_section(
    data: RunData,
    j: int,
    lab: Mapping[str, Any] | None,
    evidence: Evidence | None,
    fig: Figures,
) -> list[str]:
    """Output j's label, truth table and co-activations (notes where the run lacks them)."""
    out = ["## Logic label", ""]
    if data.logic is None:
        return [*out, note("Features were not labelled: `coact logic RUN` labels them."), ""]
    if lab is None:
        where = run_file(data, data.layout.logic.features)
        return [*out, f"This feature has no row in {where}.", ""]
    inputs = [int(i) for i in lab.get("inputs") or []]
    out += _label_part(data, lab, inputs)
    out += _truth_table(data, j, inputs)
    if evidence is not None and inputs:
        out += _coactivation(data, j, lab, inputs, evidence, fig)
    if data.clusters is not None:
        modes = data.clusters.filter(pl.col("output") == j)
        if modes.filter(pl.col("cluster") >= 0).height:
            out.append(
                fig.figure(
                    logic_charts.cluster_summary(modes, f"out {j}: co-activation modes"),
                    f"out-{j}-modes",
                    "Read: each row is a typical pattern of input activations (HDBSCAN mode) "
                    "where the target fires, or where its inputs fire but it does not.",
                )
            )
    out.append("")
    return out


def _label_part(data: RunData, lab: Mapping[str, Any], inputs: Sequence[int]) -> list[str]:
    """The label, its reading, confidence and rule, and the statistics it rests on."""
    headers = ["active tokens", "active with no input active", "additivity s"]
    headers += ["I(T; pattern) bits", "synergy bits", "modes where it fires"]
    cells = [
        num(lab.get("n_active")),
        num(lab.get("n_uncovered")),
        f"{num(lab.get('additivity'))} ± {num(lab.get('additivity_se'))}",
        num(lab.get("mi_pattern")),
        num(lab.get("synergy")),
        num(lab.get("n_clusters_fires")),
        num(lab.get("n_clusters_suppressed")),
    ]
    return [
        f"**{lab['label']}**: `{describe_label(lab)}`"
        + flagged_inputs(data, inputs)
        + f", confidence {lab['confidence']:.2f} (share "
        f"of the bootstrap resamples of the contexts giving the same label), decided by the "
        f"rule *{lab['rule']}*.",
        "",
        *_coverage_line(lab),
        md_table([*headers, "modes where it is suppressed"], [cells]),
        "",
    ]


def _coverage_line(lab: Mapping[str, Any]) -> list[str]:
    """Coverage, held-out fit and how many inputs 80 % coverage would need."""
    if lab.get("coverage") is None:
        return []
    needed, share, ratio = lab.get("inputs_needed"), lab.get("jacobian_share"), lab.get("ratio")
    sources = ", ".join(lab.get("sources") or []) or "none"
    text = (
        f"Its inputs (found by: {sources}) cover {num(lab['coverage'], '.2f')} of its "
        f"activation mass; the truth table predicts its firing on held-out contexts with AUC "
        f"{num(lab.get('auc'), '.2f')}"
    )
    if share is not None:
        text += f"; they carry {num(share, '.2f')} of its Jacobian attribution"
    text += ". "
    if needed is not None:
        text += f"{needed} inputs would cover 80 % of its activation mass."
    else:
        text += "A search over up to 64 candidate inputs does not cover 80 % of it."
    if ratio is not None and ratio == ratio:
        text += f" Where inputs meet, Σy / Σβx = {num(ratio)} (1 for a sum)."
    return [text, ""]


def _pattern_cells(pattern: str) -> list[Cell]:
    """A truth-table row's input pattern: ● active, ○ not."""
    return [("●" if bit == "1" else "○", bit) for bit in pattern]


def _truth_table(data: RunData, j: int, inputs: Sequence[int]) -> list[str]:
    """Each input pattern's tokens and how often output j is active on them."""
    table = (
        data.truth_tables.filter(pl.col("output") == j)
        if data.truth_tables is not None
        else pl.DataFrame()
    )
    if not table.height or not inputs:
        return []
    rows = []
    for r in table.iter_rows(named=True):
        mean = r["mean_activation_when_active"]
        rows.append(
            [
                *_pattern_cells(str(r["pattern"])),
                (num(r["count"]), r["count"]),
                (num(r["n_active"]), r["n_active"]),
                (num(r["p_active"], ".2f"), sort_key(r["p_active"])),
                (num(mean), sort_key(mean)),
                ("yes" if r["observed"] else "no (too few tokens)", None),
            ]
        )
    headers = [f"in {i}{outlier_text(data, data.in_slug, i)}" for i in inputs]
    headers += ["tokens", f"out {j} active", "P(active)", "mean activation when active"]
    return [
        "Truth table: each token falls in the row of the inputs active on it (● active).",
        "",
        html_table([*headers, "observed"], rows, sortable=True),
        "",
    ]


def _coactivation(
    data: RunData,
    j: int,
    lab: Mapping[str, Any],
    inputs: list[int],
    evidence: Evidence,
    fig: Figures,
) -> list[str]:
    """Output j against its inputs on the tokens where any of them is active."""
    frame, total = evidence.coactive(data.in_slug, data.out_slug, inputs, j)
    if not frame.height:
        return []
    title = f"out {j} against its inputs: {describe_label(lab)}"
    spec = logic_charts.coactivation(frame, inputs, j, title).to_dict()
    spec["title"]["subtitle"] = (
        f"{frame.height:,} of the {total:,} tokens where an input or the target is "
        "active (evenly spaced; activations in code units)"
    )
    return [
        fig.figure(
            spec,
            f"out-{j}-coactivation",
            "Read: where the target (colour) is bright tells which inputs, alone or "
            "together, make it fire; bright only where both are large suggests AND.",
        )
    ]
