"""`block`: the block's other connections besides the MLP: attention and the skip path.

For block ℓ, from the same code store the MLP stages read:

    attention/connect/     attn_out[ℓ] features from resid_pre[ℓ] features at the same
                           position: every connector family and the linearity table
                           (`coact.connect`)
    attention/positions/   per attention feature, how much earlier positions add over the
                           same-position fit (`coact.positions`)
    composition/           resid_pre[ℓ+1] features from resid_pre[ℓ], attn_out[ℓ] and
                           mlp_out[ℓ] features (`coact.composition`), and decoded.parquet:
                           how close the decoded composition and the identity through the
                           SAEs come to the true next stream, on raw activations
    block.json             the headline (written last)

Attention linearity and same-position shares are read at the τ the MLP's calibration chose
(or the seed's τ without one), in the same form, so the three shares of a layer are read
against one threshold.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from coact.composition import CompositionConfig, CompositionConnector, compose, decoded_check
from coact.connect import ConnectConfig, connect
from coact.files import atomic_write
from coact.linearity import LinearityConfig
from coact.models import LoadedModel
from coact.positions import PositionsConfig, positions
from coact.sae.base import SparseAutoencoder
from coact.sites import Site
from coact.store import CodeStore
from coact.tracing import capture

Decode = Callable[[list[int]], str]


@dataclass(frozen=True)
class BlockConfig:
    attention: bool = True  # attention connectors and the position score
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
    saes: Mapping[Site, SparseAutoencoder],
    store: CodeStore,
    eval_tokens: Tensor,
    layer: int,
    out_dir: str | Path,
    config: BlockConfig = BlockConfig(),
    *,
    linearity: LinearityConfig | None = None,
    connect_settings: ConnectConfig | None = None,
    seed: int = 0,
    device: str = "cpu",
    decode: Decode | None = None,
) -> dict[str, Any]:
    """Run the block's attention and composition stages into `out_dir`; return the headline.
    Each stage reuses its finished result, so a killed run resumes where it stopped.
    `connect_settings` fits the attention connectors unless `config.attention_connect`
    overrides it."""
    out_dir = Path(out_dir)
    sites = block_sites(layer)
    linearity = linearity or LinearityConfig()
    summary: dict[str, Any] = {"layer": layer, "tau": linearity.tau, "form": linearity.form}
    base = config.attention_connect or connect_settings or ConnectConfig(in_site="", out_site="")
    if config.attention:
        settings = replace(
            base,
            in_site=str(sites["attn_in"]),
            out_site=str(sites["attn_out"]),
            seed=seed,
            device=device,
            linearity=linearity,
        )
        attention = connect(store, settings, out_dir / "attention" / "connect", decode=decode)
        attention.pop("key", None)
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
