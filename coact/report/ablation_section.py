"""Context ablation on a feature's page: which preceding tokens its top contexts need (each
removed or replaced in turn and the model rerun), as a chart, a sentence naming the token
that matters most, and a table per top context; and the short form of it for an input in
an inputs table."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from coact.report.charts import evidence as evidence_charts
from coact.report.embed import Figures
from coact.report.evidence import Context, Effects
from coact.report.markdown import md_table, note, num, pct, token
from coact.rundir.read import RunData

MATTERS = 0.25  # a preceding token "matters" when ablating it removes this share or more


def _preferred_mode(rows: pl.DataFrame) -> str:
    """Replacing keeps every other token in place, so it is read first when present."""
    modes = set(rows["mode"].to_list())
    return "replace" if "replace" in modes else "remove"


def _best_per_context(rows: pl.DataFrame, mode: str) -> pl.DataFrame:
    """Per top context (rank), the ablated token of largest drop in `mode`."""
    return (
        rows.filter(pl.col("mode") == mode)
        .sort(["drop", "ablated_offset"], descending=[True, False])
        .group_by("rank", maintain_order=True)
        .first()
        .sort("rank")
    )


def _ablated(data: RunData, slug: str, feature: int) -> pl.DataFrame:
    """The ablation table's rows of one feature of site `slug`."""
    assert data.ablation is not None
    return data.ablation.filter((pl.col("site") == slug) & (pl.col("feature") == feature))


def input_needs(data: RunData, i: int, slug: str | None = None, contexts: int = 2) -> str:
    """For an input's inputs-table cell: per top context, the preceding token whose
    ablation lowers it most, e.g. `'"' −1: 92%`; `slug`: the input's site (the MLP's
    input by default)."""
    rows = _ablated(data, slug or data.in_slug, i)
    if not rows.height:
        return "–"
    best = _best_per_context(rows, _preferred_mode(rows)).head(contexts)
    return "<br>".join(
        f"{token(r['ablated_token'])} −{r['ablated_offset']}: {pct(r['drop_fraction'], 0)}"
        for r in best.iter_rows(named=True)
    )


def ablation_section(data: RunData, slug: str, j: int, name: str, fig: Figures) -> list[str]:
    """The context-ablation chart of a feature's top contexts and what it says."""
    out = ["### Which preceding tokens it needs (context ablation)", ""]
    if data.ablation is None:
        return [*out, note("No context ablation: `coact ablate RUN` runs it."), ""]
    rows = _ablated(data, slug, j)
    if not rows.height:
        return [
            *out,
            f"{name} was not among the ablated features (`coact ablate RUN --feature {j}` "
            "adds it).",
            "",
        ]
    filler = data.ablation_summary.filler if data.ablation_summary else None
    window = int(rows["ablated_offset"].to_numpy().max())
    n = rows["rank"].n_unique()
    out += [
        f"Each of the {window} tokens before the activating token of its top {n} contexts "
        "was, one at a time, removed (later tokens move one place left) or replaced by "
        f"{token(filler)} (nothing moves); the model was rerun up to `{slug}` and {name} "
        "re-encoded at the activating token. Drop = clean − ablated activation, in the chart "
        "as a share of the clean one. Removing a token also changes the distance to every "
        "earlier token, so a drop under removal alone points at position, not content.",
        "",
        fig.figure(
            evidence_charts.ablation_drops(rows, name, filler),
            f"{slug.replace('.', '-').replace('_', '-')}-{j}-ablation",
            "Read: a red cell is a token the feature needs (the activation falls without it); "
            "a row with no red cell fires on the activating token itself or on longer context.",
        ),
        _verdict(rows, name, window),
        "",
        "Per top context, the token whose ablation lowers it most:",
        "",
        _per_context_table(rows),
        "",
    ]
    return out


def _verdict(rows: pl.DataFrame, name: str, window: int) -> str:
    """The sentence that names the preceding token that matters most, or says none does."""
    mode = _preferred_mode(rows)
    best = _best_per_context(rows, mode)
    verb = "replacing" if mode == "replace" else "removing"
    top = best.sort("drop_fraction", descending=True).row(0, named=True)
    if float(top["drop_fraction"]) < MATTERS:
        return (
            f"**No single preceding token matters much**: {verb} any of the {window} before it "
            f"removes at most {pct(top['drop_fraction'], 0)} of the activation "
            f"({token(top['ablated_token'])}, {top['ablated_offset']} before, top context "
            f"{top['rank']}). {name} fires on the activating token itself or on longer context."
        )
    texts = best["ablated_token"].to_list()
    counts = {t: texts.count(t) for t in texts}
    first = best.row(0, named=True)
    chosen = max(counts, key=lambda t: (counts[t], t == first["ablated_token"]))
    same = best.filter(pl.col("ablated_token") == chosen)
    return (
        f"**Most important preceding token: {token(chosen)}**: {verb} it "
        f"lowers {name} most in {same.height} of {best.height} top contexts, by "
        f"{pct(same['drop_fraction'].mean(), 0)} on average ("
        + ", ".join(
            f"top context {r['rank']}: {r['ablated_offset']} before, {pct(r['drop_fraction'], 0)}"
            for r in same.iter_rows(named=True)
        )
        + ")."
    )


def _per_context_table(rows: pl.DataFrame) -> str:
    """Per top context: where it is, its activating token and clean activation, and in
    each mode the token whose ablation lowers it most."""
    per_mode = {
        m: _best_per_context(rows, m) for m in ("replace", "remove") if m in set(rows["mode"])
    }
    contexts = (
        rows.select("rank", "context", "position", "token", "clean").unique("rank").sort("rank")
    )
    table = []
    for r in contexts.iter_rows(named=True):
        cells = [
            str(r["rank"]),
            f"context {r['context']}, position {r['position']}",
            token(r["token"]),
            num(r["clean"]),
        ]
        for b in per_mode.values():
            hit = b.filter(pl.col("rank") == r["rank"])
            if hit.height:
                h = hit.row(0, named=True)
                cells.append(
                    f"{token(h['ablated_token'])} ({h['ablated_offset']} before): "
                    f"{num(h['drop'])} ({pct(h['drop_fraction'], 0)})"
                )
            else:
                cells.append("–")
        table.append(cells)
    headers = ["rank", "where", "activating token", "clean activation"]
    headers += [f"largest drop when {m}d" for m in per_mode]
    return md_table(headers, table)


def context_effects(data: RunData, slug: str, j: int, contexts: Sequence[Context]) -> list[Effects]:
    """Per top context (matched by context and position), the share of the activation lost
    when each preceding token is ablated (tokens back → share), in the mode read first;
    empty for a context the ablation did not cover, or a run without it."""
    if data.ablation is None:
        return [{} for _ in contexts]
    rows = _ablated(data, slug, j)
    if not rows.height:
        return [{} for _ in contexts]
    rows = rows.filter(pl.col("mode") == _preferred_mode(rows))
    found: dict[tuple[int, int], Effects] = {}
    for r in rows.select("context", "position", "ablated_offset", "drop_fraction").iter_rows():
        found.setdefault((int(r[0]), int(r[1])), {})[int(r[2])] = float(r[3])
    return [found.get((c.context, c.position), {}) for c in contexts]
