"""layers.parquet on the model page: what each column is called, how its values are
written, which table it goes in, the sortable tables themselves and the notes that say how
to read their columns."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from coact.report.markdown import Cell, html_table, num

# layers.parquet's columns as the model page names them (unknown ones keep their name)
COLUMNS = {
    "layer": "layer",
    "mlp_tau": "MLP τ",
    "attention_tau": "attention τ",
    "form": "form of d",
    "mlp_percent_linear": "MLP % linear",
    "attention_percent_linear": "attention % linear",
    "attention_percent_same_position": "attention % same position",
    "attention_percent_context_free": "attention % context-free (resampled)",
    "attention_percent_self_only": "attention % kept by self-only attention",
    "mlp_percent_linear_seed_tau": "MLP % linear at 0.001",
    "attention_percent_linear_seed_tau": "attention % linear at 0.001",
    "attention_percent_same_position_seed_tau": "attention % same position at 0.001",
    "mlp_nmse_linear": "MLP NMSE, least squares",
    "mlp_nmse_mlp": "MLP NMSE, mlp",
    "mlp_percent_mlp_gain": "MLP % the mlp fits better",
    "attention_nmse_linear": "attention NMSE, least squares",
    "attention_nmse_mlp": "attention NMSE, mlp",
    "attention_percent_mlp_gain": "attention % the mlp fits better",
    "attention_nmse_same_position": "attention NMSE, same position",
    "attention_nmse_with_context": "attention NMSE, with earlier positions",
    "composition_r2_sparse": "composition R² (sparse)",
    "composition_r2_ls": "composition R² (least squares)",
}
SOURCES = {"resid_pre": "skip (resid_pre)", "attn_out": "attention", "mlp_out": "MLP"}


def column_header(column: str) -> str:
    """A layers.parquet column's header on the model page."""
    if column in COLUMNS:
        return COLUMNS[column]
    if column.startswith("composition_share_"):
        kind = column.removeprefix("composition_share_")
        return f"share from {SOURCES.get(kind, kind)}"
    if column.startswith("decoded_fvu_"):
        return f"FVU {column.removeprefix('decoded_fvu_')}"
    return column


def _value(column: str, value: Any) -> str:
    """A layers.parquet value as the model page writes it: percents with one decimal, τ
    and FVU with three significant digits, the rest with three decimals."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if column == "layer" or not isinstance(value, int | float):
        return str(value)
    if "percent" in column:
        return f"{float(value):.1f}%"
    if column.startswith("decoded_fvu_") or column.endswith("tau"):
        return num(float(value), ".3g")
    return num(float(value), ".3f")


def column_groups(columns: Sequence[str]) -> dict[str, list[str]]:
    """layers.parquet's columns in the model page's tables (every column in one of them)."""
    seed = "The same shares at the seed's τ = 0.001 (one threshold for every layer)"
    fit = "How much the connectors explain (held-out NMSE) and how often the mlp wins"
    groups: dict[str, list[str]] = {
        "Linear and same-position shares": [],
        seed: [],
        fit: [],
        "Residual composition": [],
        "Decoded checks": [],
        "Other": [],
    }
    for c in columns:
        if c == "layer":
            continue
        if "percent" in c and c.endswith("_seed_tau"):
            groups[seed].append(c)
        elif "_nmse_" in c or c.endswith("_percent_mlp_gain"):
            groups[fit].append(c)
        elif c in ("mlp_tau", "attention_tau", "form") or "percent" in c:
            groups["Linear and same-position shares"].append(c)
        elif c.startswith("composition_"):
            groups["Residual composition"].append(c)
        elif c.startswith("decoded_fvu_"):
            groups["Decoded checks"].append(c)
        else:
            groups["Other"].append(c)
    return {name: members for name, members in groups.items() if members}


def layers_html(table: pl.DataFrame, links: Mapping[int, str]) -> str:
    """layers.parquet as sortable tables, one per group of columns, every column in one,
    each row's layer linked to its report."""
    parts = []
    for name, columns in column_groups(table.columns).items():
        parts += [f"### {name}", "", _layers_table(table, ["layer", *columns], links), ""]
    return "\n".join(parts)


def _layers_table(table: pl.DataFrame, columns: Sequence[str], links: Mapping[int, str]) -> str:
    """One group's table: a row per layer, the layer linked to its report."""
    rows = []
    for r in table.iter_rows(named=True):
        ell = int(r["layer"])
        cells: list[Cell] = []
        for column in columns:
            value = r[column]
            shown = html.escape(_value(column, value))
            if column == "layer" and ell in links:
                shown = f'<a href="{html.escape(links[ell], True)}">{shown}</a>'
            key = "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
            cells.append((shown, key))
        rows.append(cells)
    return html_table([column_header(c) for c in columns], rows, sortable=True)


def column_notes(table: pl.DataFrame) -> list[str]:
    """How to read the layers tables' columns (the optional groups' notes only where the
    table has them)."""
    notes = [
        "- **MLP τ**, **attention τ**, **form of d**: each site's threshold (the largest "
        "whose linear splice at that site costs at most ε extra next-token loss) and the form "
        "of d it applies to; calibrated τ differ between sites and layers, so the columns "
        "*at 0.001* (the seed's τ, seed form) compare them on one threshold.",
        "- **MLP % linear**: alive `mlp_out[ℓ]` features whose per-feature gain of an mlp "
        "connector over least squares, d = MSE_lin − MSE_mlp, is at most τ.",
        "- **attention % linear**: the same for `attn_out[ℓ]` from `resid_pre[ℓ]` at the same "
        "position.",
        "- **attention % same position**: alive `attn_out[ℓ]` features that earlier positions "
        "(the previous token, a decayed sum of the ones before) improve by at most τ.",
        "- **attention % context-free (resampled)**: the causal counterpart of the last "
        "column: alive `attn_out[ℓ]` features whose code at a token changes little "
        "(FVU ≤ 0.5) when what attention reads at every earlier token but BOS comes from "
        "another text. **% kept by self-only attention**: the same when every head attends "
        "only to the token itself (heads that rest on the BOS sink lose here, not there).",
        "- **composition R²**: mean held-out R² of `resid_pre[ℓ+1]` features from the three "
        "sources' features (sparse at the chosen α; least squares on every input).",
    ]
    if any("_nmse_" in c for c in table.columns):
        notes.append(
            "- **NMSE …**: held-out MSE over the variance of each output feature (1: explains "
            "nothing), averaged over alive features, for least squares and the mlp (both "
            "without L1) and for the position score's two ridge fits. **% the mlp "
            "fits better**: alive features whose d lies above 0 beyond its noise floor (the "
            "95 % interval over held-out contexts). Where the mlp never wins and its NMSE "
            "equals least squares', a 100 % linear share says that the mlp found nothing "
            "more at this budget, not that it was shown to be linear."
        )
    if any(c.startswith("composition_share_") for c in table.columns):
        notes.append(
            "- **share from …**: the mean share of a `resid_pre[ℓ+1]` feature's variance each "
            "source explains, cov(ŷ_s, y)/var(y), least squares on training tokens (the shares "
            "add up to that fit's training R²)."
        )
    if any(c.startswith("decoded_fvu_") for c in table.columns):
        notes.append(
            "- **FVU …**: the fraction of the true `resid_pre[ℓ+1]`'s variance left "
            "unexplained, on raw activations: `identity_raw` the exact sum of the three "
            "sources (≈ 0), `identity_decoded` that sum through each source's SAE, "
            "`composition_decoded` the target SAE decoding the composition connector's codes, "
            "`target_sae` the target SAE's own reconstruction (the floor)."
        )
    return notes
