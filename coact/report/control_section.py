"""Headlines beside the control (the same architecture re-initialised, SAEs trained by the
same recipe on the same tokens, the same headline stages): the layer page's table
"Headline vs control" and the lines `coact analyze` prints. A figure the control reproduces
is marked uninformative in words, not only by a flag."""

from __future__ import annotations

from typing import TYPE_CHECKING

from coact.report.markdown import md_table, note

if TYPE_CHECKING:
    from coact.pipeline.control_figures import ControlSummary, HeadlineVsControl
    from coact.rundir.read import RunData

UNINFORMATIVE = "uninformative: the control reproduces it"


def number(value: float | None, unit: str) -> str:
    """A figure as printed: percents with one decimal, ratios with three."""
    if value is None:
        return "–"
    return f"{value:.1f}%" if unit == "%" else f"{value:.3f}"


def headline(f: HeadlineVsControl) -> str:
    """'value (control value)'."""
    return f"{number(f.value, f.unit)} (control {number(f.control, f.unit)})"


def interval(f: HeadlineVsControl) -> str:
    """The control's interval, or the tolerance the figure is judged by."""
    if f.control_low is not None and f.control_high is not None:
        return f"{number(f.control_low, f.unit)} – {number(f.control_high, f.unit)}"
    return f"within {100 * (f.tolerance or 0):g} % of each other"


def verdict(f: HeadlineVsControl) -> str:
    """Whether the control reproduces the figure, in words, with the interval or tolerance."""
    if f.informative and f.control_low is not None:
        return "informative: outside the control's interval"
    if f.informative:
        return f"informative: differs from the control by more than {100 * (f.tolerance or 0):g} %"
    if f.control_low is not None:
        return f"{UNINFORMATIVE} (inside its interval {interval(f)})"
    return f"{UNINFORMATIVE} (the two read the same, {interval(f)})"


def _origin(c: ControlSummary) -> str:
    how = "read back from an earlier run" if c.reused else "run now"
    tau = (
        f"; the share at the calibrated τ reads the control's table at this run's τ = {c.tau:.3g}"
        f" ({c.form} form): the control calibrates nothing"
        if c.tau is not None
        else ""
    )
    return (
        f"the same architecture with every weight re-initialised (seed {c.seed}), SAEs trained "
        f"by the same recipe on the same tokens, stages {', '.join(c.stages)}; {how}, in "
        f"{c.run_dir}{tau}"
    )


def format_control(c: ControlSummary) -> str:
    """The CLI's lines: every headline as 'value (control value)', its verdict in words."""
    lines = [f"  control: {_origin(c)}"]
    for f in c.figures.values():
        lines.append(f"    {f.label}: {headline(f)}; {verdict(f)}")
    if not c.figures:
        lines.append("    no headline of this run has a counterpart in the control")
    shown = c.uninformative
    lines.append(
        f"  {len(shown)} of {len(c.figures)} headlines are uninformative"
        + (f" ({', '.join(shown)})" if shown else "")
        + f"; the control run took {c.timings.get('total_s', 0.0):.0f} s"
    )
    return "\n".join(lines)


def control_section(data: RunData) -> list[str]:
    """The table 'Headline vs control' of the layer page."""
    out = ["## Headline vs control", ""]
    control = data.summary.control if data.summary is not None else None
    if control is None:
        text = (
            "No control: `coact analyze --control` measures every headline again on the "
            "model re-initialised."
        )
        return [*out, note(text), ""]
    rows = [
        [f.label, number(f.value, f.unit), number(f.control, f.unit), interval(f), f.basis,
         "yes" if f.informative else f"**no**, {UNINFORMATIVE}"]
        for f in control.figures.values()
    ]  # fmt: skip
    headers = [
        "figure",
        "this run",
        "control",
        "control's interval",
        "interval from",
        "informative",
    ]
    out += [
        f"Every headline beside the same figure measured on a control: {_origin(control)}. "
        "A figure inside the control's interval (or, where the control has none, within the "
        "stated tolerance of it) is **uninformative**: a network that learned nothing gives "
        "it too.",
        "",
        md_table(headers, rows) if rows else note("No headline has a counterpart in the control."),
        "",
    ]
    return out
