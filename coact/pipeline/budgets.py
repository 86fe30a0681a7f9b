"""Budgets: one place that scales every stage's settings for a run of a given size."""

from __future__ import annotations

import dataclasses

from coact.errors import CoactError
from coact.pipeline.config import AnalyzeConfig

BUDGETS = ("full", "survey")


def with_budget(config: AnalyzeConfig, budget: str) -> AnalyzeConfig:
    """`full`: the config as given. `survey`: budgets that fit every layer of a small
    model on a laptop CPU in a few hours: fewer code and SAE tokens, smaller SAE batches
    (so the SAEs still take a few hundred steps), 64 SAEs per pass over the model (each
    pass is a forward to its deepest site: with 16, SmolLM2's 121 SAEs cost five whole
    forward passes over the training tokens, with 64 one and a half; about 5 GB; a
    `sae_group` set by hand is kept), fewer evaluation and calibration contexts, noise
    strengths (isotropic noise only) and candidate τ, two contexts per feature for the
    report's context ablation (and one top input each), a shorter composition path (10 α
    down to 0.05 × the largest: its 6912 inputs make the small α the costly ones), no
    sae-connector, no two-halves refit of the sparse connectors, three ridge λ for the
    position score, 8 × 8 resampled attention contexts (each a forward pass to the layer:
    the deepest layers' costliest stage at 16 × 16), and pages for the top 10 features of
    each layer."""
    if budget not in BUDGETS:
        raise CoactError(f"unknown budget {budget!r}: choose one of {', '.join(BUDGETS)}")
    if budget == "full":
        return config
    replace = dataclasses.replace
    block, composition = config.block, config.block.composition
    return replace(
        config,
        tokens=40_000,
        sae_tokens=120_000,
        eval_contexts=8,
        sae=replace(config.sae, batch_tokens=512, dead_after_tokens=50_000),
        sae_group=64 if config.sae_group == AnalyzeConfig.sae_group else config.sae_group,
        calibrate=replace(
            config.calibrate,
            contexts=8,
            strengths=(0.0, 0.03, 0.3, 1.0),
            noise_kinds=("isotropic",),
            n_taus=4,
        ),
        ablation=replace(config.ablation, contexts=2, input_contexts=1, inputs_per_feature=1),
        connect=replace(config.connect, stability=False),
        logic=replace(config.logic, sae_connector=None),
        block=replace(
            block,
            decoded=replace(block.decoded, contexts=8),
            causal=replace(
                block.causal, contexts=8, resample=replace(block.causal.resample, targets=8)
            ),
            positions=replace(block.positions, ridge=(0.3, 3.0, 30.0)),
            composition=replace(
                composition,
                path=replace(composition.path, n_alphas=10, alpha_min_ratio=0.05),
            ),
        ),
        report_features=10,
    )
