"""How good an SAE is at its site: variance explained, sparsity, and the model's own loss."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from coact.errors import CoactError
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import capture, next_token_loss, spliced_logits
from coact.progress import tqdm
from coact.rundir.results import Result
from coact.sae.base import SparseAutoencoder


@dataclass(frozen=True)
class SaeEvalConfig:
    forward_batch: int = 8
    skip_first_positions: int = 1  # BOS is neither encoded nor spliced


@dataclass(frozen=True)
class SaeReport:
    """FVE about the mean, mean L0, share of latents never active, and CE (nats/token)."""

    site: str
    n_tokens: int
    fve: float
    l0: float
    dead_fraction: float
    ce_clean: float
    ce_spliced: float
    ce_ablated: float
    # (CE_ablated − CE_spliced) / (CE_ablated − CE_clean); 1 is a perfect splice
    ce_recovered: float = field(init=False)

    def __post_init__(self) -> None:
        gap = self.ce_ablated - self.ce_clean
        recovered = (self.ce_ablated - self.ce_spliced) / gap if gap != 0 else float("nan")
        object.__setattr__(self, "ce_recovered", recovered)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class SaeEvaluation(Result):
    """A saved evaluation (`<shared>/sae_eval/<site>.json`): reused while its key (model,
    SAE weights, evaluation tokens, site, settings) is unchanged."""

    key: str
    report: SaeReport


def check_sae_fits(
    sae: SparseAutoencoder, site: Site, d_model: int, mlp_resid_kind: str | None = None
) -> None:
    """An SAE trained for another width or site must not be used silently. `mlp_resid[ℓ]`
    and the stream it names in this model (`mlp_resid_kind`: resid_pre in parallel models,
    resid_mid in sequential ones) are the same site, either way round."""
    if sae.d_in != d_model:
        raise CoactError(
            f"SAE for {site} reads {sae.d_in}-dim activations but the model's {site} is "
            f"{d_model}-dim; use an SAE trained on this model and site"
        )
    if sae.site is not None and sae.site != str(site):
        same = {str(site)}
        if mlp_resid_kind is not None and site.kind in ("mlp_resid", mlp_resid_kind):
            same |= {f"mlp_resid[{site.layer}]", f"{mlp_resid_kind}[{site.layer}]"}
        elif site.kind in ("resid_pre", "resid_mid"):  # model unknown: the old label only
            same.add(str(Site("mlp_resid", site.layer)))
        if sae.site not in same:
            raise CoactError(f"SAE was trained for site {sae.site} but is used at {site}")


def evaluate_sae(
    lm: LoadedModel,
    sae: SparseAutoencoder,
    site: Site,
    tokens: Tensor,
    config: SaeEvalConfig = SaeEvalConfig(),
) -> SaeReport:
    """Evaluate on contexts the SAE was not trained on."""
    return evaluate_saes(lm, {site: sae}, tokens, config)[site]


@torch.no_grad()
def evaluate_saes(
    lm: LoadedModel,
    saes: Mapping[Site, SparseAutoencoder],
    tokens: Tensor,
    config: SaeEvalConfig = SaeEvalConfig(),
) -> dict[Site, SaeReport]:
    """Evaluate several SAEs on the same contexts: per batch one pass captures every site
    and one clean pass gives the clean loss they share, so each SAE costs two forward
    passes (spliced, ablated) instead of three and a half."""
    for site, sae in saes.items():
        check_sae_fits(sae, site, lm.adapter.d_model, lm.adapter.mlp_resid_kind())
    skip = config.skip_first_positions
    sites = list(saes)
    stats = {site: _Running(saes[site].width, lm.device) for site in sites}
    ce_clean = 0.0

    def splice(fn: Any) -> Any:
        def apply(x: Tensor) -> Tensor:
            out = x.clone()
            out[:, skip:] = fn(x[:, skip:])
            return out

        return apply

    starts = range(0, tokens.shape[0], config.forward_batch)
    bar = tqdm(total=len(starts) * len(sites), desc=f"evaluating {len(sites)} SAEs")
    for start in starts:
        batch = tokens[start : start + config.forward_batch].to(lm.device)
        captured = capture(lm, batch, sites)
        ce_clean += float(
            next_token_loss(spliced_logits(lm, batch, None, None), batch)[:, skip:].sum()
        )
        for site in sites:
            sae, running = saes[site], stats[site]
            x = captured[site][:, skip:].reshape(-1, sae.d_in)
            running.add(x, sae)

            def reconstruct(x: Tensor, sae: SparseAutoencoder = sae) -> Tensor:
                return sae.decode(sae.encode(x))

            for name, fn in (("spliced", reconstruct), ("ablated", torch.zeros_like)):
                logits = spliced_logits(lm, batch, site, splice(fn))
                running.ce[name] += float(next_token_loss(logits, batch)[:, skip:].sum())
            bar.set_postfix_str(str(site))
            bar.update()
    bar.close()
    n_pred = tokens.shape[0] * (tokens.shape[1] - 1 - skip)
    return {site: stats[site].report(site, ce_clean / n_pred, n_pred) for site in sites}


class _Running:
    """One SAE's sums over the evaluation batches."""

    def __init__(self, width: int, device: Any) -> None:
        self.sq_err = self.sum_x2 = self.l0_sum = 0.0
        self.sum_x: Tensor | None = None
        self.n = 0
        self.fired = torch.zeros(width, dtype=torch.bool, device=device)
        self.ce = {"spliced": 0.0, "ablated": 0.0}

    def add(self, x: Tensor, sae: SparseAutoencoder) -> None:
        codes = sae.encode(x)
        self.sq_err += float((x - sae.decode(codes)).pow(2).sum())
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_x2 += float(x.pow(2).sum())
        self.n += x.shape[0]
        self.l0_sum += float((codes > 0).sum())
        self.fired |= (codes > 0).any(0)

    def report(self, site: Site, ce_clean: float, n_pred: int) -> SaeReport:
        assert self.sum_x is not None
        total_var = self.sum_x2 - float(self.sum_x.pow(2).sum()) / self.n
        return SaeReport(
            site=str(site),
            n_tokens=self.n,
            fve=1.0 - self.sq_err / total_var,
            l0=self.l0_sum / self.n,
            dead_fraction=1.0 - float(self.fired.float().mean()),
            ce_clean=ce_clean,
            ce_spliced=self.ce["spliced"] / n_pred,
            ce_ablated=self.ce["ablated"] / n_pred,
        )
