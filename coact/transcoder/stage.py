"""The `transcoder` stage: a skip transcoder trained for the layer's MLP with the SAEs'
recipe (width, k, token budget, dead-latent revival), then one metric sheet, SAE route
beside transcoder at the same L0: FVU of the MLP output, CE and KL recovered when spliced
into the model, dead latents, connections per output feature, agreement with the model's
Jacobian and ablation, the linear share and the label counts of both routes (the
logic stage's, and the same labelling of the transcoder's latents: `sheet.parquet`, one
row per route, `labels.parquet`, one row per latent, and `transcoder.json`). Opt-in: it
trains a third dictionary per layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor

from coact.codes.collect import sae_fingerprint
from coact.codes.store import CodeStore
from coact.connectors.stage import ConnectResult
from coact.errors import CoactError
from coact.linearity.fits import load_linearity_connectors
from coact.logic.config import LABELS, LogicConfig
from coact.logic.coverage import CoverageSummary
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.rundir.files import atomic_write, sha256_file, write_json
from coact.rundir.layout import ConnectFiles, TranscoderFiles
from coact.rundir.results import Result, Timings, result_key
from coact.sae.base import SparseAutoencoder
from coact.sae.train import SaeTrainConfig
from coact.settings import setting
from coact.transcoder.formats import hookpoint, load_transcoder, save_transcoder
from coact.transcoder.labels import RouteLabels, label_latents, latent_codes
from coact.transcoder.model import SkipTranscoder
from coact.transcoder.sheet import (
    Models,
    connections_per_output,
    outputs_and_splices,
    virtual_weights,
)
from coact.transcoder.slopes import RouteSlopes, SlopeConfig, slopes, with_ablation
from coact.transcoder.train import train_transcoders

RESULT_VERSION = 2


@dataclass(frozen=True)
class TranscoderConfig:
    contexts: int = setting(16, "held-out contexts the metric sheet's FVU and splices use")
    jacobian_contexts: int = 4  # held-out contexts for the slopes (k_in jvps per token, twice)
    batch_size: int = 8
    skip: bool = True  # the linear skip path (a skip transcoder)
    per_output: int = 8  # the model's strongest connections per output judged for slopes
    mass: float = 0.9  # connections per output: inputs holding this share of |w|·E[c]
    size_band: tuple[float, float] = (0.5, 2.0)
    n_boot: int = 1000
    seed: int = 0
    skip_first_positions: int = 1
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class SheetRow(Result):
    """One route's figures (NaN or None where a figure does not apply to it)."""

    route: str
    fvu: float  # of the MLP output, about its mean
    l0: float  # active latents per token of the route's output dictionary
    dead_fraction: float | None  # its latents never active on the sheet's tokens
    delta_ce: float  # nats per token over the clean model, spliced at every position
    kl: float
    ce_recovered: float  # against the zero-ablated MLP output
    connections_per_output: float  # inputs holding `mass` of an output's |w|·E[c]
    jacobian_sign: float  # on the model's strong connections, vs its mean Jacobian
    jacobian_size: float
    jacobian_spearman: float
    ablation_sign: float  # on the causal check's judged connections, vs the model's ablation
    ablation_size: float
    ablation_spearman: float
    linear_share: float  # of scored output features, by the Jacobian score of the route's map


@dataclass(frozen=True, kw_only=True)
class TranscoderResult(Result):
    """The sheet of one layer and what it rests on."""

    key: str
    layer: int
    directory: str
    transcoder: str  # its folder (sparsify format)
    width: int
    k: int
    skip: bool
    train_tokens: int
    trained_now: bool
    train_seconds: float  # of the training that made it (also when reused)
    tokens: int  # held-out tokens of the FVU and splices
    slope_tokens: int
    connections_judged: int  # strong connections the Jacobian agreement is judged on
    ablations_judged: int  # causal-check connections the ablation agreement is judged on
    rows: dict[str, SheetRow]
    labels_sae: dict[str, int] | None  # the logic stage's counts (the SAE route's labels)
    timings: dict[str, float]
    labels_transcoder: dict[str, int] | None = None  # the same labelling of its latents
    coverage_sae: CoverageSummary | None = None  # how much of its features each explains
    coverage_transcoder: CoverageSummary | None = None


@dataclass(frozen=True)
class Labelling:
    """What labelling the transcoder's latents reads: the run's code store (its input SAE
    codes), the contexts its rows come from, and the logic stage's settings."""

    store: CodeStore
    contexts: Tensor
    config: LogicConfig


