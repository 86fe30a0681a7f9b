"""How much work each stage of a run does, in units that its time and memory scale by:
multiply-adds per token of the forward passes it makes, tokens × features for the fits,
features for the labels. Only ratios between two runs are used (`coact.plan.estimate`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from coact.models.sites import Site, SiteKind
from coact.pipeline.config import AnalyzeConfig
from coact.plan.shape import ModelShape

BLOCK_ROLES: tuple[SiteKind, ...] = ("resid_pre", "attn_out", "mlp_resid", "mlp_out")


@dataclass(frozen=True)
class RunShape:
    """What a config asks of a model: layers, sites, SAEs to train, widths and tokens."""

    layers: tuple[int, ...]
    sites: tuple[Site, ...]  # distinct activations with an SAE (aliases merged)
    trained: int  # SAEs to train (the rest are given)
    width: int
    tokens: int  # stored code tokens (whole contexts, BOS not stored)
    deepest: int  # the deepest block a collection runs to


def run_shape(config: AnalyzeConfig, shape: ModelShape) -> RunShape:
    """The layers, sites and sizes of `config` on a model of `shape`."""
    if config.layers == "all":
        layers: tuple[int, ...] = tuple(range(shape.n_layers))
    elif config.layers:
        layers = tuple(config.layers)  # type: ignore[arg-type]
    else:
        layers = (config.layer,)
    block = any(config.runs(s) for s in ("attention", "positions", "composition"))
    sites: dict[Site, None] = {}
    for layer in layers:
        kinds: tuple[SiteKind, ...] = BLOCK_ROLES if block else ("mlp_resid", "mlp_out")
        for kind in kinds:
            if kind == "mlp_resid" and shape.parallel:
                kind = "resid_pre"  # the same activation: one SAE
            sites[Site(kind, layer)] = None
        if block and layer + 1 <= shape.n_layers:
            sites[Site("resid_pre", layer + 1)] = None
    given = sum(1 for s in (config.sae_in, config.sae_out) if s) if len(layers) == 1 else 0
    per_context = config.ctx_len - 1
    return RunShape(
        layers=layers,
        sites=tuple(sites),
        trained=max(0, len(sites) - given),
        width=config.sae.expansion * shape.d_model,
        tokens=math.ceil(config.tokens / per_context) * per_context,
        deepest=min(max(s.layer for s in sites), shape.n_layers - 1),
    )


def per_token(shape: ModelShape, ctx_len: int, through: int | None = None) -> float:
    """Multiply-adds per token of a forward pass through block `through` (None: the whole
    model and its logits): the blocks' weights, attention over the context, the LM head."""
    block = shape.block_params + ctx_len * shape.d_model
    if through is None:
        return shape.n_layers * block + shape.head_params
    return (through + 1) * block


def stage_work(stage: str, config: AnalyzeConfig, shape: ModelShape) -> float:
    """The work of `stage` (all layers together) in its own scaling unit."""
    run = run_shape(config, shape)
    d, w, n = shape.d_model, run.width, len(run.layers)
    ctx = config.ctx_len
    if stage == "train_saes":
        passes = math.ceil(run.trained / config.sae_group) if run.trained else 0
        sae = run.trained * 6 * d * w  # encode and decode, forward and backward
        return config.sae_tokens * (passes * per_token(shape, ctx, run.deepest) + sae)
    if stage == "evaluate_saes":
        forward = per_token(shape, ctx) + d * w
        return config.eval_contexts * ctx * len(run.sites) * forward
    if stage == "collect":
        return run.tokens * (per_token(shape, ctx, run.deepest) + len(run.sites) * d * w)
    if stage == "calibrate":
        cal = config.calibrate
        passes = len(cal.strengths) * len(cal.noise_kinds) + cal.n_taus + 1
        return n * cal.contexts * ctx * passes * per_token(shape, ctx)
    if stage == "jacobian":
        return n * run.tokens * config.connect.heldout_fraction * d * w
    if stage == "logic":
        connector = 1.0 if config.logic.sae_connector is not None else 15.0 / 88.0
        return n * run.tokens * w * connector
    if stage in ("connect", "outliers"):
        return n * run.tokens * w
    if stage == "ablate":
        ab = config.ablation
        depth = sum(per_token(shape, ctx, layer) for layer in run.layers)
        return config.report_features * ab.contexts * ab.window * ctx * depth
    if stage == "report":
        return float(n * config.report_features)
    raise ValueError(f"no work measure for stage {stage!r}")


def memory_work(stage: str, config: AnalyzeConfig, shape: ModelShape) -> float:
    """What a stage's working memory (beyond the model's weights) scales by."""
    run = run_shape(config, shape)
    d, w, k = shape.d_model, run.width, config.sae.k
    if stage in ("train_saes", "evaluate_saes", "collect"):
        return min(max(run.trained, 1), config.sae_group) * d * w + run.tokens * k
    if stage == "connect":
        return w * w + run.tokens * k
    if stage == "calibrate":
        return config.calibrate.batch_size * config.ctx_len * shape.vocab + d * w
    if stage == "jacobian":
        return d * w + run.tokens * k
    if stage == "ablate":
        return config.ablation.batch_size * config.ctx_len * shape.vocab
    return float(run.tokens * k)
