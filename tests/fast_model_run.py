"""The cheapest model run with every layer stage and a report (tiny-llama, two layers, a
few hundred tokens, one feature page per layer), and a comparison of two run directories
file by file: the executor and claims tests run it several ways and compare."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from coact.block.stage import BlockConfig
from coact.calibrate.stage import CalibrateConfig
from coact.pipeline.config import AnalyzeConfig
from coact.rundir.layout import ReportFiles, StageFiles
from tests.tiny_run import tiny_config

LAYERS = (0, 1)
STAMP, INPUTS_STAMP = StageFiles.stamp_name, ReportFiles(Path()).inputs.name
TIMING_ROW = re.compile(rb"(\w+_s)( \| |</td>\s*<td>)[0-9.]+")  # a page's timings table
# what differs between two runs of the same settings: how long they took, and where
# and what this call trained and evaluated itself, or found finished
TIMING_KEYS = (
    "seconds", "timings", "total_s", "layers_finished_before", "saes_trained_now",
    "saes_evaluated_now",
)  # fmt: skip


def fast_model_config(run_dir: str | Path, **overrides: Any) -> AnalyzeConfig:
    """A model run over LAYERS of tiny-llama, its stages cut to the bone (connect, the
    block stages, the report)."""
    base = tiny_config(run_dir)
    block = BlockConfig()
    block = replace(
        block,
        positions=replace(block.positions, ridge=(3.0,), progress=False),
        causal=replace(
            block.causal, contexts=2, resample=replace(block.causal.resample, targets=2)
        ),
        decoded=replace(block.decoded, contexts=2),
        composition=replace(block.composition, path=replace(block.composition.path, n_alphas=3)),
    )
    settings: dict[str, Any] = {
        "layers": LAYERS,
        "tokens": 600,
        "sae_tokens": 900,
        "eval_contexts": 2,
        "stages": ("connect", "report"),
        "report_features": 1,
        "calibrate": CalibrateConfig(
            contexts=2,
            strengths=(0.0, 0.3),
            n_taus=2,
            n_boot=20,
            causal_connections=2,
            progress=False,
        ),
        "connect": replace(base.connect, stability=False),
        "block": block,
    }
    settings.update(overrides)
    return replace(base, **settings)


def run_tree(run_dir: Path) -> dict[str, Any]:
    """Every file of a run by its relative path, as far as two runs of the same settings
    agree: the run's own path, timings (JSON keys, the pages' timing tables, the stamps'
    file times) and claims taken out; a safetensors file as its tensors and metadata (its
    header orders the metadata as it likes); JSON as read."""
    root = str(run_dir.resolve())
    tree: dict[str, Any] = {}
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir).as_posix()
        if not path.is_file() or ".claims" in path.parts or path.name == INPUTS_STAMP:
            continue
        data = path.read_bytes().replace(root.encode(), b"<run>")
        if path.suffix == ".json":
            tree[relative] = _untimed(json.loads(data))
            if path.name == STAMP:
                tree[relative] = _stamp(tree[relative])
        elif path.suffix == ".safetensors":
            tree[relative] = _tensors(path)
        elif path.suffix in (".md", ".html"):
            tree[relative] = TIMING_ROW.sub(rb"\1\2<seconds>", data)
        else:
            tree[relative] = data
    return tree


def _stamp(stamp: Any) -> Any:
    """A stage folder's stamp (name → size, time, sha256): the sha256 of its tables only
    (its JSON and safetensors files are compared as read, above)."""
    files = stamp.get("files", {}) if isinstance(stamp, dict) else {}
    return {
        name: entry[-1]
        for name, entry in files.items()
        if not name.endswith((".json", ".safetensors"))
    }


def _tensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k).numpy().tobytes() for k in handle.keys()}  # noqa: SIM118
        return {"metadata": dict(sorted((handle.metadata() or {}).items())), **tensors}


def _untimed(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _untimed(v)
            for k, v in value.items()
            if k not in TIMING_KEYS and not k.endswith("_s")
        }
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The relative paths whose contents differ, or that only one side has."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