def trained_transcoder(
    lm: LoadedModel, layer: int, tokens: Tensor, train: SaeTrainConfig, skip: bool,
    files: TranscoderFiles,
) -> tuple[SkipTranscoder, bool]:  # fmt: skip
    """The transcoder an earlier run trained with this recipe, else a new one (saved)."""
    digest = hashlib.sha256(np.ascontiguousarray(tokens.cpu().numpy()).tobytes()).hexdigest()
    recipe = hashlib.sha256(
        json.dumps([lm.fingerprint(), digest, asdict(train), skip, layer]).encode()
    ).hexdigest()
    folder = files.coders / hookpoint(layer)
    if folder.is_dir():
        try:
            found = load_transcoder(folder, device=str(lm.device))
        except CoactError:
            found = None
        if found is not None and found.metadata.get("recipe") == recipe:
            return found, False
    started = time.perf_counter()
    (tc, log), *_ = train_transcoders(lm, tokens, [layer], train, skip=skip).values()
    tc.metadata.update(recipe=recipe, train_seconds=time.perf_counter() - started)
    save_transcoder(tc, folder)
    write_json(files.train_log, asdict(log))
    return tc, True


def transcoder_sheet(
    lm: LoadedModel, layer: int, sae_in: SparseAutoencoder, sae_out: SparseAutoencoder,
    train_tokens: Tensor, tokens: Tensor, connect_dir: str | Path, out_dir: str | Path,
    train: SaeTrainConfig, config: TranscoderConfig = TranscoderConfig(), *,
    causal: Path | None = None, causal_contexts: int | None = None,
    labels: dict[str, int] | None = None, sae_coverage: CoverageSummary | None = None,
    labelling: Labelling | None = None,
) -> TranscoderResult:  # fmt: skip
    """Train (or reuse) the layer's transcoder, measure the sheet on held-out `tokens`,
    label its latents when `labelling` is given (`labels`, `sae_coverage`: the logic
    stage's for the SAE route), write the tables and transcoder.json, and return it."""
    files, connected = TranscoderFiles(Path(out_dir)), ConnectFiles(Path(connect_dir))
    fitted = ConnectResult.read(connected.result)
    if fitted is None or not connected.weights.is_file():
        raise CoactError(f"no connectors at {connected.path}: the transcoder sheet needs connect")
    files.path.mkdir(parents=True, exist_ok=True)
    timings = Timings()
    with timings.part("train"):
        tc, trained_now = trained_transcoder(lm, layer, train_tokens, train, config.skip, files)
    causal = causal if causal is not None and causal.is_file() else None
    digest = hashlib.sha256(np.ascontiguousarray(tokens.cpu().numpy()).tobytes()).hexdigest()
    inputs = [
        lm.fingerprint(), tc.metadata.get("recipe"), sae_fingerprint(sae_in),
        sae_fingerprint(sae_out), digest, fitted.key, sha256_file(causal) if causal else None,
        causal_contexts, labels, asdict(sae_coverage) if sae_coverage else None,
        [labelling.store.fingerprint, asdict(labelling.config)] if labelling else None,
    ]  # fmt: skip
    key = result_key(inputs, config, RESULT_VERSION)
    if (previous := TranscoderResult.finished(files, key)) is not None:
        return previous
    connectors = load_linearity_connectors(connected.connectors, str(lm.device))
    models = Models(lm, layer, sae_in, sae_out, connectors, tc)
    result, latents = _measure_sheet(
        models, tokens, connected, config, causal, causal_contexts, timings, labelling
    )
    result = dataclasses.replace(
        result, key=key, directory=str(files.path), transcoder=str(files.coders / hookpoint(layer)),
        train_tokens=int(tc.metadata.get("tokens", 0)), trained_now=trained_now,
        train_seconds=float(tc.metadata.get("train_seconds", math.nan)), labels_sae=labels,
        coverage_sae=sae_coverage,
    )  # fmt: skip
    if latents is not None:
        atomic_write(files.labels, latents.write_parquet)
    atomic_write(files.sheet, _sheet_frame(result).write_parquet)
    result.write(files.result)
    return result


