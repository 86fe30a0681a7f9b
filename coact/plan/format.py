"""The plan as the text `coact plan` prints: a table of stages and the run's totals."""

from __future__ import annotations

from coact.plan.estimate import Plan
from coact.plan.fit import Resources, problems
from coact.plan.rates import GB


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def format_plan(plan: Plan, free: Resources) -> str:
    """Per stage: time, host and device memory; then disk, totals and whether it fits."""
    layers = (
        ", ".join(map(str, plan.layers))
        if len(plan.layers) <= 6
        else (f"{plan.layers[0]}–{plan.layers[-1]} ({len(plan.layers)} layers)")
    )
    lines = [
        f"plan: {plan.model}, layer {layers}, {plan.sites} sites, {plan.tokens:,} code tokens, "
        f"on {plan.device} (rates measured on {plan.machine}: {plan.machine_description})",
        f"{'stage':<20}{'time':>10}{'host GB':>10}{'device GB':>11}  rate measured in",
    ]
    for s in plan.stages:
        device = "-" if s.device_bytes is None else f"{s.device_bytes / GB:.2f}"
        lines.append(
            f"{s.stage:<20}{_time(s.seconds):>10}{s.host_bytes / GB:>10.2f}{device:>11}  {s.source}"
        )
    unrated = [s.stage for s in plan.stages if s.seconds is None]
    total = _time(plan.seconds) + (f" (+ {', '.join(unrated)}: unmeasured)" if unrated else "")
    lines.append(f"total time {total}")
    lines.append(
        f"disk: code store {plan.store_bytes / GB:.3f} GB, SAEs {plan.sae_bytes / GB:.3f} GB "
        f"under {plan.run_dir} ({free.disk / GB:.0f} GB free)"
    )
    gpu = "" if free.gpu is None else f", GPU {free.gpu / GB:.1f} GB free"
    if free.gpu is None and plan.device.startswith("cuda"):
        gpu = ", no GPU visible here: its memory is not checked"
    lines.append(
        f"memory: peak host {plan.host_bytes / GB:.2f} GB ({free.ram / GB:.1f} GB free{gpu})"
    )
    found = problems(plan, free)
    lines.append("fits: yes" if not found else "fits: NO: " + "; ".join(found))
    return "\n".join(lines)
