"""The plan of a run: per stage the seconds, host and device memory expected, the store's
and the SAEs' size on disk. Each figure is a measured one (`coact.plan.rates`) scaled by
the ratio of the planned run's work to the reference run's (`coact.plan.work`)."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

from coact.pipeline.config import BLOCK_STAGES, AnalyzeConfig
from coact.plan.rates import BASE_HOST_BYTES, Machine, machine_for
from coact.plan.shape import ModelShape, model_shape, reference_shape
from coact.plan.work import memory_work, run_shape, stage_work

SHARED_STAGES = ("train_saes", "evaluate_saes", "collect")  # once per run, before layers
# the layer stages with measured rates; the others (the block's) are listed without time
RATED = ("connect", "calibrate", "jacobian", "logic", "outliers", "ablate", "report")
CONTROL_STAGES = ("train_saes", "evaluate_saes", "collect", "connect", "jacobian", "logic")


@dataclass(frozen=True)
class StagePlan:
    """One stage's expected cost; seconds is None where no rate was measured."""

    stage: str
    seconds: float | None
    host_bytes: float
    device_bytes: float | None  # None on a CPU run
    source: str


@dataclass(frozen=True)
class Plan:
    """What a run will cost on this machine, before anything is loaded."""

    model: str
    device: str
    machine: str
    machine_description: str
    layers: tuple[int, ...]
    sites: int
    tokens: int
    stages: tuple[StagePlan, ...]
    store_bytes: float
    sae_bytes: float
    run_dir: str

    @property
    def seconds(self) -> float:
        return sum(s.seconds or 0.0 for s in self.stages)

    @property
    def host_bytes(self) -> float:
        return max(s.host_bytes for s in self.stages)

    @property
    def device_bytes(self) -> float | None:
        values = [s.device_bytes for s in self.stages if s.device_bytes is not None]
        return max(values) if values else None

    @property
    def disk_bytes(self) -> float:
        return self.store_bytes + self.sae_bytes


def reference(machine: Machine) -> tuple[AnalyzeConfig, ModelShape]:
    """The run the machine's rates were measured on."""
    return _reference(machine.reference_sae_tokens), reference_shape()


@functools.cache
def _reference(sae_tokens: int) -> AnalyzeConfig:
    return dataclasses.replace(AnalyzeConfig(), sae_tokens=sae_tokens).resolved()


def store_bytes(config: AnalyzeConfig, shape: ModelShape) -> float:
    """The code store on disk: per stored token and site, k (index, value) pairs and a row
    pointer; per token a table row of four int32 columns (`coact.codes.store`)."""
    run = run_shape(config, shape)
    index = 2 if run.width <= 32767 else 4
    value = {"float32": 4, "float16": 2, "bfloat16": 2}[config.collect.values_dtype]
    per_site = config.sae.k * (index + value) + 8
    return float(run.tokens * (len(run.sites) * per_site + 16))


def sae_bytes(config: AnalyzeConfig, shape: ModelShape) -> float:
    """Trained SAEs on disk: encoder, decoder, biases and thresholds in float32."""
    run = run_shape(config, shape)
    d, w = shape.d_model, run.width
    return float(run.trained * 4 * (2 * d * w + 2 * w + d))


def _threads_factor(machine: Machine, device: str, threads: int | None) -> float:
    """CPU rates scale with the threads torch uses here (at most the cores)."""
    if device.startswith("cuda") or not machine.threads:
        return 1.0
    here = threads or min(torch.get_num_threads(), os.cpu_count() or 1)
    return machine.threads / max(1, here)


def _stage(
    stage: str,
    config: AnalyzeConfig,
    shape: ModelShape,
    machine: Machine,
    model_bytes: float,
    threads: int | None = None,
) -> StagePlan:
    ref_config, ref_shape = reference(machine)
    rate = machine.rates[stage]
    ratio = stage_work(stage, config, shape) / stage_work(stage, ref_config, ref_shape)
    seconds = rate.seconds * ratio * _threads_factor(machine, config.device, threads)
    ref_model = ref_shape.params * 4
    working = max(0.0, machine.peak_bytes[stage] - ref_model)
    working *= memory_work(stage, config, shape) / memory_work(stage, ref_config, ref_shape)
    cuda = config.device.startswith("cuda")
    host = BASE_HOST_BYTES + model_bytes + (0.0 if cuda else working)
    device = model_bytes + working if cuda else None
    return StagePlan(stage, seconds, host, device, rate.source)


def make_plan(
    config: AnalyzeConfig, shape: ModelShape | None = None, threads: int | None = None
) -> Plan:
    """The plan of `config` (as `coact analyze` would run it), from the model's config;
    CPU times for `threads` torch threads (default: this process's, at most the cores)."""
    if config.layers:  # a model run always runs the block stages (coact.pipeline.run)
        config = config.with_stages(add=BLOCK_STAGES)
    config = config.resolved()
    shape = shape or model_shape(config.model)
    machine = machine_for(config.device)
    run = run_shape(config, shape)
    dtype = getattr(config, "dtype", "float32")
    model_bytes = float(shape.params * (2 if dtype == "bfloat16" else 4))
    names = [s for s in SHARED_STAGES if s != "train_saes" or run.trained]
    names += [s for s in RATED if config.runs(s)]
    stages = [_stage(s, config, shape, machine, model_bytes, threads) for s in names]
    for stage in config.stages:
        if stage not in RATED and stage != "report":
            base = BASE_HOST_BYTES + model_bytes
            device = model_bytes if config.device.startswith("cuda") else None
            stages.append(StagePlan(stage, None, base, device, "no measured rate"))
    if config.control:
        parts = [_stage(s, config, shape, machine, model_bytes, threads) for s in CONTROL_STAGES]
        seconds = sum(p.seconds or 0.0 for p in parts)
        host = max(p.host_bytes for p in parts)
        device = max((p.device_bytes or 0.0 for p in parts), default=0.0)
        stages.append(
            StagePlan("control", seconds, host, device or None, "the control's stages, as above")
        )
    extra = 2 if config.control else 1  # the control stores its own SAEs and codes
    return Plan(
        model=config.model,
        device=config.device,
        machine=machine.name,
        machine_description=machine.description,
        layers=run.layers,
        sites=len(run.sites),
        tokens=run.tokens,
        stages=tuple(stages),
        store_bytes=extra * store_bytes(config, shape),
        sae_bytes=extra * sae_bytes(config, shape),
        run_dir=str(config.resolved_run_dir()),
    )