def _measure_sheet(
    models: Models, tokens: Tensor, connected: ConnectFiles, config: TranscoderConfig,
    causal: Path | None, causal_contexts: int | None, timings: Timings,
    labelling: Labelling | None,
) -> tuple[TranscoderResult, pl.DataFrame | None]:  # fmt: skip
    skip = config.skip_first_positions
    with timings.part("splices"):
        frame = outputs_and_splices(
            models, tokens[: config.contexts], batch_size=config.batch_size, skip=skip,
            n_boot=config.n_boot, seed=config.seed,
        )  # fmt: skip
    weights = pl.read_parquet(connected.weights)
    slope = SlopeConfig(
        skip_first_positions=skip, per_output=config.per_output, size_band=config.size_band
    )
    with timings.part("slopes"):
        joined, routes, tc_map, streams = slopes(
            models, tokens[: config.jacobian_contexts], weights, slope
        )
    with timings.part("connections"):
        counts = connections_per_output(models, streams, weights, config.mass)
    labelled = None
    if labelling is not None:
        with timings.part("labels"):
            labelled = _latent_labels(models, streams, labelling, config.progress)
    ablations = 0
    if causal is not None:
        with timings.part("ablation"):
            n = min(causal_contexts or tokens.shape[0], tokens.shape[0])
            stream_site = Site("mlp_resid", models.layer)
            rows = torch.cat([
                capture(models.lm, tokens[i : i + 8], [stream_site])[stream_site][:, skip:]
                .reshape(-1, models.lm.adapter.d_model).float()
                for i in range(0, n, 8)
            ])  # fmt: skip
            routes, paths = with_ablation(
                routes, pl.read_parquet(causal), tc_map, rows, config.size_band
            )
            ablations = paths.height
    result = TranscoderResult(
        key="", layer=models.layer, directory="", transcoder="", width=models.tc.width,
        k=models.tc.k, skip=models.tc.skip, train_tokens=0, trained_now=False,
        train_seconds=math.nan, tokens=int(frame["n_tokens_fvu"][0]),
        slope_tokens=int(streams.shape[0]), connections_judged=joined.height,
        ablations_judged=ablations, rows=_rows(frame, routes, counts), labels_sae=None,
        timings=dict(timings),
        labels_transcoder=labelled.counts if labelled else None,
        coverage_transcoder=labelled.coverage if labelled else None,
    )  # fmt: skip
    return result, labelled.features if labelled else None


def _latent_labels(
    models: Models, streams: Tensor, labelling: Labelling, progress: bool
) -> RouteLabels:
    """The logic stage's labels of the transcoder's latents on the code store's tokens,
    their inputs the input SAE's stored codes, their candidates its virtual weights."""
    store = labelling.store
    x = store.read_site(models.sites[0].slug)
    y = latent_codes(models.lm, models.tc, models.layer, labelling.contexts, store)
    with torch.no_grad():
        virtual = virtual_weights(models, streams).cpu().numpy().astype(np.float64)
    contexts = store.read_tokens()["context"].to_numpy()
    return label_latents(x, y, virtual, labelling.config, contexts, progress=progress)


def _rows(
    frame: pl.DataFrame, routes: dict[str, RouteSlopes], counts: tuple[float, float]
) -> dict[str, SheetRow]:
    """The sheet's rows: slopes and connections on the transcoder and the linear SAE route
    (the connector whose weights they read); the model's linear share on every SAE row."""
    n = math.nan
    nan = RouteSlopes(n, n, n, n, n, n, n)
    out: dict[str, SheetRow] = {}
    for row in frame.iter_rows(named=True):
        route = row["route"]
        slope = routes["transcoder"] if route == "transcoder" else nan
        if route == "sae_linear":
            slope = routes["sae"]
        elif route in ("sae_mlp", "sae_out"):
            slope = dataclasses.replace(nan, linear_share=routes["sae"].linear_share)
        connections = {"transcoder": counts[1], "sae_linear": counts[0]}.get(route, math.nan)
        out[route] = SheetRow(
            route=route, fvu=row["fvu"], l0=row["l0"], dead_fraction=row["dead_fraction"],
            delta_ce=row["delta_ce"], kl=row["kl"], ce_recovered=row["ce_recovered"],
            connections_per_output=connections, **asdict(slope),
        )  # fmt: skip
    return out


def _sheet_frame(result: TranscoderResult) -> pl.DataFrame:
    """One row per route; its label counts and explained share where it has labels (the
    transcoder's latents on its row, the output SAE's features on the SAE route's rows)."""
    routes = {"transcoder": (result.labels_transcoder, result.coverage_transcoder)}
    sae = (result.labels_sae, result.coverage_sae)
    routes |= dict.fromkeys(("sae_linear", "sae_mlp", "sae_out"), sae)
    rows = []
    for name, row in result.rows.items():
        counts, coverage = routes.get(name, (None, None))
        labelled = {f"labels_{label}": (counts or {}).get(label) for label in LABELS}
        explained = coverage.share_explained if coverage is not None else None
        rows.append(row.to_dict() | labelled | {"labels_explained": explained})
    schema = {f"labels_{label}": pl.Int64 for label in LABELS} | {"labels_explained": pl.Float64}
    return pl.DataFrame(rows, schema_overrides=schema)
