"""The plain-text summary printed at the end of `coact analyze` / `just analyze`."""

from __future__ import annotations

from typing import Any


def format_summary(summary: dict[str, Any]) -> str:
    """A few readable lines; the same figures are in summary.json."""
    lines = [
        f"coact analyze: {summary['model']}, layer {summary['layer']}, corpus {summary['corpus']}",
        f"  feature codes: {summary['tokens']:,} tokens",
    ]
    for site, s in summary["sites"].items():
        lines.append(
            f"  {site:<14} width {s['width']:>6}  FVE {s['fve']:.3f}  L0 {s['l0']:.1f}  "
            f"dead {100 * s['dead_fraction']:.1f}%  CE recovered {100 * s['ce_recovered']:.1f}% "
            f"(clean {s['ce_clean']:.3f}, spliced {s['ce_spliced']:.3f}, "
            f"ablated {s['ce_ablated']:.3f} nats; {s['n_tokens']:,} eval tokens)"
        )
    lines.append(f"  total time {summary['timings']['total_s']:.0f} s")
    lines.append(f"  run directory: {summary['run_dir']}  (summary.json inside)")
    return "\n".join(lines)
