"""Context ablation: does a feature fire because of a token before it?

For a feature at any site and its top activating contexts (largest activations, one per
context, as the report shows them), each of the `window` tokens before the activating token
is, one at a time, removed from the context (`remove`: later tokens shift one place left)
or replaced by a neutral filler token (`replace`: nothing moves). The model is rerun up to
the site only (the trace stops after it), the activation at the activating token is
encoded with the site's SAE, and the feature's value there is compared with the clean
context's: drop = clean − ablated, and drop / clean.

All variants of a context are cut right after the activating token and padded on the right
to a common length (a causal model's earlier positions never see the padding), so the
variants of many contexts share one forward pass. Results go to `<run>/evidence/
ablation.parquet`, one row per (feature, context, mode, ablated token); `ablation.json` is
written last with the key of everything that produced it, so a finished result is reused.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from torch import Tensor

from coact.codes.collect import sae_fingerprint
from coact.codes.store import CodeStore
from coact.errors import CoactError
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.progress import tqdm
from coact.rundir.files import atomic_write
from coact.rundir.layout import AblationFiles
from coact.rundir.results import Result
from coact.sae.base import SparseAutoencoder
from coact.settings import check_ranges, setting

Mode = Literal["remove", "replace"]
MODES: tuple[Mode, ...] = ("remove", "replace")
Decode = Callable[[list[int]], str]
COLUMNS = {
    "site": pl.String,  # slug, e.g. mlp_out.3
    "feature": pl.Int64,
    "rank": pl.Int64,  # of the context among the feature's top contexts (1 = largest)
    "context": pl.Int64,
    "position": pl.Int64,  # of the activating token in its context
    "token_id": pl.Int64,  # the activating token
    "token": pl.String,  # its text (null without a decode function)
    "stored": pl.Float64,  # the activation in the code store
    "clean": pl.Float64,  # recomputed on the clean context (should equal `stored`)
    "mode": pl.String,
    "ablated_offset": pl.Int64,  # tokens before the activating token (1 = the one before)
    "ablated_position": pl.Int64,
    "ablated_id": pl.Int64,
    "ablated_token": pl.String,
    "replacement_id": pl.Int64,  # the filler (replace mode); null when removed
    "ablated": pl.Float64,  # the activation at the activating token with that token ablated
    "drop": pl.Float64,  # clean − ablated (code units)
    "drop_fraction": pl.Float64,  # drop / clean
}


@dataclass(frozen=True)
class AblationConfig:
    contexts: int = setting(4, "top contexts per output feature", low=1)
    input_contexts: int = setting(2, "top contexts per input", low=0)
    inputs_per_feature: int = setting(2, "top inputs of each output also ablated", low=0)
    window: int = setting(8, "preceding tokens ablated, one at a time", low=1)
    modes: tuple[Mode, ...] = setting(MODES, "remove and/or replace")
    # replace mode's token: this text if it is one token, else pad / EOS
    filler: str = setting(" ", "replace mode's token (if it is one token)")
    batch_size: int = setting(64, "sequences per forward pass", low=1)
    first_position: int = 1  # positions before it (BOS) are never ablated
    progress: bool = True

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class Variant:
    """One sequence to run: the clean context (mode None) or one ablation of it."""

    item: int  # index of the (feature, context) it belongs to
    mode: Mode | None
    offset: int  # tokens before the activating token that were ablated (0: clean)
    tokens: np.ndarray  # up to and including the activating token
    read: int  # index of the activating token in `tokens`


def neutral_token(tokenizer: Any, filler: str = " ") -> int:
    """The filler's id when it is a single token; else the pad, EOS or BOS token."""
    if filler:
        ids = tokenizer(filler, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise CoactError(f"filler {filler!r} is not one token and the tokenizer has no pad/EOS")


def variants(
    item: int, tokens: np.ndarray, position: int, config: AblationConfig, filler: int
) -> list[Variant]:
    """The clean context cut after `position`, then for each of the `config.window` tokens
    before it (never before `config.first_position`) one variant per mode."""
    prefix = np.asarray(tokens[: position + 1], dtype=np.int64)
    out = [Variant(item, None, 0, prefix, position)]
    for offset in range(1, config.window + 1):
        at = position - offset
        if at < config.first_position:
            break
        for mode in config.modes:
            if mode == "remove":
                out.append(Variant(item, mode, offset, np.delete(prefix, at), position - 1))
            elif mode == "replace":
                changed = prefix.copy()
                changed[at] = filler
                out.append(Variant(item, mode, offset, changed, position))
            else:
                raise CoactError(f"unknown ablation mode {mode!r}; use remove or replace")
    return out


@torch.no_grad()
def feature_values(
    lm: LoadedModel,
    site: Site,
    sae: SparseAutoencoder,
    runs: Sequence[Variant],
    features: Sequence[int],
    pad: int,
    batch_size: int = 64,
    progress: Callable[[int], object] | None = None,
) -> np.ndarray:
    """features[i]'s SAE code at runs[i]'s read position: sequences sorted by length,
    right-padded with `pad` and run `batch_size` at a time up to the site."""
    values = np.zeros(len(runs), dtype=np.float64)
    order = sorted(range(len(runs)), key=lambda i: len(runs[i].tokens))
    for lo in range(0, len(order), batch_size):
        chosen = order[lo : lo + batch_size]
        length = max(len(runs[i].tokens) for i in chosen)
        batch = torch.full((len(chosen), length), pad, dtype=torch.int64)
        for row, i in enumerate(chosen):
            batch[row, : len(runs[i].tokens)] = torch.from_numpy(runs[i].tokens)
        acts = capture(lm, batch, [site])[site]
        reads = torch.tensor([runs[i].read for i in chosen], device=acts.device)
        x = acts[torch.arange(len(chosen), device=acts.device), reads]
        codes = sae.encode(x)
        picked = torch.tensor([features[i] for i in chosen], device=codes.device)
        got = codes[torch.arange(len(chosen), device=codes.device), picked]
        values[chosen] = got.detach().to("cpu", torch.float64).numpy()
        if progress is not None:
            progress(len(chosen))
    return values


# ------------------------------------------------------------------------- from the store


class ContextTokens:
    """Each stored context's tokens, from the store's token table; the positions the store
    skipped (BOS) are filled with `bos`, or taken from `tokens` (all contexts, as collected)
    when given."""

    def __init__(self, store: CodeStore, bos: int | None, tokens: Tensor | None = None) -> None:
        table = store.read_tokens()
        self.context = table["context"].to_numpy().astype(np.int64)
        self.position = table["position"].to_numpy().astype(np.int64)
        self.ids = table["token_id"].to_numpy().astype(np.int64)
        self.bos = bos
        self.tokens = None if tokens is None else np.asarray(tokens)
        if not np.all(np.diff(self.context) >= 0):
            order = np.lexsort((self.position, self.context))
            self.context, self.position = self.context[order], self.position[order]
            self.ids = self.ids[order]

    def __call__(self, context: int) -> np.ndarray:
        lo = int(np.searchsorted(self.context, context, "left"))
        hi = int(np.searchsorted(self.context, context, "right"))
        positions, ids = self.position[lo:hi], self.ids[lo:hi]
        if self.tokens is not None:
            row = np.asarray(self.tokens[context], dtype=np.int64)
            if len(row) <= positions.max() or np.any(row[positions] != ids):
                raise CoactError(f"the tokens given do not match the store's context {context}")
            return row[: positions.max() + 1].copy()
        missing = sorted(set(range(int(positions.min()))))
        if missing and (self.bos is None or missing != [0]):
            raise CoactError(
                f"the store skipped positions {missing} of context {context}: pass the "
                "collected tokens to rebuild them"
            )
        out = np.full(int(positions.max()) + 1, -1, dtype=np.int64)
        out[positions] = ids
        if missing:
            out[0] = int(self.bos)  # type: ignore[arg-type]
        if np.any(out < 0):
            raise CoactError(f"context {context} has gaps in the store's token table")
        return out


def top_rows(
    rows: np.ndarray, values: np.ndarray, contexts: np.ndarray, k: int
) -> list[tuple[int, float]]:
    """(row, activation) of the k largest activations, at most one per context: the same
    choice as the report's top contexts."""
    out: list[tuple[int, float]] = []
    seen: set[int] = set()
    for i in np.argsort(-values, kind="stable"):
        ctx = int(contexts[rows[i]])
        if ctx in seen:
            continue
        seen.add(ctx)
        out.append((int(rows[i]), float(values[i])))
        if len(out) == k:
            break
    return out


def ablation_key(
    lm: LoadedModel,
    store: CodeStore,
    saes: Mapping[Site, SparseAutoencoder],
    wanted: Mapping[tuple[str, int], int],
    config: AblationConfig,
    filler: int,
) -> str:
    payload = {
        "model": lm.fingerprint(),
        "store": [store.manifest.get("fingerprint"), store.n_tokens],
        "saes": {str(s): sae_fingerprint(saes[s]) for s in sorted(saes)},
        "wanted": sorted([slug, int(f), int(k)] for (slug, f), k in wanted.items()),
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        "filler": filler,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class AblationResult(Result):
    """What the context ablation covered, the filler it used, and how well the rerun's
    clean activations match the store (a check that the rerun reads the same site)."""

    key: str
    directory: str
    features: int
    contexts: int
    sequences: int
    rows: int
    filler_id: int
    filler: str | None
    max_clean_mismatch: float
    config: AblationConfig
    seconds: float


def ablate(
    lm: LoadedModel,
    saes: Mapping[Site, SparseAutoencoder],
    store: CodeStore | str | Path,
    wanted: Mapping[tuple[str, int], int],
    out_dir: str | Path,
    config: AblationConfig = AblationConfig(),
    *,
    tokens: Tensor | None = None,
    decode: Decode | None = None,
) -> AblationResult:
    """Ablate the preceding tokens of each wanted feature's top contexts.

    `wanted` maps (site slug, feature) → how many top contexts; `saes` holds each site's
    SAE. `tokens` are the collected contexts (rows = the store's context ids); without
    them the contexts are rebuilt from the store's token table with BOS at position 0.
    Writes `ablation.parquet` and then `ablation.json` (the headline) into `out_dir`;
    a finished result with the same key is reused."""
    started = time.perf_counter()
    store = CodeStore.of(store)
    files = AblationFiles(Path(out_dir))
    sites = _check(lm, saes, store, wanted, config)
    filler = neutral_token(lm.tokenizer, config.filler)
    used = {s: saes[s] for s in sites}
    key = ablation_key(lm, store, used, wanted, config, filler)
    if (previous := AblationResult.finished(files, key)) is not None:
        return previous
    bos = lm.tokenizer.bos_token_id
    bos = lm.tokenizer.eos_token_id if bos is None else bos
    plan = _plan(store, sites, wanted, ContextTokens(store, bos, tokens), config, filler)
    values = _rerun(lm, saes, sites, plan, filler, config)
    text = _TokenText(decode)
    table = _table(plan, values, filler, text)
    files.path.mkdir(parents=True, exist_ok=True)
    atomic_write(files.ablation, partial(_write_parquet, table))
    clean = plan.clean(values)
    mismatch = [abs(it["stored"] - clean[i]) for i, it in enumerate(plan.items)]
    result = AblationResult(
        key=key,
        directory=str(files.path),
        features=len(wanted),
        contexts=len(plan.items),
        sequences=len(plan.runs),
        rows=table.height,
        filler_id=filler,
        filler=text(filler),
        max_clean_mismatch=float(max(mismatch, default=0.0)),
        config=config,
        seconds=time.perf_counter() - started,
    )
    result.write(files.result)
    return result


def _check(
    lm: LoadedModel,
    saes: Mapping[Site, SparseAutoencoder],
    store: CodeStore,
    wanted: Mapping[tuple[str, int], int],
    config: AblationConfig,
) -> set[Site]:
    """The sites asked for, each with an SAE, in the store and known to the model."""
    sites = {Site.parse(slug) for slug, _ in wanted}
    if missing := sorted(str(s) for s in sites if s not in saes):
        raise CoactError(f"no SAE for the sites {missing}: cannot encode their activations")
    for s in sites:
        if s.slug not in store.sites:
            raise CoactError(f"site {s} is not in the store {store.directory}")
        lm.adapter.check(s)
    if not set(config.modes) <= set(MODES) or not config.modes:
        raise CoactError(f"ablation modes {config.modes} must be among {MODES}")
    if config.window < 1 or config.batch_size < 1:
        raise CoactError("ablation window and batch size must be at least 1")
    return sites


@dataclass
class _Plan:
    """Every (feature, top context) item, its context's tokens, and the sequences to run."""

    items: list[dict[str, Any]] = field(default_factory=list)
    token_rows: list[np.ndarray] = field(default_factory=list)  # each item's context
    runs: list[Variant] = field(default_factory=list)

    def clean(self, values: np.ndarray) -> dict[int, float]:
        """Each item's activation on its clean context."""
        return {r.item: float(v) for r, v in zip(self.runs, values, strict=True) if r.mode is None}


def _plan(
    store: CodeStore,
    sites: set[Site],
    wanted: Mapping[tuple[str, int], int],
    context_tokens: ContextTokens,
    config: AblationConfig,
    filler: int,
) -> _Plan:
    plan = _Plan()
    for s in sorted(sites):
        csc = store.read_site(s.slug).tocsc()
        csc.sort_indices()
        for (slug, feature), k in wanted.items():
            if slug != s.slug:
                continue
            if not 0 <= feature < csc.shape[1]:
                raise CoactError(f"feature {feature} is not in {s} (width {csc.shape[1]})")
            lo, hi = csc.indptr[feature], csc.indptr[feature + 1]
            rows, values = csc.indices[lo:hi], csc.data[lo:hi].astype(np.float64)
            for rank, (row, value) in enumerate(top_rows(rows, values, context_tokens.context, k)):
                ctx, pos = int(context_tokens.context[row]), int(context_tokens.position[row])
                item = len(plan.items)
                plan.items.append(
                    {"site": s.slug, "feature": feature, "rank": rank + 1, "context": ctx,
                     "position": pos, "stored": value}
                )  # fmt: skip
                plan.token_rows.append(context_tokens(ctx))
                plan.runs += variants(item, plan.token_rows[item], pos, config, filler)
    return plan


def _rerun(
    lm: LoadedModel,
    saes: Mapping[Site, SparseAutoencoder],
    sites: set[Site],
    plan: _Plan,
    filler: int,
    config: AblationConfig,
) -> np.ndarray:
    """The feature's value at the activating token of every planned sequence."""
    bar = tqdm(
        total=len(plan.runs),
        desc="ablating contexts",
        unit="seq",
        disable=not config.progress,
        file=sys.stderr,
    )
    values = np.zeros(len(plan.runs))
    for s in sorted(sites):
        chosen = [i for i, r in enumerate(plan.runs) if plan.items[r.item]["site"] == s.slug]
        if not chosen:
            continue
        picked = [plan.runs[i] for i in chosen]
        features = [int(plan.items[r.item]["feature"]) for r in picked]
        values[chosen] = feature_values(
            lm, s, saes[s], picked, features, filler, config.batch_size, bar.update
        )
    bar.close()
    return values


class _TokenText:
    """A token id's text, decoded once (None without a decode function)."""

    def __init__(self, decode: Decode | None) -> None:
        self.decode, self.texts = decode, dict[int, str]()

    def __call__(self, token_id: int) -> str | None:
        if self.decode is None:
            return None
        if token_id not in self.texts:
            self.texts[token_id] = self.decode([token_id])
        return self.texts[token_id]


def _table(plan: _Plan, values: np.ndarray, filler: int, text: _TokenText) -> pl.DataFrame:
    """One row per ablated sequence: the clean and ablated activation and the drop."""
    clean = plan.clean(values)
    records = []
    for r, v in zip(plan.runs, values, strict=True):
        if r.mode is None:
            continue
        it, c = plan.items[r.item], clean[r.item]
        at = int(it["position"]) - r.offset
        ids = plan.token_rows[r.item]
        ablated_id = int(ids[at])
        records.append(
            {
                **it,
                "token_id": int(ids[int(it["position"])]),
                "token": text(int(ids[int(it["position"])])),
                "clean": c,
                "mode": r.mode,
                "ablated_offset": r.offset,
                "ablated_position": at,
                "ablated_id": ablated_id,
                "ablated_token": text(ablated_id),
                "replacement_id": filler if r.mode == "replace" else None,
                "ablated": float(v),
                "drop": c - float(v),
                "drop_fraction": (c - float(v)) / c if c > 0 else float("nan"),
            }
        )
    return pl.DataFrame(records, schema=COLUMNS)


def _write_parquet(table: pl.DataFrame, path: Path) -> None:
    table.write_parquet(path)


def most_important(table: pl.DataFrame) -> pl.DataFrame:
    """Per (site, feature, context, mode): the ablated token with the largest drop."""
    if not table.height:
        return table
    return (
        table.sort("drop", descending=True)
        .group_by(["site", "feature", "rank", "mode"], maintain_order=True)
        .first()
        .sort(["site", "feature", "rank", "mode"])
    )
