"""The decoded check of the composition: does the block's exact identity survive the SAEs
in activation space, and how much of the next stream does the decoded composition give
back? On raw activations of a few evaluation contexts, written to
`composition/decoded.parquet`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
from torch import Tensor

from coact.block.composition import CompositionResult, default_sources
from coact.connectors.exact import GramStats, linear_fit
from coact.connectors.interface import LinearConnector
from coact.errors import CoactError
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.rundir.files import atomic_write
from coact.rundir.layout import CompositionFiles
from coact.sae.base import SparseAutoencoder


@dataclass(frozen=True, eq=False)
class CompositionConnector:
    """target codes ≈ [codes of each source, side by side] → a linear connector (Σ widths
    inputs) of the exact path: which sites feed it, in which order, and their widths."""

    sources: tuple[Site, ...]
    widths: tuple[int, ...]
    target: Site
    linear: LinearConnector

    def __post_init__(self) -> None:
        if self.linear.n_in != sum(self.widths):
            raise CoactError(
                f"composition weights of {self.linear.n_in} inputs do not fit sources of "
                f"widths {self.widths}"
            )

    @property
    def layer(self) -> int:
        return self.target.layer - 1

    @classmethod
    def load(cls, out_dir: str | Path, refit: bool = True) -> CompositionConnector:
        """The connector `compose` chose: refitted weights on its support (or the L1 ones)."""
        files = CompositionFiles(Path(out_dir))
        head = CompositionResult.read(files.result)
        if head is None:
            raise CoactError(f"no composition result in {out_dir}; run the composition stage")
        sources = tuple(Site.parse(s) for s in head.sources)
        widths = tuple(int(w) for w in head.source_widths)
        offsets = dict(zip(map(str, sources), np.cumsum([0, *widths[:-1]]), strict=True))
        weights = pl.read_parquet(files.weights)
        features = pl.read_parquet(files.features).sort("feature")
        rows = weights["in_feature"].to_numpy() + np.array(
            [offsets[s] for s in weights["source_site"].to_list()], dtype=np.int64
        )
        values = weights["weight_refit" if refit else "weight"].to_numpy()
        shape = (sum(widths), head.target_width)
        matrix = sp.csr_matrix((values, (rows, weights["out_feature"].to_numpy())), shape=shape)
        intercepts = features["intercept_refit" if refit else "intercept"].to_numpy()
        linear = LinearConnector(matrix, intercepts)
        return cls(sources, widths, Site.parse(head.target), linear)

    def predict(self, codes: Sequence[Any]) -> np.ndarray:
        """Target codes (tokens × n_out) from each source's codes, in `sources` order
        (dense arrays, tensors or sparse matrices)."""
        blocks = [sp.csr_matrix(_numpy(c)) if not sp.issparse(c) else c for c in codes]
        return self.linear.predict(sp.hstack(blocks, format="csr"))


def least_squares_connector(
    codes: Mapping[Site, Any], target: Site, target_codes: Any
) -> CompositionConnector:
    """Least squares (with intercept, no L1) from the sources' codes, in the mapping's
    order, to the target's: the dense ceiling as a connector, for small sites and tests."""
    sources = tuple(codes)
    blocks = [sp.csr_matrix(_numpy(c)) if not sp.issparse(c) else c for c in codes.values()]
    x, y = sp.hstack(blocks, format="csr"), sp.csr_matrix(_numpy(target_codes))
    stats = GramStats.empty(x.shape[1], y.shape[1]).add(x, y)
    widths = tuple(block.shape[1] for block in blocks)
    return CompositionConnector(sources, widths, target, LinearConnector(*linear_fit(stats)))


@dataclass(frozen=True)
class DecodedConfig:
    contexts: int = 16  # evaluation contexts for the decoded identity check
    batch: int = 8  # contexts per forward pass


@torch.no_grad()
def decoded(
    lm: LoadedModel,
    saes: Mapping[Site, SparseAutoencoder],
    tokens: Tensor,
    composition_dir: str | Path,
    layer: int,
    config: DecodedConfig = DecodedConfig(),
) -> dict[str, float]:
    """`decoded_check` on the first evaluation contexts, with the connector `compose`
    chose; the table goes to decoded.parquet, the FVU per check is returned."""
    files = CompositionFiles(Path(composition_dir))
    connector = CompositionConnector.load(files.path)
    wanted = {*connector.sources, connector.target, *default_sources(layer)}
    wanted |= {Site("resid_pre", layer + 1)}
    sites = sorted(wanted - {Site("mlp_resid", layer)}, key=lm.adapter.order_key)
    tokens = tokens[: config.contexts]
    parts: dict[Site, list[Tensor]] = {site: [] for site in sites}
    for start in range(0, tokens.shape[0], config.batch):
        acts = capture(lm, tokens[start : start + config.batch], sites)
        for site in sites:
            parts[site].append(acts[site].float())
    acts_all = {site: torch.cat(chunks) for site, chunks in parts.items()}
    table = decoded_check(acts_all, saes, connector, layer=layer)
    atomic_write(files.decoded, table.write_parquet)
    return {str(k): float(v) for k, v in table.select("check", "fvu").iter_rows()}


