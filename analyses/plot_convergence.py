"""The convergence study's chart and docs page, drawn from analyses/results/convergence.json
(`convergence.py` writes it and calls `draw` after every step).

    python analyses/plot_convergence.py   # redraw docs/convergence.png and docs/convergence.md

The chart: one row per figure, one column per ladder (code tokens, SAE tokens), the value
at each budget with its interval. The page says, per figure, whether it has settled at the
defaults (the doubling that ends at 100k code tokens, and at 400k SAE tokens), in words
and with the numbers, and which steps ran.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import altair as alt
import vl_convert

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "analyses" / "results" / "convergence.json"
CHART = ROOT / "docs" / "convergence.png"
PAGE = ROOT / "docs" / "convergence.md"
LADDER_NAMES = {"code": "code tokens (SAEs fixed)", "sae": "SAE training tokens (codes fixed)"}
BUDGET_NAMES = {"code": "code tokens", "sae": "SAE tokens"}


def _rows(study: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for ladder, data in study["ladders"].items():
        for step in data["steps"]:
            for name, figure in step["figures"].items():
                if figure["value"] is None or name not in study["figures"]:
                    continue
                meta = study["figures"][name]
                rows.append({
                    "figure": meta["label"] + (f" ({meta['unit']})" if meta["unit"] else ""),
                    "ladder": LADDER_NAMES[ladder], "budget": step["budget"],
                    "value": figure["value"],
                    "low": figure["low"] if figure["low"] is not None else figure["value"],
                    "high": figure["high"] if figure["high"] is not None else figure["value"],
                })  # fmt: skip
    return rows


def chart(study: dict[str, Any]) -> alt.FacetChart:
    """Each figure against its budget (log scale), one panel per figure and ladder."""
    base = alt.Chart(alt.Data(values=_rows(study))).encode(
        x=alt.X(
            "budget:Q", title="budget (tokens, log scale)", scale=alt.Scale(type="log"),
            axis=alt.Axis(format="~s"),
        ),
        tooltip=["figure:N", "ladder:N", "budget:Q", alt.Tooltip("value:Q", format=".4g"),
                 alt.Tooltip("low:Q", format=".4g"), alt.Tooltip("high:Q", format=".4g")],
    )  # fmt: skip
    band = base.mark_errorbar(ticks=True, color="#9ecae1").encode(
        y=alt.Y("low:Q", title=None, scale=alt.Scale(zero=False)), y2="high:Q"
    )
    line = base.mark_line(point=True, color="#1f77b4").encode(y=alt.Y("value:Q", title=None))
    order = [
        meta["label"] + (f" ({meta['unit']})" if meta["unit"] else "")
        for meta in study["figures"].values()
    ]
    return (
        (band + line)
        .properties(width=230, height=80)
        .facet(
            row=alt.Row(
                "figure:N", sort=order, title=None,
                header=alt.Header(labelAngle=0, labelAlign="left", labelLimit=460),
            ),
            column=alt.Column("ladder:N", title=None, sort=list(LADDER_NAMES.values())),
        )
        .resolve_scale(x="independent", y="independent")
        .properties(
            title=alt.TitleParams(
                f"Convergence of {study['model']} block {study['layer']}'s headlines",
                subtitle="value at each budget; bars: its interval (noise-floor bracket or "
                "Wilson 95 %; none for NMSEs and the median)",
                anchor="start",
            )
        )
    )  # fmt: skip


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f} %" if unit == "%" else f"{value:.4g}"


def _s(step: dict[str, Any], stage: str) -> str:
    seconds = step.get("stage_seconds", {}).get(stage)
    return "n/a" if seconds is None else f"{seconds:.0f}"


def _n(count: int | None) -> str:
    return "n/a" if count is None else f"{count:,}"


def _k(budget: int) -> str:
    return f"{budget // 1000}k" if budget % 1000 == 0 else f"{budget:,}"


def sentence(name: str, meta: dict[str, str], ladder: str, v: dict[str, Any]) -> str:
    """One figure's verdict over one doubling, in words with its numbers."""
    unit, (a, b) = meta["unit"], v["budgets"]
    head = f"- **{meta['label']}**: {BUDGET_NAMES[ladder]} {_k(a)} → {_k(b)}"
    if v["settled"] is None:
        return f"{head}: not judged (a value is missing)."
    move = f"{v['move']:+.2f} points" if unit == "%" else f"{v['move']:+.3g}"
    moved = f"moved it from {_fmt(v['previous'], unit)} to {_fmt(v['last'], unit)} ({move})"
    verdict = "**settled**" if v["settled"] else "**not settled**"
    if v["tolerance"] is not None:
        larger = max(abs(v["previous"]), abs(v["last"]))
        change = 100 * abs(v["move"]) / larger if larger else 0.0
        where = "within" if v["settled"] else "beyond"
        tol = f"a {change:.1f} % change, {where} the {100 * v['tolerance']:g} % tolerance"
        return f"{head} {moved}: {tol}: {verdict}."
    where = "inside" if v["settled"] else "outside"
    interval = f"{_fmt(v['low'], unit)} – {_fmt(v['high'], unit)}"
    return f"{head} {moved}, {where} the {_k(b)} step's interval {interval}: {verdict}."


