"""`attention_causal`: the position score's causal counterpart. Per attention feature,
what self-only attention and resampled earlier tokens change (`coact.block.self_attention`),
joined with the predictive position score where it exists; the headline counts how often
the predictive verdict and resampling agree. Writes `<run>/attention/causal/`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import polars as pl
from torch import Tensor

from coact.block.self_attention import (
    ResampleConfig,
    ResampleSummary,
    SelfOnlyConfig,
    SelfOnlySummary,
    resample_check,
    resample_summary,
    self_only_check,
    self_only_summary,
)
from coact.models.load import LoadedModel
from coact.rundir.files import atomic_write
from coact.rundir.layout import AttentionCausalFiles
from coact.rundir.results import Result, result_key
from coact.sae.base import SparseAutoencoder

RESULT_VERSION = 2  # bumped when what the causal checks write changes


@dataclass(frozen=True)
class AttentionCausalConfig:
    # evaluation contexts; resampling reruns `resample.targets` positions of each, so a
    # feature's resampled FVU rests on its activity at contexts × targets tokens
    contexts: int = 16
    self_only: SelfOnlyConfig = field(default_factory=SelfOnlyConfig)
    resample: ResampleConfig = field(default_factory=lambda: ResampleConfig(targets=16))


@dataclass(frozen=True, kw_only=True)
class AttentionCausalResult(Result):
    """Self-only attention and resampling per attention feature, and (with the position
    score) the counts of predictive verdict against resampling."""

    key: str
    layer: int
    contexts: int
    targets: int
    self_only: SelfOnlySummary
    resample: ResampleSummary
    agreement: dict[str, int] | None


def attention_causal(
    lm: LoadedModel,
    sae_out: SparseAutoencoder,
    tokens: Tensor,
    layer: int,
    out_dir: str | Path,
    config: AttentionCausalConfig = AttentionCausalConfig(),
    positions_table: Path | None = None,
) -> AttentionCausalResult:
    """Self-only attention and resampled context per feature of attn_out[layer]'s SAE,
    joined with the predictive position score (`positions_table`, when it exists)."""
    from coact.codes.collect import sae_fingerprint

    files = AttentionCausalFiles(Path(out_dir))
    tokens = tokens[: config.contexts]
    quiet = replace(
        config,
        self_only=replace(config.self_only, progress=False),
        resample=replace(config.resample, progress=False),
    )
    digest = hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest()
    inputs = [lm.fingerprint(), sae_fingerprint(sae_out), layer, digest]
    key = result_key(inputs, quiet, RESULT_VERSION)
    if (previous := AttentionCausalResult.finished(files, key)) is not None:
        return previous
    self_only = self_only_check(lm, sae_out, tokens, layer, config.self_only)
    resampled = resample_check(lm, sae_out, tokens, layer, config.resample)
    table = self_only.select(
        "feature", "active", "self_only_fvu", pl.col("kept").alias("self_only_kept")
    ).join(
        resampled.select(
            "feature", "resample_active", "resample_fvu", pl.col("kept").alias("resample_kept")
        ),
        on="feature",
    )
    resample = resample_summary(resampled)
    agreement = None
    if positions_table is not None and positions_table.is_file():
        scored = pl.read_parquet(positions_table, columns=["feature", "status", "gain_fvu"])
        table = table.join(scored.rename({"status": "position_status"}), on="feature", how="left")
        agreement = _agreement(table, resample.threshold)
    files.path.mkdir(parents=True, exist_ok=True)
    atomic_write(files.causal, table.write_parquet)
    result = AttentionCausalResult(
        key=key,
        layer=layer,
        contexts=int(tokens.shape[0]),
        targets=config.resample.targets,
        self_only=self_only_summary(self_only),
        resample=resample,
        agreement=agreement,
    )
    result.write(files.result)
    return result


def _agreement(table: pl.DataFrame, threshold: float) -> dict[str, int]:
    """Counts of the predictive verdict (same_position / needs_context) against resampling
    (context-free: resample_fvu ≤ threshold, or uses context), over features alive in both."""
    both = table.filter(
        pl.col("position_status").is_in(["same_position", "needs_context"])
        & pl.col("resample_fvu").is_finite()
    )
    free = both["resample_fvu"] <= threshold
    same = both["position_status"] == "same_position"
    return {
        "same_position_context_free": int((same & free).sum()),
        "same_position_uses_context": int((same & ~free).sum()),
        "needs_context_context_free": int((~same & free).sum()),
        "needs_context_uses_context": int((~same & ~free).sum()),
    }
