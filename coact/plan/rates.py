"""Measured seconds and peak memory of each stage of one reference run, per machine kind.

The reference is the Quickstart's job: `coact analyze --layer 3` on the embedded
SmolLM2-135M at the full budget (100k code tokens, 400k SAE tokens; the CPU's SAEs saw
100k tokens). `coact.plan.estimate`
scales each figure by the ratio of the stage's work (`coact.plan.work`) for the planned
run to its work for the reference. Every figure names the file it was read from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Rate:
    """A stage's wall seconds on the reference run, on one kind of machine."""

    seconds: float
    source: str


@dataclass(frozen=True)
class Machine:
    """A kind of machine the rates were measured on."""

    name: str
    description: str
    threads: int  # torch threads of the measurement (CPU rates scale by threads)
    rates: dict[str, Rate]
    peak_bytes: Mapping[str, float]  # tensors' peak per stage (GPU: torch's allocated peak)
    peak_source: str
    reference_sae_tokens: int = 400_000  # the reference run's SAE tokens (others: defaults)


# where each figure was read (analyses/results/ unless said)
_SAE = "convergence.json, sae ladder at 100k SAE tokens"
_README = "README, the Quickstart on a fresh clone (805 s)"
_DEVICE = "device_check.json"

# Peak GPU memory per stage on the H200 (torch's allocated peak; the model, 0.54 GB in
# float32, included): the working sets that the plan scales for every machine.
_PEAKS = {
    "train_saes": 1_649_133_568, "evaluate_saes": 1_649_133_568, "collect": 1_649_133_568,
    "connect": 1_255_309_312, "calibrate": 2_362_816_512, "jacobian": 2_329_045_504,
    "logic": 980_770_816, "outliers": 658_843_136, "ablate": 980_770_816,
    "report": 658_843_136,
}  # fmt: skip
_PEAK_SOURCE = (
    "analyses/results/device_check.json: peak_allocated_bytes_per_stage (SAEs, their "
    "evaluation and collection share one figure; ablate and report unmeasured: logic's and "
    "outliers')"
)

CPU = Machine(
    name="cpu-2core",
    description="2 CPU cores (Xeon, AVX-512), torch with 2 threads",
    threads=2,
    rates={
        "train_saes": Rate(25.8, _SAE),
        "evaluate_saes": Rate(27.5, _SAE),
        "collect": Rate(15.9, _SAE),
        "connect": Rate(81.4, _SAE),
        "calibrate": Rate(149.3, _SAE),
        "jacobian": Rate(21.6, _SAE),
        "logic": Rate(88.0, _README),
        "outliers": Rate(10.0, "unmeasured on CPU: the H200's × the collect ratio"),
        "ablate": Rate(79.0, _README),
        "report": Rate(45.0, _README),
    },
    peak_bytes=_PEAKS,
    peak_source=_PEAK_SOURCE,
    reference_sae_tokens=100_000,
)

H200 = Machine(
    name="h200",
    description="one NVIDIA H200 (141 GB), float32 without TF32",
    threads=0,
    rates={
        "train_saes": Rate(5.64, _DEVICE),
        "evaluate_saes": Rate(2.36, _DEVICE),
        "collect": Rate(1.58, _DEVICE),
        "connect": Rate(11.72, _DEVICE),
        "calibrate": Rate(4.51, _DEVICE),
        "jacobian": Rate(4.21, _DEVICE),
        "logic": Rate(23.13, _DEVICE),
        "outliers": Rate(1.16, _DEVICE),
        "ablate": Rate(79.0, "unmeasured on a GPU: the CPU's"),
        "report": Rate(45.0, "unmeasured on a GPU: the CPU's"),
    },
    peak_bytes=_PEAKS,
    peak_source=_PEAK_SOURCE,
)

MACHINES = {m.name: m for m in (CPU, H200)}
BASE_HOST_BYTES = 0.54 * GB  # a process with coact's pipeline and report imported (ru_maxrss)


def machine_for(device: str) -> Machine:
    """The measured machine kind closest to `device`: a GPU's rates are the H200's."""
    return H200 if device.startswith("cuda") else CPU
