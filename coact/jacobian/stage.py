"""The `jacobian` stage: the block's own feature-space Jacobian on held-out contexts — the
MLP's, or attention's at the same position (`coact.jacobian.attention_map`) — aggregated
per connection, a linearity score per output feature that needs no fitted
connector, formulas from the mean Jacobian, and — when calibration's causal check ran —
the three-way agreement of strong connections (connector weight, Jacobian, ablation).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor

from coact.codes.collect import sae_fingerprint
from coact.errors import CoactError
from coact.jacobian.agreement import Agreement, agreement_table, summarise, with_paths
from coact.jacobian.attention_map import TANGENTS_PER_PASS, AttentionMap
from coact.jacobian.connections import connection_table, jacobian_formulas, strongest
from coact.jacobian.entries import Entries, flatten
from coact.jacobian.feature_map import FeatureMap, TokenJacobians, mlp_block
from coact.jacobian.paths import ablation_paths
from coact.jacobian.score import InputSlopes, ScoreConfig, linearity_scores
from coact.models.load import LoadedModel
from coact.models.sites import SitePair
from coact.models.tracing import capture
from coact.progress import tqdm
from coact.rundir.files import atomic_write, sha256_file
from coact.rundir.layout import JacobianFiles
from coact.rundir.results import Result, pair_head, result_key
from coact.sae.base import SparseAutoencoder
from coact.sae.evaluate import check_sae_fits
from coact.settings import check_ranges, setting

RESULT_VERSION = 1


@dataclass(frozen=True)
class JacobianConfig:
    batch_size: int = 4  # contexts per pass: k_in forward-mode products each
    skip_first_positions: int = 1  # BOS, as in collection
    min_tokens: int = setting(3, "tokens a connection needs to be stored", low=1)
    per_output: int = 64  # connections stored per output feature, by total attribution
    size_band: tuple[float, float] = (0.5, 2.0)  # as the causal check judges size
    score: ScoreConfig = field(default_factory=ScoreConfig)
    progress: bool = True

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True, kw_only=True)
class JacobianResult(Result):
    """Tokens and contexts read, connections stored, and per output feature the
    Jacobian verdict's shares (of the features with a score), its median nonlinearity,
    and the three-way agreement when the causal check ran."""

    key: str
    in_site: str
    out_site: str
    directory: str
    tokens: int
    contexts: int
    connections: int
    features_scored: int
    max_nonlinearity: float
    share_linear: float
    share_nonlinear: float
    share_uncertain: float
    median_nonlinearity: float
    agreement: Agreement | None = None


def jacobian(
    lm: LoadedModel,
    pair: SitePair,
    sae_in: SparseAutoencoder,
    sae_out: SparseAutoencoder,
    tokens: Tensor,
    out_dir: str | Path,
    config: JacobianConfig = JacobianConfig(),
    causal: Path | None = None,
    causal_contexts: int | None = None,
) -> JacobianResult:
    """Measure, write (jacobian/*.parquet, jacobian.json) and return the stage's result;
    a finished result of the same model, SAEs, tokens and causal table is reused.
    `causal` is the causal check's table, measured on the first `causal_contexts` of
    `tokens` (all of them if None): the agreement is judged on those contexts."""
    _check(lm, pair, sae_in, sae_out, tokens, config)
    files = JacobianFiles(Path(out_dir))
    causal = causal if causal is not None and causal.is_file() else None
    inputs = {**_inputs(lm, sae_in, sae_out, tokens, causal), "causal_contexts": causal_contexts}
    key = result_key(inputs, config, RESULT_VERSION)
    if (previous := JacobianResult.finished(files, key)) is not None:
        return previous
    maps = Maps(lm, pair, sae_in, sae_out, config.skip_first_positions)
    entries, slopes, streams = _measure(maps, tokens, config)
    every = connection_table(entries, sae_in.width, min_tokens=1)
    stored = strongest(every.filter(pl.col("n_tokens") >= config.min_tokens), config.per_output)
    features = _features(entries, slopes, stored, sae_in.width, sae_out.width, config)
    agreement = None
    if causal is not None:
        n = min(causal_contexts or tokens.shape[0], tokens.shape[0])
        agreement = _agreement(maps, entries, streams, causal, n, config)
    files.path.mkdir(parents=True, exist_ok=True)
    atomic_write(files.connections, stored.write_parquet)
    atomic_write(files.features, features.write_parquet)
    table = agreement if agreement is not None else _no_agreement()
    atomic_write(files.agreement, table.write_parquet)
    result = _result(key, pair, files, tokens, config, stored, features, agreement)
    result.write(files.result)
    return result


def _check(
    lm: LoadedModel, pair: SitePair, sae_in: SparseAutoencoder, sae_out: SparseAutoencoder,
    tokens: Tensor, config: JacobianConfig,
) -> None:  # fmt: skip
    layer = pair.out_site.layer
    if pair not in (SitePair.mlp(layer), SitePair.attention(layer)):
        raise CoactError(
            "the jacobian stage reads an MLP pair (mlp_resid → mlp_out) or attention's "
            f"(resid_pre → attn_out) of one block, not {pair}"
        )
    stream_kind = lm.adapter.mlp_resid_kind() if pair == SitePair.mlp(layer) else None
    check_sae_fits(sae_in, pair.in_site, lm.adapter.d_model, stream_kind)
    check_sae_fits(sae_out, pair.out_site, lm.adapter.d_model)
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] <= config.skip_first_positions:
        raise CoactError(
            f"the jacobian stage needs a non-empty (contexts × seq) batch longer than "
            f"{config.skip_first_positions} positions, got {tuple(tokens.shape)}"
        )
    if config.batch_size < 1:
        raise CoactError(f"batch_size must be at least 1, got {config.batch_size}")


def _inputs(
    lm: LoadedModel, sae_in: SparseAutoencoder, sae_out: SparseAutoencoder, tokens: Tensor,
    causal: Path | None,
) -> dict[str, str | None]:  # fmt: skip
    digest = hashlib.sha256(np.ascontiguousarray(tokens.cpu().numpy()).tobytes()).hexdigest()
    return {
        "model": lm.fingerprint(),
        "sae_in": sae_fingerprint(sae_in),
        "sae_out": sae_fingerprint(sae_out),
        "tokens": digest,
        "causal": sha256_file(causal) if causal is not None else None,
    }


@dataclass(frozen=True)
class Maps:
    """The block's feature map for given contexts: an MLP's is the same for every token;
    attention's holds each context's other positions fixed (`AttentionMap`)."""

    lm: LoadedModel
    pair: SitePair
    sae_in: SparseAutoencoder
    sae_out: SparseAutoencoder
    skip: int

    def of(self, streams: Tensor) -> FeatureMap:
        """The map of the tokens from `skip` on of `streams` (contexts × seq × d_model)."""
        layer = self.pair.out_site.layer
        if self.pair == SitePair.mlp(layer):
            return FeatureMap(mlp_block(self.lm, layer), self.sae_in, self.sae_out)
        block = AttentionMap(self.lm, layer, streams, self.skip)
        return FeatureMap(block, self.sae_in, self.sae_out, TANGENTS_PER_PASS)

    def rows(self, streams: Tensor) -> Tensor:
        """The map's rows: the tokens from `skip` on, context-major (tokens × d_model)."""
        return streams[:, self.skip :].reshape(-1, streams.shape[-1])


def _measure(
    maps: Maps, tokens: Tensor, config: JacobianConfig
) -> tuple[Entries, np.ndarray, Tensor]:
    """The flattened Jacobians, the cross-fitted input slopes (`InputSlopes`) and the
    streams the block read (contexts × seq × d_model, every position)."""
    inputs = InputSlopes(maps.sae_in.width, maps.lm.adapter.d_model)
    site = maps.pair.in_site
    batches: list[tuple[TokenJacobians, np.ndarray]] = []
    streams: list[Tensor] = []
    starts = range(0, tokens.shape[0], config.batch_size)
    for start in tqdm(starts, desc="jacobian", unit="batch", disable=not config.progress):
        batch = tokens[start : start + config.batch_size]
        streams.append(capture(maps.lm, batch, [site])[site].float())
        rows = maps.rows(streams[-1])
        contexts = np.repeat(np.arange(start, start + len(batch)), len(rows) // len(batch))
        found = maps.of(streams[-1]).token_jacobians(rows)
        inputs.add(found, contexts)
        batches.append((dataclasses.replace(found, pushed=found.pushed[:0]), contexts))
    entries = flatten(batches, maps.sae_in.width, tokens.shape[0])
    slopes = inputs.cross_fitted(_encoder(maps.sae_out))
    return entries, slopes, torch.cat(streams)


def _encoder(sae_out: SparseAutoencoder) -> Tensor:
    weight = getattr(sae_out, "W_enc", None)
    if not isinstance(weight, Tensor):
        raise CoactError("the output SAE has no linear encoder (W_enc); load it with coact")
    return weight


def _agreement(
    maps: Maps, entries: Entries, streams: Tensor, causal: Path, n_contexts: int,
    config: JacobianConfig,
) -> pl.DataFrame:  # fmt: skip
    """The causal table joined with the Jacobian and the ablation's exact path, on the
    contexts the causal check measured (the first `n_contexts`)."""
    feature_map = maps.of(streams[:n_contexts])
    streams = maps.rows(streams[:n_contexts])
    with torch.no_grad():
        fires = (feature_map.sae_in.encode(streams) > 0).sum(dim=0).cpu().numpy()
    sub = dataclasses.replace(entries.first_contexts(n_contexts), fires=fires)
    every = connection_table(sub, feature_map.sae_in.width, min_tokens=1)
    table = agreement_table(pl.read_parquet(causal), every, config.size_band)
    return with_paths(ablation_paths(feature_map, streams, table), config.size_band)


def _features(
    entries: Entries, slopes: np.ndarray, stored: pl.DataFrame, n_in: int, n_out: int,
    config: JacobianConfig,
) -> pl.DataFrame:  # fmt: skip
    scores = linearity_scores(entries, slopes, n_out, config.score)
    formulas = jacobian_formulas(stored, n_in, n_out)
    return scores.with_columns(
        jacobian_formula=pl.Series([formulas.get(j) for j in range(n_out)], dtype=pl.String)
    )


def _no_agreement() -> pl.DataFrame:
    return pl.DataFrame(schema={"output": pl.Int64, "input": pl.Int64})


def _result(
    key: str, pair: SitePair, files: JacobianFiles, tokens: Tensor, config: JacobianConfig,
    stored: pl.DataFrame, features: pl.DataFrame, agreement: pl.DataFrame | None,
) -> JacobianResult:  # fmt: skip
    scored = features.filter(pl.col("jacobian_verdict") != "too few tokens")
    n = scored.height

    def share(verdict: str) -> float:
        return float((scored["jacobian_verdict"] == verdict).sum()) / n if n else float("nan")

    return JacobianResult(
        **pair_head(key, pair, files),
        tokens=int(tokens.shape[0] * (tokens.shape[1] - config.skip_first_positions)),
        contexts=int(tokens.shape[0]),
        connections=stored.height,
        features_scored=n,
        max_nonlinearity=config.score.max_nonlinearity,
        share_linear=share("linear"),
        share_nonlinear=share("nonlinear"),
        share_uncertain=share("uncertain"),
        median_nonlinearity=float(scored["nonlinearity"].median()) if n else float("nan"),  # type: ignore[arg-type]
        agreement=summarise(agreement) if agreement is not None else None,
    )