CHECKS = {
    "identity_raw": "resid_pre[ℓ] + attn_out[ℓ] + mlp_out[ℓ], raw activations",
    "identity_decoded": "the same sum of each site's SAE reconstruction",
    "composition_decoded": "the target SAE's decoding of the composition connector's codes",
    "target_sae": "the target SAE's own reconstruction of resid_pre[ℓ+1]",
}


@torch.no_grad()
def decoded_check(
    acts: Mapping[Site, Tensor],
    saes: Mapping[Site, SparseAutoencoder],
    connector: CompositionConnector | None,
    *,
    layer: int | None = None,
    skip_first_positions: int = 1,
    batch_tokens: int = 256,
) -> pl.DataFrame:
    """FVU against the true resid_pre[ℓ+1] (Σ‖x − x̂‖² / Σ‖x − mean x‖² over tokens) of:
    the identity on raw activations (≈ 0 unless the sites are read wrong), the identity
    through the SAEs (what three reconstruction errors cost together), the composition
    connector decoded, SAE_out.decode(W·codes + b), and the target SAE alone (the floor a
    connector predicting its codes perfectly would reach). One row per check.

    `acts`: (batch, seq, d) activations as `coact.models.tracing.capture` returns them, at
    resid_pre[ℓ], attn_out[ℓ], mlp_out[ℓ], resid_pre[ℓ+1] and the connector's sources;
    `saes` for the same sites. The first `skip_first_positions` positions (BOS) are left
    out, as in SAE evaluation."""
    if layer is None:
        if connector is None:
            raise CoactError("decoded_check needs a layer or a composition connector")
        layer = connector.layer
    identity = (*default_sources(layer), Site("resid_pre", layer + 1))
    target = identity[-1] if connector is None else connector.target
    needed = dict.fromkeys([*identity, target, *(connector.sources if connector else ())])
    if missing := [str(s) for s in needed if s not in acts]:
        raise CoactError(f"decoded check: no activations for {', '.join(missing)}")
    if missing := [str(s) for s in needed if s not in saes]:
        raise CoactError(f"decoded check: no SAE for {', '.join(missing)}")
    flat = {s: acts[s][:, skip_first_positions:].reshape(-1, acts[s].shape[-1]) for s in needed}
    n_tokens = flat[target].shape[0]
    if n_tokens == 0:
        raise CoactError("decoded check: no tokens left after the skipped positions")
    checks = [*CHECKS] if connector is not None else [c for c in CHECKS if "composition" not in c]
    reference = {c: identity[-1] if c.startswith("identity") else target for c in checks}
    sse = dict.fromkeys(checks, 0.0)
    sums = {s: torch.zeros(flat[s].shape[-1], dtype=torch.float64) for s in {identity[-1], target}}
    squares = dict.fromkeys(sums, 0.0)
    for start in range(0, n_tokens, batch_tokens):
        part = {s: v[start : start + batch_tokens] for s, v in flat.items()}
        for site in sums:
            truth = part[site].double()
            sums[site] += truth.sum(0).cpu()
            squares[site] += float(truth.pow(2).sum())

        def recon(site: Site, part: dict[Site, Tensor] = part) -> Tensor:
            return saes[site].decode(saes[site].encode(part[site])).double()

        guesses = {
            "identity_raw": sum((part[s].double() for s in identity[:-1]), torch.zeros(())),
            "identity_decoded": sum((recon(s) for s in identity[:-1]), torch.zeros(())),
            "target_sae": recon(target),
        }
        if connector is not None:
            codes = [saes[s].encode(part[s]) for s in connector.sources]
            predicted = torch.as_tensor(connector.predict(codes)).to(part[target])
            guesses["composition_decoded"] = saes[target].decode(predicted).double()
        for name in checks:
            error = guesses[name] - part[reference[name]].double()
            sse[name] += float(error.pow(2).sum())
    spread = {s: squares[s] - float(sums[s].pow(2).sum()) / n_tokens for s in sums}
    return pl.DataFrame(
        {
            "check": checks,
            "what": [CHECKS[c] for c in checks],
            "fvu": [
                sse[c] / spread[reference[c]] if spread[reference[c]] > 0 else float("nan")
                for c in checks
            ],
            "mse": [sse[c] / n_tokens for c in checks],
            "tokens": [n_tokens] * len(checks),
        }
    )


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)