def _tally(metas: dict[str, dict[str, str]], verdicts: dict[str, Any]) -> str:
    """How many judged figures settled, and which did not."""
    judged = {n: v["settled"] for n, v in verdicts.items() if v["settled"] is not None}
    moving = [metas[n]["label"] for n, ok in judged.items() if not ok]
    text = f"{sum(judged.values())} of {len(judged)} judged figures settled"
    return text + (f"; not settled: {'; '.join(moving)}." if moving else ".")


def _steps_table(ladder: str, data: dict[str, Any]) -> list[str]:
    lines = [
        f"| {BUDGET_NAMES[ladder]} | codes stored (tokens) | SAE tokens | codes start at "
        "(corpus token) | held-out tokens | mlp epochs run (best) | calibrated τ | seconds "
        "(the run's last call) | connect s | calibrate s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in data["steps"]:
        tau = f"{s['tau']:.3g}" if s["tau"] is not None else "n/a"
        lines.append(
            f"| {_k(s['budget'])} | {s['tokens']:,} | {s['sae_tokens']:,} | "
            f"{s['code_offset_tokens']:,} | {_n(s.get('heldout_tokens'))} | "
            f"{_n(s.get('mlp_epochs_run'))} ({_n(s.get('mlp_best_epoch'))}) | {tau} | "
            f"{s['seconds']:.0f} | {_s(s, 'connect')} | {_s(s, 'calibrate')} |"
        )
    return lines


def _ladder_section(study: dict[str, Any], ladder: str, data: dict[str, Any]) -> list[str]:
    ran = [s["budget"] for s in data["steps"]]
    missing = [b for b in data["planned"] if b not in ran]
    name = LADDER_NAMES[ladder]
    lines = [f"## {name[0].upper()}{name[1:]}", ""]
    if not ran:
        lines += ["Not run yet.", ""]
    else:
        lines += [f"Steps run: {', '.join(_k(b) for b in ran)} {BUDGET_NAMES[ladder]}.", ""]
        lines += [*_steps_table(ladder, data), ""]
    if ran:
        lines += [
            "Seconds are the run's last call's, on 2 shared CPU cores: a step resumed after a "
            "stop counts only what that call redid (a first step's include training its "
            "SAEs); connect and calibrate give their own, measured when they ran.",
            "",
        ]
    for budget, error in data["failed"].items():
        lines += [f"The {_k(int(budget))} step stopped: {error}", ""]
    if missing:
        flag = "--ladder code" if ladder == "code" else "--ladder sae"
        lines += [
            f"Not run: {', '.join(_k(b) for b in missing)} {BUDGET_NAMES[ladder]} (no figure "
            f"of theirs is reported here); `{study['command']} {flag}` runs them (finished "
            "steps are read back).",
            "",
        ]
    default = _k(data["default"])
    lines += [f"### Settled at the default ({default} {BUDGET_NAMES[ladder]})?", ""]
    if data["at_default"]:
        metas, at = study["figures"], data["at_default"]
        lines += [_tally(metas, at), ""]
        lines += [sentence(n, metas[n], ladder, v) for n, v in at.items()]
    else:
        lines.append("Not measured: the default step, or the step before it, has not run.")
    lines.append("")
    last = data["last"]
    if last and (not data["at_default"] or next(iter(last.values()))["budgets"]
                 != next(iter(data["at_default"].values()))["budgets"]):  # fmt: skip
        lines += ["### The last doubling run", ""]
        lines += [sentence(n, study["figures"][n], ladder, v) for n, v in last.items()]
        lines.append("")
    return lines


def page(study: dict[str, Any]) -> str:
    """The docs page: how the study runs, the rule, and per ladder its verdicts."""
    ladders, code_steps = study["ladders"], study["ladders"].get("code", {}).get("steps")
    sae = _k(ladders["sae"]["default"] if "sae" in ladders else code_steps[0]["sae_tokens"])
    code = _k(
        ladders["code"]["default"] if "code" in ladders else ladders["sae"]["steps"][0]["tokens"]
    )
    lines = [
        "# Convergence",
        "",
        "A headline figure is only worth quoting if more data would not move it. "
        "`analyses/convergence.py` reruns the stages the headlines come from "
        f"({', '.join(study['stages'])}) on {study['model']} block {study['layer']} "
        f"(corpus `{study['corpus']}`) at doubling budgets: the tokens whose feature codes "
        f"are stored, with the SAEs fixed (trained once at the default {sae} tokens; every "
        "step's codes start after those training tokens, and a larger step holds a smaller "
        f"one's), and the tokens each SAE is trained on, at the default {code} code tokens "
        "(always the same code tokens, after the largest training budget). Each step is its "
        f"own run directory under `{study['root']}/`.",
        "",
        f"**Rule.** A figure has {study['rule']}. The interval per figure:",
        "",
    ]
    lines += [f"- {m['label']}: {m['basis']}" for m in study["figures"].values()]
    lines += [
        "",
        "Settled says the last doubling did not move a figure beyond its own uncertainty; "
        "a wide interval (d's noise-floor bracket can span tens of points) lets a figure "
        "settle while it still moves a lot, so each verdict below gives the move and the "
        "interval; near 0 % or 100 % a Wilson interval is tight on the near side, so one "
        "feature of thousands crossing over can read as a move out of it. The step tables "
        "give the mlp "
        "fit's epochs (the most, and the latest best, over its output chunks): when the best "
        "is the last one run, a fit stopped at its epoch cap still improving, and the mlp's "
        "NMSE and d (hence the linear shares "
        "and how often the mlp beats least squares) depend on that cap as well as on the "
        "tokens.",
    ]
    lines += ["", "![Convergence](convergence.png)", ""]
    for ladder, data in study["ladders"].items():
        lines += _ladder_section(study, ladder, data)
    lines += [
        "Numbers: `analyses/results/convergence.json` (every step's figures with their "
        "intervals, budgets and seconds, and every verdict); `python "
        "analyses/plot_convergence.py` redraws this page and the chart from it.",
        "",
        "The code-token ladder to 400k, measured on a GPU: "
        "[Convergence on a GPU](convergence-gpu.md).",
        "",
    ]
    return "\n".join(lines)


def draw(results: Path, chart_path: Path, page_path: Path | None) -> None:
    """The chart (PNG, drawn offline by vl-convert) and, when asked, the docs page."""
    study = json.loads(results.read_text())
    if _rows(study):
        png = vl_convert.vegalite_to_png(chart(study).to_dict(), scale=1.5)
        chart_path.parent.mkdir(parents=True, exist_ok=True)
        chart_path.write_bytes(png)
    if page_path is not None:
        page_path.write_text(page(study), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--chart", type=Path, default=CHART)
    parser.add_argument("--page", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    if not args.results.is_file():
        print(f"plot_convergence: {args.results} missing, the chart and page are left as they are")
        return 0
    draw(args.results, args.chart, args.page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
