"""How good an SAE is at its site: variance explained, sparsity, and the model's own loss."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from coact.errors import CoactError
from coact.models import LoadedModel
from coact.sae.base import SparseAutoencoder
from coact.sites import Site
from coact.tracing import capture, next_token_loss, spliced_logits


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

    @property
    def ce_recovered(self) -> float:
        """(CE_ablated − CE_spliced) / (CE_ablated − CE_clean); 1 is a perfect splice."""
        gap = self.ce_ablated - self.ce_clean
        return (self.ce_ablated - self.ce_spliced) / gap if gap != 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ce_recovered": self.ce_recovered}


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


@torch.no_grad()
def evaluate_sae(
    lm: LoadedModel,
    sae: SparseAutoencoder,
    site: Site,
    tokens: Tensor,
    config: SaeEvalConfig = SaeEvalConfig(),
) -> SaeReport:
    """Evaluate on contexts the SAE was not trained on."""
    check_sae_fits(sae, site, lm.adapter.d_model, lm.adapter.mlp_resid_kind())
    skip = config.skip_first_positions
    sq_err = total_var = 0.0
    sum_x = sum_x2 = None
    n = 0
    l0_sum = 0.0
    fired = torch.zeros(sae.width, dtype=torch.bool, device=lm.device)
    ce = {"clean": 0.0, "spliced": 0.0, "ablated": 0.0}

    def splice(fn: Any) -> Any:
        def apply(x: Tensor) -> Tensor:
            out = x.clone()
            out[:, skip:] = fn(x[:, skip:])
            return out

        return apply

    def reconstruct(x: Tensor) -> Tensor:
        return sae.decode(sae.encode(x))

    for start in tqdm(range(0, tokens.shape[0], config.forward_batch), desc=f"evaluating {site}"):
        batch = tokens[start : start + config.forward_batch].to(lm.device)
        x = capture(lm, batch, [site])[site][:, skip:].reshape(-1, sae.d_in)
        codes = sae.encode(x)
        sq_err += float((x - sae.decode(codes)).pow(2).sum())
        sum_x = x.sum(0) if sum_x is None else sum_x + x.sum(0)
        sq = float(x.pow(2).sum())
        sum_x2 = sq if sum_x2 is None else sum_x2 + sq
        n += x.shape[0]
        l0_sum += float((codes > 0).sum())
        fired |= (codes > 0).any(0)
        for name, fn in (("clean", None), ("spliced", reconstruct), ("ablated", torch.zeros_like)):
            logits = spliced_logits(lm, batch, site if fn else None, splice(fn) if fn else None)
            ce[name] += float(next_token_loss(logits, batch)[:, skip:].sum())
    assert sum_x is not None and sum_x2 is not None
    total_var = sum_x2 - float(sum_x.pow(2).sum()) / n
    n_pred = tokens.shape[0] * (tokens.shape[1] - 1 - skip)
    return SaeReport(
        site=str(site),
        n_tokens=n,
        fve=1.0 - sq_err / total_var,
        l0=l0_sum / n,
        dead_fraction=1.0 - float(fired.float().mean()),
        ce_clean=ce["clean"] / n_pred,
        ce_spliced=ce["spliced"] / n_pred,
        ce_ablated=ce["ablated"] / n_pred,
    )
