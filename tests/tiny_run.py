"""The settings of a tiny finished run with every stage (tiny-llama, a few thousand
tokens, small SAEs and connectors): seconds instead of minutes, for report and browser
tests that need a real run directory."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from coact.calibrate.stage import CalibrateConfig
from coact.codes.collect import CollectConfig
from coact.connectors.config import MLP_FIT, ConnectConfig
from coact.connectors.exact import LassoPathConfig
from coact.jacobian.stage import JacobianConfig
from coact.logic.stage import SAE_CONNECTOR, LabelsConfig
from coact.pipeline.config import AnalyzeConfig
from coact.sae.train import SaeTrainConfig


def tiny_config(run_dir: str | Path, **overrides: Any) -> AnalyzeConfig:
    """A tiny run of layer 1 into `run_dir`; `overrides` replace any AnalyzeConfig field."""
    settings: dict[str, Any] = {
        "model": "tiny-llama",
        "layer": 1,
        "tokens": 2_000,
        "sae_tokens": 3_000,
        "eval_contexts": 4,
        "ctx_len": 32,
        "run_dir": str(run_dir),
        "sae": SaeTrainConfig(k=8, buffer_contexts=16, batch_tokens=128),
        "collect": CollectConfig(forward_batch=8, shard_contexts=16),
        "connect": ConnectConfig(
            path=LassoPathConfig(n_alphas=6),
            mlp=replace(MLP_FIT, hidden=64, epochs=2),
            progress=False,
        ),
        "calibrate": CalibrateConfig(
            contexts=4,
            strengths=(0.0, 0.3),
            n_taus=2,
            n_boot=100,
            causal_connections=5,
            progress=False,
        ),
        "jacobian": JacobianConfig(progress=False),
        "logic": LabelsConfig(
            sae_connector=replace(SAE_CONNECTOR, hidden=32, epochs=1), progress=False
        ),
    }
    settings.update(overrides)
    return AnalyzeConfig(**settings)
