"""Outlier features: artefacts of where a model parks attention or norm, not concepts.

A feature is flagged when most of the tokens it fires on (at least `share` of them, with at
least `min_active` active tokens) are of one of three kinds:

- **first tokens**: positions below `first_positions` (1..3 by default; BOS, position 0, is
  never stored). Early positions are attention sinks with unusual activations.
- **first delimiter**: the first newline, period or comma of its context (decided by the
  token's text: spaces removed, it is made only of the `delimiters` characters). Models
  often use the first delimiter as a second attention sink.
- **high norm**: tokens whose activation at the site has a norm above `norm_factor` × the
  site's median (massive activations). The norm is that of the SAE's reconstruction from
  the stored codes (‖W_decᵀ c + b_dec‖), a cheap stand-in for the activation's own norm;
  without the SAE it is unknown (NaN share, never flagged for it).

Pure functions on the code store, and a stage that writes `<run>/outliers/outliers.parquet`
(one row per site and feature) and then `outliers.json` (the headline, with a key so a
finished result is reused).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from coact.codes.store import CodeStore
from coact.errors import CoactError
from coact.models.sites import SITE_KINDS, Site
from coact.rundir.files import atomic_write, read_json
from coact.rundir.layout import CONFIG, OutlierFiles, RunLayout
from coact.rundir.results import Result, result_key
from coact.sae.base import SparseAutoencoder
from coact.settings import check_ranges, setting

Decode = Callable[[list[int]], str]
RESULT_VERSION = 2  # bumped when what outliers writes changes: older results are redone
KINDS = ("first_tokens", "first_delimiter", "high_norm")
NAMES = {
    "first_tokens": "first tokens",
    "first_delimiter": "first delimiter",
    "high_norm": "high norm",
}


@dataclass(frozen=True)
class OutlierConfig:
    first_positions: int = setting(4, "positions below this are a context's first tokens", low=0)
    delimiters: str = "\n.,"  # a delimiter token is made only of these (spaces aside)
    norm_factor: float = setting(
        10.0, "a norm above this × the site's median is very high", low=0, low_open=True
    )
    share: float = setting(
        0.5, "flag when at least this share of active tokens is one kind", low=0, high=1
    )
    min_active: int = setting(10, "features active on fewer tokens are not judged", low=1)

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True, kw_only=True)
class OutlierSiteSummary(Result):
    """One site's alive and judged features, how many are flagged and why, each kind's
    base rate among its tokens, and how token norms were read."""

    alive: int
    judged: int
    flagged: int
    first_tokens: int
    first_delimiter: int
    high_norm: int
    base_rates: dict[str, float | None]
    norm: str  # "sae reconstruction" or "unknown"
    median_norm: float | None


@dataclass(frozen=True, kw_only=True)
class OutliersResult(Result):
    """Per site, the features flagged as artefacts (`outliers.parquet` has every feature)."""

    key: str
    directory: str
    tokens: int
    sites: dict[str, OutlierSiteSummary]
    config: OutlierConfig
    seconds: float


def is_delimiter(text: str, chars: str = "\n.,") -> bool:
    """True for '\\n', '.', ' ,', '.\\n\\n', …: spaces and tabs aside, only `chars`."""
    core = text.replace(" ", "").replace("\t", "").replace("\r", "")
    return bool(core) and all(c in chars for c in core)


def first_delimiters(contexts: np.ndarray, ids: np.ndarray, delimiter_ids: set[int]) -> np.ndarray:
    """Per token row: whether it is the first delimiter of its context (rows of a context
    in position order, as the store writes them)."""
    hit = np.isin(ids, np.fromiter(delimiter_ids, dtype=np.int64, count=len(delimiter_ids)))
    out = np.zeros(len(ids), dtype=bool)
    candidates = np.flatnonzero(hit)
    if len(candidates):
        _, first = np.unique(contexts[candidates], return_index=True)
        out[candidates[first]] = True
    return out


@torch.no_grad()
def reconstruction_norms(
    codes: sp.csr_matrix, sae: SparseAutoencoder, chunk: int = 8192
) -> np.ndarray:
    """‖decode(c)‖ per token row, from the sparse codes (no dense codes matrix)."""
    if isinstance(getattr(sae, "W_dec", None), torch.Tensor):  # on any device
        w_dec = sae.W_dec.detach().to("cpu", torch.float32).numpy()
        b_dec = sae.b_dec.detach().to("cpu", torch.float32).numpy()
    else:  # decode the identity to get its linear map
        b_dec = sae.decode(torch.zeros(1, sae.width)).detach().cpu().float().numpy()[0]
        w_dec = sae.decode(torch.eye(sae.width)).detach().cpu().float().numpy() - b_dec
    out = np.empty(codes.shape[0], dtype=np.float64)
    for lo in range(0, codes.shape[0], chunk):
        x = np.asarray(codes[lo : lo + chunk] @ w_dec) + b_dec
        out[lo : lo + chunk] = np.linalg.norm(x, axis=1)
    return out


def token_kinds(
    tokens: pl.DataFrame,
    config: OutlierConfig,
    decode: Decode | None,
    norms: np.ndarray | None,
) -> dict[str, np.ndarray | None]:
    """Per stored token: a boolean mask of each kind (None where it cannot be told)."""
    ids = tokens["token_id"].to_numpy().astype(np.int64)
    contexts = tokens["context"].to_numpy().astype(np.int64)
    kinds: dict[str, np.ndarray | None] = {
        "first_tokens": tokens["position"].to_numpy() < config.first_positions,
        "first_delimiter": None,
        "high_norm": None,
    }
    if decode is not None:
        delimiters = {
            int(i) for i in np.unique(ids) if is_delimiter(decode([int(i)]), config.delimiters)
        }
        kinds["first_delimiter"] = first_delimiters(contexts, ids, delimiters)
    if norms is not None and len(norms):
        kinds["high_norm"] = norms > config.norm_factor * float(np.median(norms))
    return kinds


def feature_shares(
    codes: sp.csr_matrix, kinds: Mapping[str, np.ndarray | None], config: OutlierConfig
) -> pl.DataFrame:
    """Per feature: active tokens, the share of them of each kind, the flag and its reason."""
    active = sp.csr_matrix(codes, copy=True)
    active.eliminate_zeros()
    active.data = np.ones_like(active.data, dtype=np.float64)
    n_active = np.asarray(active.sum(axis=0)).ravel()
    columns: dict[str, Any] = {
        "feature": np.arange(codes.shape[1], dtype=np.int64),
        "n_active": n_active.astype(np.int64),
    }
    with np.errstate(invalid="ignore", divide="ignore"):
        for kind in KINDS:
            mask = kinds.get(kind)
            if mask is None:
                columns[f"share_{kind}"] = np.full(codes.shape[1], np.nan)
            else:
                hits = np.asarray(active.T @ mask.astype(np.float64)).ravel()
                columns[f"share_{kind}"] = np.where(n_active > 0, hits / n_active, np.nan)
    frame = pl.DataFrame(columns)
    judged = frame["n_active"].to_numpy() >= config.min_active
    reasons: list[list[str]] = [[] for _ in range(frame.height)]
    for kind in KINDS:
        share = frame[f"share_{kind}"].to_numpy()
        hit = judged & (np.nan_to_num(share, nan=-1.0) >= config.share)
        frame = frame.with_columns(pl.Series(f"is_{kind}", hit))
        for j in np.flatnonzero(hit):
            reasons[j].append(f"{NAMES[kind]} {100 * share[j]:.0f}%")
    return frame.with_columns(
        pl.Series("outlier", [bool(r) for r in reasons]),
        pl.Series("reason", ["; ".join(r) for r in reasons], dtype=pl.String),
    )


def find_outliers(
    store: CodeStore,
    config: OutlierConfig = OutlierConfig(),
    decode: Decode | None = None,
    saes: Mapping[str, SparseAutoencoder] | None = None,
    sites: Sequence[str] | None = None,
) -> tuple[pl.DataFrame, dict[str, OutlierSiteSummary]]:
    """Every site's features (of `sites`, slugs; default every site in the store) with
    their shares and flags, and per site a headline."""
    tokens = store.read_tokens()
    frames, summaries = [], {}
    wanted = list(store.sites if sites is None else sites)
    store.require(wanted)
    for slug in sorted(wanted, key=_site_order):
        codes = store.read_site(slug)
        sae = (saes or {}).get(slug)
        norms = reconstruction_norms(codes, sae) if sae is not None else None
        kinds = token_kinds(tokens, config, decode, norms)
        table = feature_shares(codes, kinds, config)
        frames.append(
            table.with_columns(pl.lit(slug).alias("site")).select("site", pl.all().exclude("site"))
        )
        alive = table.filter(pl.col("n_active") > 0)
        summaries[slug] = OutlierSiteSummary(
            alive=alive.height,
            judged=alive.filter(pl.col("n_active") >= config.min_active).height,
            flagged=int(table["outlier"].sum()),
            **{kind: int(table[f"is_{kind}"].sum()) for kind in KINDS},
            base_rates={
                kind: (None if mask is None else float(mask.mean()) if len(mask) else 0.0)
                for kind, mask in kinds.items()
            },
            norm="sae reconstruction" if norms is not None else "unknown",
            median_norm=float(np.median(norms)) if norms is not None and len(norms) else None,
        )
    return pl.concat(frames), summaries


def _site_order(slug: str) -> tuple[int, int]:
    """Sites in a block's order: the stream an MLP reads before the MLP's output."""
    site = Site.parse(slug)
    return site.layer, SITE_KINDS.index(site.kind)


def outliers(
    store: CodeStore | str | Path,
    out_dir: str | Path,
    config: OutlierConfig = OutlierConfig(),
    *,
    sites: Sequence[str] | None = None,
    decode: Decode | None = None,
    saes: Mapping[str, SparseAutoencoder] | None = None,
) -> OutliersResult:
    """The stage: write outliers.parquet and outliers.json into out_dir (reused when the
    codes, sites, SAEs and configuration are those of a finished earlier result)."""
    from coact.codes.collect import sae_fingerprint

    started = time.perf_counter()
    store = CodeStore.of(store)
    files = OutlierFiles(Path(out_dir))
    inputs = {
        "store": [store.manifest.get("fingerprint"), store.n_tokens],
        "sites": None if sites is None else list(sites),
        "saes": {k: sae_fingerprint(v) for k, v in sorted((saes or {}).items())},
        "decode": decode is not None,
    }
    key = result_key(inputs, config, RESULT_VERSION, ignore=())
    if (previous := OutliersResult.finished(files, key)) is not None:
        return previous
    table, summaries = find_outliers(store, config, decode, saes, sites)
    files.path.mkdir(parents=True, exist_ok=True)
    atomic_write(files.outliers, partial(_write_parquet, table))
    result = OutliersResult(
        key=key,
        directory=str(files.path),
        tokens=store.n_tokens,
        sites=summaries,
        config=config,
        seconds=time.perf_counter() - started,
    )
    result.write(files.result)
    return result


def _write_parquet(table: pl.DataFrame, path: Path) -> None:
    table.write_parquet(path)


def run_saes(
    run_dir: str | Path, slugs: Any = None, device: str = "cpu"
) -> dict[str, SparseAutoencoder]:
    """A run's SAEs by site slug: those its config names (sae_in / sae_out), else the ones
    it trained (<shared>/sae/<slug>); a site whose SAE is not on this machine is left out."""
    from coact.sae.formats import load_sae

    run = Path(run_dir)
    config = read_json(run / CONFIG) or {}
    layer = config.get("layer")
    given = {}
    if layer is not None:
        given = {
            Site("mlp_resid", int(layer)).slug: config.get("sae_in"),
            Site("mlp_out", int(layer)).slug: config.get("sae_out"),
        }
    wanted = list(slugs) if slugs is not None else list(given)
    layout = RunLayout.of(run, config)
    found: dict[str, SparseAutoencoder] = {}
    for slug in wanted:
        source = given.get(slug) or layout.sae_dir(slug)
        try:
            found[slug] = load_sae(source, device=device)
        except (CoactError, OSError):  # a missing or unreadable SAE: norms are unknown
            continue
    return found
