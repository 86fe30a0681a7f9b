"""Whether a plan fits this machine: free host memory, free disk where the run directory
will be, free memory of the GPU it names. A run that cannot fit stops before anything
loads, with one line saying what to change."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from coact.errors import CoactError
from coact.plan.estimate import Plan
from coact.plan.rates import GB

# what to change when a stage's memory does not fit
ADVICE = {
    "train_saes": "train fewer SAEs per pass (a smaller sae_group) or pass --layers in parts",
    "evaluate_saes": "train fewer SAEs per pass (a smaller sae_group)",
    "collect": "lower --tokens",
    "connect": "lower --tokens",
    "calibrate": "use --budget survey (fewer calibration contexts)",
    "jacobian": "lower --tokens",
    "control": "leave out --control",
}


@dataclass(frozen=True)
class Resources:
    """Free memory and disk, in bytes (gpu None: no GPU named, or none visible)."""

    ram: float
    disk: float
    gpu: float | None


def free_resources(run_dir: str, device: str) -> Resources:
    """What is free now: RAM, disk on the run directory's file system, the GPU's memory."""
    where = Path(run_dir).resolve()
    while not where.exists():
        where = where.parent
    gpu = None  # no GPU asked for, or none visible here (a GPU run planned from elsewhere)
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = float(torch.cuda.mem_get_info(torch.device(device))[0])
    return Resources(
        float(psutil.virtual_memory().available), float(shutil.disk_usage(where).free), gpu
    )


def problems(plan: Plan, free: Resources) -> list[str]:
    """One line per thing that does not fit (empty: the run fits)."""
    found = []
    host = max(plan.stages, key=lambda s: s.host_bytes)
    if host.host_bytes > free.ram:
        found.append(
            f"the run needs {host.host_bytes / GB:.1f} GB of memory at {host.stage} but "
            f"{free.ram / GB:.1f} GB is free: {ADVICE.get(host.stage, 'lower --tokens')}"
        )
    if free.gpu is not None and plan.device_bytes is not None and plan.device_bytes > free.gpu:
        worst = max(plan.stages, key=lambda s: s.device_bytes or 0.0)
        found.append(
            f"the run needs {plan.device_bytes / GB:.1f} GB of GPU memory at {worst.stage} "
            f"but {free.gpu / GB:.1f} GB is free on {plan.device}: "
            f"{ADVICE.get(worst.stage, 'lower --tokens')}, or use --device cpu"
        )
    if plan.disk_bytes > free.disk:
        found.append(
            f"the run writes {plan.disk_bytes / GB:.1f} GB (codes and SAEs) but "
            f"{free.disk / GB:.1f} GB is free under {plan.run_dir}: lower --tokens or "
            "pass a --run-dir on a larger disk"
        )
    return found


def require_fit(plan: Plan, free: Resources | None = None) -> None:
    """Stop with one line (a CoactError) when the plan does not fit this machine."""
    found = problems(plan, free or free_resources(plan.run_dir, plan.device))
    if found:
        raise CoactError(found[0])
