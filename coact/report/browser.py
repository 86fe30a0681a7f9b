"""The feature browser (docs/features.md): every output feature as one compact line,
searched, filtered and sorted in the page by the report's script from one data file
(assets/coact/features.js, written once and loaded only by this page: it works from
file://, where a JSON file could not be fetched). A row opens a panel with the feature's
formula, inputs, top tokens and a few contexts, also for features without a page."""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import polars as pl

from coact.report.evidence import Evidence
from coact.report.markdown import note
from coact.report.names import layer_page_name
from coact.rundir.read import RunData

DATA_JS = "assets/coact/features.js"  # under docs/: the browser's data, one file per site
COLUMNS = (
    "feature", "verdict", "d_seed", "d_fvu", "active", "nmse", "terms", "label", "confidence",
    "artefact", "page", "jacobian",
)  # fmt: skip
INPUTS = 6  # inputs listed per feature in the panel
CONTEXTS = 2  # contexts per feature in the panel (before, after: tokens around the maximum)
BEFORE, AFTER = 10, 3


def _num(value: Any, digits: int = 4) -> Any:
    """A number for the JSON: None for missing or NaN, floats to `digits` significant."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    return value


def _top_tokens(table: pl.DataFrame | None) -> dict[tuple[str, int], str]:
    """(site slug, feature) → its top tokens as text, repeats counted: `' the' ×3, 'a'`."""
    if table is None:
        return {}
    grouped: dict[tuple[str, int], dict[str, int]] = {}
    for r in table.sort(["feature", "rank"]).iter_rows(named=True):
        text = r.get("token")
        shown = repr(text) if text is not None else f"⟨{r['token_id']}⟩"
        counts = grouped.setdefault((str(r.get("site") or ""), int(r["feature"])), {})
        counts[shown] = counts.get(shown, 0) + 1
    return {
        key: ", ".join(t + (f" ×{n}" if n > 1 else "") for t, n in counts.items())
        for key, counts in grouped.items()
    }


def _by_feature(table: pl.DataFrame | None, key: str, columns: list[str]) -> dict[int, tuple]:
    """Feature → its values of `columns` in a per-feature table (empty without it)."""
    if table is None:
        return {}
    return {int(r[0]): tuple(r[1:]) for r in table.select(key, *columns).iter_rows()}


def browser_data(data: RunData, pages: Collection[int], evidence: Evidence | None) -> dict:
    """Everything the browser shows: one row per output feature (COLUMNS), its formula,
    top inputs, top tokens and (with codes) top contexts as indices into one token list."""
    f = data.features
    assert f is not None
    calibrated = _by_feature(data.calibrated, "feature", ["verdict"])
    labels = _by_feature(data.labels, "output", ["label", "confidence"])
    jacobian = _by_feature(data.jacobian_features, "output", ["jacobian_verdict"])
    tokens = _top_tokens(data.top_tokens)
    rows, formulas = [], {}
    for r in f.iter_rows(named=True):
        j = int(r["feature"])
        verdict = calibrated.get(j, (r.get("verdict") or r.get("status"),))[0]
        label, confidence = labels.get(j, (None, None))
        rows.append([
            j, verdict, _num(r.get("d_seed")), _num(r.get("d_fvu")), r.get("active_count"),
            _num(r.get("nmse_sparse")), r.get("n_terms"), label, _num(confidence, 3),
            data.outlier_reason(data.out_slug, j) or "", int(j in pages),
            jacobian.get(j, (None,))[0],
        ])  # fmt: skip
        if r.get("formula"):
            formulas[str(j)] = str(r["formula"])
    inputs = _inputs(data)
    used = {i for terms in inputs.values() for i, *_ in terms}
    payload: dict[str, Any] = {
        "site": data.out_site,
        "in_site": data.in_site,
        "columns": list(COLUMNS),
        "rows": rows,
        "formula": formulas,
        "inputs": inputs,
        "tokens": {str(j): t for (s, j), t in tokens.items() if s == data.out_slug},
        "in_tokens": {str(i): t for (s, i), t in tokens.items() if s == data.in_slug and i in used},
    }
    if evidence is not None:
        payload.update(_contexts(evidence, data.out_slug, [int(r[0]) for r in rows]))
    return payload


def _inputs(data: RunData) -> dict[str, list[list[Any]]]:
    """Output → its INPUTS strongest connector terms: [input, refitted weight, standardised]."""
    if data.weights is None:
        return {}
    ranked = data.weights.sort(["output", pl.col("weight_refit").abs()], descending=[False, True])
    top = ranked.group_by("output", maintain_order=True).head(INPUTS)
    out: dict[str, list[list[Any]]] = {}
    for j, i, w, s in top.select("output", "input", "weight_refit", "standardised").iter_rows():
        out.setdefault(str(j), []).append([int(i), _num(w, 3), _num(s, 3)])
    return out


def _contexts(evidence: Evidence, slug: str, features: list[int]) -> dict[str, Any]:
    """Each feature's CONTEXTS top contexts: [activation, marked index, token indices,
    activations in % of the feature's maximum], token texts listed once in `vocab`."""
    vocab: dict[str, int] = {}
    contexts: dict[str, list[list[Any]]] = {}
    for j in features:
        top = evidence.top_contexts(slug, j, k=CONTEXTS, before=BEFORE, after=AFTER)
        if not top:
            continue
        vmax = top[0].activation or 1.0
        contexts[str(j)] = [
            [
                _num(c.activation, 3),
                c.marked,
                [vocab.setdefault(t, len(vocab)) for t in c.tokens],
                [round(100 * max(v, 0.0) / vmax) for v in c.values],
            ]
            for c in top
        ]
    return {"vocab": list(vocab), "contexts": contexts}


def write_browser_data(docs: Path, payload: dict) -> Path:
    """docs/assets/coact/features.js: the browser's data as one script (compact JSON)."""
    path = docs / DATA_JS
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    path.write_text(f"window.COACT_FEATURES={text};\n", encoding="utf-8")
    return path


def browser_page(data: RunData, payload: dict | None) -> str:
    """docs/features.md: the browser's controls and list, drawn by the report's script."""
    out = [
        "---",
        "hide:",
        "  - toc",  # the list needs the width more than a one-heading table of contents
        "---",
        "",
        f"# All output features of {data.out_site}",
        "",
        f"[Back to layer {data.layer}]({layer_page_name(data)}.md). One line per feature: "
        "search by number, label or token (its own top tokens and its inputs'), filter, sort "
        "by a column header, and click a line for its formula, inputs, top tokens and "
        "contexts. Features with a page are linked; for any other, `coact report RUN "
        "--feature N` writes one. d is MSE_lin − MSE_mlp on held-out tokens; the verdict "
        "compares its 95% interval with τ (the calibrated τ where the run has one). ⚠ marks "
        "a possible artefact (an outlier feature).",
        "",
    ]
    if data.features is None or payload is None:
        return "\n".join([*out, note("No linearity table: `coact connect RUN` makes it.")])
    out += [
        f'<div id="coact-browser" data-pages="features/" data-rows="{len(payload["rows"])}">'
        "<noscript>The feature browser needs JavaScript.</noscript></div>",
        "",
        f'<script src="{DATA_JS}"></script>',
        "",
    ]
    return "\n".join(out)


def write_browser(
    docs: Path, data: RunData, pages: Collection[int], evidence: Evidence | None
) -> str:
    """Write the browser's data file under `docs` and return its page (features.md)."""
    payload = None
    if data.features is not None:
        payload = browser_data(data, pages, evidence)
        write_browser_data(docs, payload)
    return browser_page(data, payload)
