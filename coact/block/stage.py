"""`block`: the block's other connections besides the MLP: attention and the skip path.

For block ℓ, from the same code store the MLP stages read:

    attention/connect/     attn_out[ℓ] features from resid_pre[ℓ] features at the same
                           position: every connector family and the linearity table
                           (`coact.connectors.stage`)
    attention/positions/   per attention feature, how much earlier positions add over the
                           same-position fit (`coact.block.positions`)
    composition/           resid_pre[ℓ+1] features from resid_pre[ℓ], attn_out[ℓ] and
                           mlp_out[ℓ] features (`coact.block.composition`), and decoded.parquet:
                           how close the decoded composition and the identity through the
                           SAEs come to the true next stream, on raw activations
    block.json             the headline (written last)

    attention/calibrate/   attention's own τ: noise and splices at attn_out[ℓ]
                           (`coact.calibrate.stage`), as the MLP's τ is calibrated at mlp_out[ℓ]
    attention/causal/      the position score's causal counterpart: per attention feature,
                           what self-only attention and resampled earlier tokens change
                           (`coact.block.self_attention`), beside the predictive score

The attention connectors are fitted at the run's connect τ (the seed's, as the MLP's are)
and read at attention's calibrated τ, in the same form; so are the position scores. A τ
is a tolerance on one site's error, and sites differ in how much error the loss notices,
so each site gets its own. Without attention calibration the MLP's τ is used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl
import torch
from torch import Tensor

from coact.block.composition import CompositionConfig, CompositionConnector, compose, decoded_check
from coact.block.positions import PositionsConfig, positions
from coact.block.self_attention import (
    ResampleConfig,
    SelfOnlyConfig,
    resample_check,
    resample_summary,
    self_only_check,
    self_only_summary,
)
from coact.calibrate.stage import CalibrateConfig, calibrate
from coact.codes.store import CodeStore
from coact.connectors.stage import ConnectConfig, connect
from coact.linearity.table import LinearityConfig, percent_linear, relabel
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.rundir.files import atomic_write, finished_result
from coact.sae.base import Sae, SparseAutoencoder

Decode = Callable[[list[int]], str]


@dataclass(frozen=True)
class BlockConfig:
    attention: bool = True  # attention connectors and the position score
    calibrate: bool = True  # attention's own τ (needs the run's calibration settings)
    composition: bool = True  # the next residual stream from the block's three sources
    # None: the run's own connect settings (the MLP's), so both are fitted alike; its
    # sites, seed, device and τ are set per layer
    attention_connect: ConnectConfig | None = None
    positions: PositionsConfig = field(
        default_factory=lambda: PositionsConfig(in_site="", out_site="")
    )
    composition_settings: CompositionConfig = field(
        default_factory=lambda: CompositionConfig(layer=-1)
    )
    causal: bool = True  # self-only attention and resampled context per attention feature
    # evaluation contexts for them; resampling reruns `resample.targets` positions of each,
    # so a feature's resampled FVU rests on its activity at contexts × targets tokens
    causal_contexts: int = 16
    self_only: SelfOnlyConfig = field(default_factory=SelfOnlyConfig)
    resample: ResampleConfig = field(default_factory=lambda: ResampleConfig(targets=16))
    decoded_contexts: int = 16  # evaluation contexts for the decoded identity check
    decoded_batch: int = 8  # contexts per forward pass there


def block_sites(layer: int) -> dict[str, Site]:
    """The roles of a block's sites: what attention reads and writes, what the MLP reads and
    writes, and the next residual stream. For parallel-residual models mlp_resid[ℓ] is the
    same activation as resid_pre[ℓ]; the pipeline gives both names one SAE."""
    return {
        "attn_in": Site("resid_pre", layer),
        "attn_out": Site("attn_out", layer),
        "mlp_in": Site("mlp_resid", layer),
        "mlp_out": Site("mlp_out", layer),
        "next": Site("resid_pre", layer + 1),
    }


def analyze_block(
    lm: LoadedModel,
    saes: Mapping[Site, Sae],
    store: CodeStore,
    eval_tokens: Tensor,
    layer: int,
    out_dir: str | Path,
    config: BlockConfig = BlockConfig(),
    *,
    linearity: LinearityConfig | None = None,
    connect_settings: ConnectConfig | None = None,
    calibrate_settings: CalibrateConfig | None = None,
    seed: int = 0,
    device: str = "cpu",
    decode: Decode | None = None,
) -> dict[str, Any]:
    """Run the block's attention and composition stages into `out_dir`; return the headline.
    Each stage reuses its finished result, so a killed run resumes where it stopped.
    `connect_settings` fits the attention connectors unless `config.attention_connect`
    overrides it; `linearity` is the MLP's calibrated τ, used for attention when
    `calibrate_settings` is None or `config.calibrate` is off."""
    out_dir = Path(out_dir)
    sites = block_sites(layer)
    linearity = linearity or LinearityConfig()
    summary: dict[str, Any] = {
        "layer": layer, "tau": linearity.tau, "form": linearity.form, "mlp_tau": linearity.tau
    }  # fmt: skip
    base = config.attention_connect or connect_settings or ConnectConfig(in_site="", out_site="")
    if config.attention:
        settings = replace(
            base,
            in_site=str(sites["attn_in"]),
            out_site=str(sites["attn_out"]),
            seed=seed,
            device=device,
        )
        connect_dir = out_dir / "attention" / "connect"
        attention = connect(store, settings, connect_dir, decode=decode)
        attention.pop("key", None)
        if config.calibrate and calibrate_settings is not None:
            calibration = calibrate(
                lm,
                saes[sites["attn_in"]],
                saes[sites["attn_out"]],
                eval_tokens,
                connect_dir,
                out_dir / "attention" / "calibrate",
                replace(
                    calibrate_settings,
                    layer=layer,
                    in_site=str(sites["attn_in"]),
                    out_site=str(sites["attn_out"]),
                    seed=seed,
                ),
            )
            linearity = replace(
                settings.linearity, tau=float(calibration["tau"]), form=calibration["form"]
            )
            keep = ("tau", "form", "tolerance", "n_contexts", "n_tokens", "splices")
            summary["attention_calibration"] = {k: calibration[k] for k in keep}
        summary.update(tau=linearity.tau, form=linearity.form)
        features = pl.read_parquet(connect_dir / "features.parquet")
        attention.update(percent_linear(relabel(features, linearity)))
        attention.update(tau=linearity.tau, form=linearity.form)
        scored = positions(
            store,
            replace(
                config.positions,
                in_site=str(sites["attn_in"]),
                out_site=str(sites["attn_out"]),
                seed=seed,
                heldout_fraction=settings.heldout_fraction,
                linearity=linearity,
            ),
            out_dir / "attention" / "positions",
        )
        scored.pop("key", None)
        summary["attention"] = attention
        summary["positions"] = scored
        if config.causal:
            summary["attention_causal"] = _attention_causal(
                lm, saes[sites["attn_out"]], eval_tokens, layer, out_dir / "attention", config
            )
    if config.composition:
        settings_c = replace(
            config.composition_settings,
            layer=layer,
            seed=seed,
            heldout_fraction=base.heldout_fraction,
        )
        composed = compose(store, settings_c, out_dir / "composition")
        composed.pop("key", None)
        checks = _decoded(lm, saes, eval_tokens, out_dir / "composition", config, layer)
        composed["decoded_fvu"] = dict(checks.select("check", "fvu").iter_rows())
        summary["composition"] = composed
    atomic_write(out_dir / "block.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    return summary


@torch.no_grad()
def _decoded(
    lm: LoadedModel,
    saes: Mapping[Site, SparseAutoencoder],
    tokens: Tensor,
    composition_dir: Path,
    config: BlockConfig,
    layer: int,
) -> Any:
    """decoded_check on the first evaluation contexts; written to decoded.parquet."""
    connector = CompositionConnector.load(composition_dir)
    wanted = {*connector.sources, connector.target, *block_sites(layer).values()}
    sites = sorted(wanted - {Site("mlp_resid", layer)}, key=lm.adapter.order_key)
    tokens = tokens[: config.decoded_contexts]
    parts: dict[Site, list[Tensor]] = {site: [] for site in sites}
    for start in range(0, tokens.shape[0], config.decoded_batch):
        acts = capture(lm, tokens[start : start + config.decoded_batch], sites)
        for site in sites:
            parts[site].append(acts[site].float())
    acts_all = {site: torch.cat(chunks) for site, chunks in parts.items()}
    table = decoded_check(acts_all, saes, connector, layer=layer)
    atomic_write(composition_dir / "decoded.parquet", table.write_parquet)
    return table


CAUSAL_VERSION = 1  # bumped when what the causal checks write changes


def _attention_causal(
    lm: LoadedModel,
    sae_out: Sae,
    tokens: Tensor,
    layer: int,
    attention_dir: Path,
    config: BlockConfig,
) -> dict[str, Any]:
    """Self-only attention and resampled context per attention feature, joined with the
    predictive position score (`causal/causal.parquet`); the headline (`causal.json`)
    counts how often the predictive verdict and resampling agree."""
    from coact.codes.collect import sae_fingerprint

    out = attention_dir / "causal"
    tokens = tokens[: config.causal_contexts]
    key = hashlib.sha256(
        json.dumps(
            [lm.fingerprint(), sae_fingerprint(sae_out), layer, CAUSAL_VERSION,
             hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest(),
             asdict(replace(config.self_only, progress=False)),
             asdict(replace(config.resample, progress=False))],
            sort_keys=True,
        ).encode()
    ).hexdigest()  # fmt: skip
    if (previous := finished_result(out / "causal.json", key, ["causal.parquet"])) is not None:
        return previous
    self_only = self_only_check(lm, sae_out, tokens, layer, config.self_only)
    resampled = resample_check(lm, sae_out, tokens, layer, config.resample)
    table = self_only.select("feature", "active", "self_only_fvu", pl.col("kept").alias(
        "self_only_kept"
    )).join(
        resampled.select(
            "feature", "resample_active", "resample_fvu", pl.col("kept").alias("resample_kept")
        ),
        on="feature",
    )  # fmt: skip
    positions_path = attention_dir / "positions" / "positions.parquet"
    summary: dict[str, Any] = {
        "layer": layer,
        "contexts": int(tokens.shape[0]),
        "targets": config.resample.targets,
        "self_only": self_only_summary(self_only),
        "resample": resample_summary(resampled),
    }
    if positions_path.is_file():
        scored = pl.read_parquet(positions_path, columns=["feature", "status", "gain_fvu"])
        table = table.join(scored.rename({"status": "position_status"}), on="feature", how="left")
        summary["agreement"] = _agreement(table, summary["resample"]["threshold"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "causal.parquet", table.write_parquet)
    summary["key"] = key
    atomic_write(out / "causal.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    return summary


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
