"""Tables of what named splices at a site cost the model's next-token loss.

A splice replaces a site's activation by something else (a connector's prediction, an SAE
reconstruction, zero). For a set of named splices this measures, per context, the CE and
KL(clean ‖ spliced) with one clean pass per batch, and summarises them as token-weighted
means with paired context-bootstrap intervals: ΔCE, KL, and the share of the zero
ablation's loss each splice recovers. The per-context losses and the bootstrap are in
`coact.calibrate.losses`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from coact.calibrate.losses import (
    _check_tokens,
    after_skip,
    bootstrap_mean_ratio,
    context_losses,
)
from coact.errors import CoactError
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import SpliceFn, spliced_logits
from coact.progress import tqdm


@dataclass(frozen=True)
class SpliceLosses:
    """Per context: clean CE, predicted positions, and CE and KL under each named splice."""

    names: list[str]
    ce_clean: np.ndarray  # (contexts,)
    n_tokens: np.ndarray  # (contexts,)
    ce: np.ndarray  # (contexts, splices)
    kl: np.ndarray  # (contexts, splices): KL(clean ‖ spliced)

    def column(self, name: str) -> int:
        return self.names.index(name)


# For one batch of tokens: a function from a splice's name to the logits under it.
SplicedLogits = Callable[[Tensor], Callable[[str], Tensor]]


@torch.no_grad()
def splice_losses(
    lm: LoadedModel,
    tokens: Tensor,
    names: Sequence[str],
    spliced: SplicedLogits,
    *,
    batch_size: int = 8,
    skip_first_positions: int = 1,
    desc: str = "splicing",
    progress: bool = True,
) -> SpliceLosses:
    """One clean pass per batch, then one pass per splice, reusing the clean logits for KL.
    `spliced(batch)` may prepare per-batch state (e.g. a connector's predictions) once."""
    skip = skip_first_positions
    _check_tokens(tokens, skip)
    names = list(names)
    ce_clean, n_tok = [], []
    ce: dict[str, list[np.ndarray]] = {name: [] for name in names}
    kl: dict[str, list[np.ndarray]] = {name: [] for name in names}
    starts = range(0, tokens.shape[0], batch_size)
    bar = tqdm(total=len(starts) * len(names), desc=desc, disable=not progress)
    for start in starts:
        batch = tokens[start : start + batch_size].to(lm.device)
        clean_logits = spliced_logits(lm, batch, None, None)
        clean = context_losses(clean_logits, batch, skip)
        ce_clean.append(clean.ce)
        n_tok.append(clean.n_tokens)
        logits_of = spliced(batch)
        for name in names:
            out = context_losses(logits_of(name), batch, skip, clean_logits)
            ce[name].append(out.ce)
            kl[name].append(out.kl)
            bar.update(1)
    bar.close()
    return SpliceLosses(
        names,
        np.concatenate(ce_clean),
        np.concatenate(n_tok),
        np.stack([np.concatenate(ce[name]) for name in names], axis=1),
        np.stack([np.concatenate(kl[name]) for name in names], axis=1),
    )


def splice_summary(
    losses: SpliceLosses,
    *,
    baseline: str = "zero",
    reference: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pl.DataFrame:
    """Token-weighted means with context-bootstrap intervals, one row per splice: ΔCE and
    KL against the clean model and ce_recovered = (CE_baseline − CE_spliced) / (CE_baseline
    − CE_clean); with `reference`, also the extra ΔCE and KL over that splice, paired by
    context. Every column resamples the same contexts, so differences stay paired."""
    base, n, spliced, kls = losses.ce_clean, losses.n_tokens, losses.ce, losses.kl
    boot = (n_boot, seed, level)
    ablated = spliced[:, losses.column(baseline)]
    delta = bootstrap_mean_ratio(spliced - base[:, None], n, *boot)
    kl = bootstrap_mean_ratio(kls, n, *boot)
    recovered = bootstrap_mean_ratio(ablated[:, None] - spliced, ablated - base, *boot)
    columns: dict[str, Any] = {
        "splice": losses.names,
        "ce_clean": float(base.sum() / n.sum()),
        "ce_spliced": spliced.sum(0) / n.sum(),
        "delta_ce": delta.point,
        "delta_ce_low": delta.low,
        "delta_ce_high": delta.high,
        "kl": kl.point,
        "kl_low": kl.low,
        "kl_high": kl.high,
    }
    if reference is not None:
        col = losses.column(reference)
        extra = bootstrap_mean_ratio(spliced - spliced[:, [col]], n, *boot)
        extra_kl = bootstrap_mean_ratio(kls - kls[:, [col]], n, *boot)
        for name, interval in (("extra_delta_ce", extra), ("extra_kl", extra_kl)):
            columns.update(
                {name: interval.point, f"{name}_low": interval.low, f"{name}_high": interval.high}
            )
    columns.update(
        {
            "ce_recovered": recovered.point,
            "ce_recovered_low": recovered.low,
            "ce_recovered_high": recovered.high,
            "n_tokens": int(n.sum()),
            "n_contexts": len(n),
        }
    )
    return pl.DataFrame(columns)


@torch.no_grad()
def splice_table(
    lm: LoadedModel,
    tokens: Tensor,
    site: Site,
    splices: Mapping[str, SpliceFn],
    *,
    batch_size: int = 8,
    skip_first_positions: int = 1,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pl.DataFrame:
    """One row per named splice of `site`, plus the zero ablation as the row "zero".

    Columns: mean CE clean and spliced, ΔCE and KL(clean ‖ spliced) per predicted token
    with bootstrap intervals, and ce_recovered = (CE_zero − CE_spliced) / (CE_zero −
    CE_clean), whose interval resamples numerator and denominator with the same contexts.
    A splice under the name "zero" must be torch.zeros_like, since that row is the baseline.
    """
    skip = skip_first_positions
    if "zero" in splices and splices["zero"] is not torch.zeros_like:
        raise CoactError('the splice name "zero" is reserved for the zero ablation')
    named: dict[str, SpliceFn] = {k: v for k, v in splices.items() if k != "zero"}
    named["zero"] = torch.zeros_like

    def spliced(batch: Tensor) -> Callable[[str], Tensor]:
        return lambda name: spliced_logits(lm, batch, site, after_skip(named[name], skip))

    losses = splice_losses(
        lm, tokens, list(named), spliced, batch_size=batch_size, skip_first_positions=skip,
        desc=f"splicing {site}",
    )  # fmt: skip
    table = splice_summary(losses, n_boot=n_boot, seed=seed, level=level)
    return table.insert_column(1, pl.Series("site", [str(site)] * table.height))


__all__ = [
    "SpliceLosses",
    "SplicedLogits",
    "splice_losses",
    "splice_summary",
    "splice_table",
]
