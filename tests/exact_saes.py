"""SAEs that lose nothing: codes (ReLU(x), ReLU(−x)) decode back to x exactly.

W_dec = [I; −I] (2d × d), W_enc = W_decᵀ, zero biases, ReLU: encode(x) = (ReLU(x), ReLU(−x))
and decode(c) = ReLU(x) − ReLU(−x) = x. Any linear identity between activations then holds
between the decoded codes too, so checks built on it must come out at zero error.
"""

from __future__ import annotations

import torch

from coact.models.sites import Site
from coact.sae.base import Sae


def exact_sae(d_model: int, site: Site | None = None) -> Sae:
    sae = Sae(d_model, 2 * d_model, activation="relu", site=None if site is None else str(site))
    eye = torch.eye(d_model)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(sae.W_dec.T)
    return sae.eval().requires_grad_(False)
