"""A tiny real transformer whose MLP of one layer computes a known rule on SAE features.

The planted MLP reads the raw residual stream (its norm is replaced by the identity) and
writes exactly ``sae_out.decode(f(B @ sae_in.encode(stream)))``, with f the identity
(linear plant) or ``ReLU(· − θ)`` (threshold plant: mixed-sign B, so some outputs are
AND-like or A-AND-NOT-B). ``sae_out`` has orthonormal decoder rows, ``W_enc = W_decᵀ`` and
zero biases, so re-encoding the MLP output gives back f(B c) exactly: the out-site codes
are the rule's output, not an estimate of it. Everything downstream of the planted layer
(attention, later blocks, the LM head) is the untouched random model, so the plant can
be traced, spliced and scored like any model.

With ``in_kind="exact"`` the input SAE's encoder is a right inverse of its decoder
(``W_dec @ W_enc = I``: orthogonal decoder rows, each encoder column the matching row
rescaled): subtracting ``c_i · W_dec[i]`` from the stream then zeroes code i and moves no
other code, so an ablation's effect on the plant is known in closed form. Any biases keep
that property, so they are set to make each feature fire on a chosen share of tokens.
``in_kind="random"`` uses unrelated random encoder and decoder directions instead.

Float32 rounding leaves out-site codes of order 1e-7 where the rule gives 0 (the decoder
rows are orthonormal only to rounding): count a feature active above a small tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from coact.models.adapters import resolve
from coact.models.load import LoadedModel, load_model
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.sae.base import Sae

PlantKind = Literal["linear", "threshold"]
InKind = Literal["exact", "random"]
AttnKind = Literal["previous", "current"]


class PlantedMlp(nn.Module):
    """stream ↦ sae_out.decode(f(sae_in.encode(stream) @ Bᵀ)), f = ReLU(· − θ) or identity."""

    def __init__(self, sae_in: Sae, sae_out: Sae, B: Tensor, theta: Tensor | None) -> None:
        super().__init__()
        self.sae_in, self.sae_out = sae_in, sae_out
        self.B: Tensor
        self.theta: Tensor | None
        self.register_buffer("B", B)
        self.register_buffer("theta", theta)

    def rule(self, codes: Tensor) -> Tensor:
        """The out-site codes the plant writes for these in-site codes."""
        z = codes @ self.B.T
        return z if self.theta is None else torch.relu(z - self.theta)

    def forward(self, stream: Tensor) -> Tensor:
        return self.sae_out.decode(self.rule(self.sae_in.encode(stream)))


@dataclass
class PlantedModel:
    """The model, the planted layer, both SAEs, the rule's weights B (n_out × n_in) and θ."""

    lm: LoadedModel
    layer: int
    sae_in: Sae
    sae_out: Sae
    B: Tensor
    theta: Tensor | None
    mlp: PlantedMlp

    def rule(self, codes: Tensor) -> Tensor:
        return self.mlp.rule(codes)

    @property
    def sites(self) -> tuple[Site, Site]:
        return Site("mlp_resid", self.layer), Site("mlp_out", self.layer)


def random_tokens(n_contexts: int, seq: int, seed: int = 0, vocab: int = 259) -> Tensor:
    """Token ids for the tiny models (their byte tokenizer has 259 ids)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n_contexts, seq), generator=gen)


def planted_model(
    kind: PlantKind = "linear",
    *,
    layer: int = 1,
    width_in: int = 48,
    width_out: int = 32,
    in_kind: InKind = "exact",
    rates: tuple[float, float] = (0.05, 0.3),
    dead_inputs: int = 0,
    and_threshold: float = 1.5,
    seed: int = 0,
    model: str = "tiny-llama",
    device: str = "cpu",
) -> PlantedModel:
    """Build the plant. Input feature k fires on about a share U(rates) of tokens (measured
    on random tokens), its median active code is 1; the last `dead_inputs` features never
    fire and no output reads them. Linear plant: each output reads 1–3 inputs with weights
    in [0.5, 1.5] (B ≥ 0, so codes stay ≥ 0). Threshold plant, by output j mod 3: a sum of
    1–2 inputs (θ = 0), an AND of two (weights 1, 1, θ = `and_threshold`), an A-AND-NOT-B
    (weights 1, −1, θ = 0). Built on the CPU, then moved with its SAEs to `device` (the
    returned B and θ stay on the CPU)."""
    lm = load_model(model, seed=seed)
    if getattr(lm, "_nnsight", None) is not None:
        raise RuntimeError("the nnsight view was made before the modules were replaced")
    d_model = lm.adapter.d_model
    if width_out > d_model or (in_kind == "exact" and width_in > d_model):
        raise ValueError(f"orthonormal SAEs need width ≤ d_model = {d_model}")
    if not 0 <= dead_inputs < width_in:
        raise ValueError(f"dead_inputs must be in [0, {width_in}), got {dead_inputs}")
    gen = torch.Generator().manual_seed(seed + 1)
    sae_in = _input_sae(d_model, width_in, in_kind, gen)
    sae_out = _orthonormal_sae(d_model, width_out, gen)
    sae_in.site, sae_out.site = str(Site("mlp_resid", layer)), str(Site("mlp_out", layer))
    live = width_in - dead_inputs
    if kind == "linear":
        B, theta = _linear_rule(width_out, live, width_in, gen), None
    else:
        B, theta = _threshold_rule(width_out, live, width_in, and_threshold, gen)
    mlp = PlantedMlp(sae_in, sae_out, B, theta)
    # Replace the modules before anything wraps the model (tracing caches its view).
    point = lm.adapter.mlp_input_point(layer)
    _replace(lm.model, point.path, nn.Identity())
    _replace(lm.model, lm.adapter.mlp_path(layer), mlp)
    lm.model.eval().requires_grad_(False)
    _calibrate(lm, layer, sae_in, live, rates, gen, seed)
    if device != "cpu":  # the planted MLP holds both SAEs: they move with it
        B, theta = B.clone(), None if theta is None else theta.clone()
        lm.model.to(device)
    return PlantedModel(lm, layer, sae_in, sae_out, B, theta, mlp)


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(resolve(root, parent), name, module)


def _orthonormal_rows(n: int, d: int, gen: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=gen))
    return q.T.contiguous()  # n × d, orthonormal rows


def _orthonormal_sae(d_model: int, width: int, gen: torch.Generator) -> Sae:
    """encode(decode(c)) = ReLU(c) = c for any c ≥ 0."""
    sae = Sae(d_model, width, activation="relu")
    rows = _orthonormal_rows(width, d_model, gen)
    with torch.no_grad():
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows.T)
    return sae.eval().requires_grad_(False)


def _input_sae(d_model: int, width: int, in_kind: InKind, gen: torch.Generator) -> Sae:
    """Unit directions; `_calibrate` sets scales and biases from the model's stream."""
    if in_kind == "exact":
        return _orthonormal_sae(d_model, width, gen)
    sae = Sae(d_model, width, activation="relu")
    with torch.no_grad():
        dec = torch.randn(width, d_model, generator=gen)
        enc = torch.randn(d_model, width, generator=gen)
        sae.W_dec.copy_(dec / dec.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(enc / enc.norm(dim=0, keepdim=True))
    return sae.eval().requires_grad_(False)


def _calibrate(
    lm: LoadedModel,
    layer: int,
    sae: Sae,
    live: int,
    rates: tuple[float, float],
    gen: torch.Generator,
    seed: int,
    site: Site | None = None,
) -> None:
    """Scale encoder column k by s and decoder row k by 1/s (W_dec W_enc is unchanged) and
    set b_enc so feature k fires on a share U(rates) of tokens with median active code 1
    (at `site`; by default the stream the MLP of `layer` reads)."""
    site = site or Site("mlp_resid", layer)
    stream = capture(lm, random_tokens(32, 32, seed=seed + 2), [site])[site][:, 1:]
    proj = stream.reshape(-1, sae.d_in) @ sae.W_enc  # tokens × width
    rate = rates[0] + (rates[1] - rates[0]) * torch.rand(sae.width, generator=gen)
    rank = ((1 - rate) * (proj.shape[0] - 1)).round().long()
    cut = proj.sort(dim=0).values[rank, torch.arange(sae.width)]
    above = torch.where(proj > cut, proj - cut, torch.nan)
    scale = 1 / above.nanmedian(dim=0).values
    with torch.no_grad():
        sae.W_enc.mul_(scale)
        sae.W_dec.div_(scale[:, None])
        sae.b_enc.copy_(-scale * cut)
        sae.b_enc[live:] = -1e6  # dead features: never fire


def _pick(live: int, k: int, gen: torch.Generator) -> Tensor:
    return torch.randperm(live, generator=gen)[:k]


def _linear_rule(n_out: int, live: int, n_in: int, gen: torch.Generator) -> Tensor:
    B = torch.zeros(n_out, n_in)
    for j in range(n_out):
        k = int(torch.randint(1, 4, (), generator=gen))
        B[j, _pick(live, k, gen)] = 0.5 + torch.rand(k, generator=gen)
    return B


def _threshold_rule(
    n_out: int, live: int, n_in: int, and_threshold: float, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    B, theta = torch.zeros(n_out, n_in), torch.zeros(n_out)
    for j in range(n_out):
        if j % 3 == 0:  # weighted sum
            k = int(torch.randint(1, 3, (), generator=gen))
            B[j, _pick(live, k, gen)] = 0.5 + torch.rand(k, generator=gen)
        elif j % 3 == 1:  # AND: needs both (most of the time)
            B[j, _pick(live, 2, gen)] = 1.0
            theta[j] = and_threshold
        else:  # A AND NOT B
            a, b = _pick(live, 2, gen).tolist()
            B[j, a], B[j, b] = 1.0, -1.0
    return B, theta


class PlantedAttention(nn.Module):
    """Stands in for one block's attention: writes sae_out.decode(B @ sae_in.encode(stream
    at t − lag)), lag 1 (a previous-token copy) or 0 (position-local). Positions before
    `skip` are never read (the store does not hold BOS, so its codes must not leak into
    the output). Takes the real attention's call (hidden states first, positionally or by
    name; mask, position embeddings and cache as ignored keywords) and returns what the
    decoder layer unpacks: (output, attention weights = None)."""

    def __init__(self, sae_in: Sae, sae_out: Sae, B: Tensor, lag: int, skip: int = 1) -> None:
        super().__init__()
        self.sae_in, self.sae_out, self.lag, self.skip = sae_in, sae_out, lag, skip
        self.B: Tensor
        self.register_buffer("B", B)

    def rule(self, codes: Tensor) -> Tensor:
        """Out-site codes at every position from in-site codes (batch, seq, width_in)."""
        codes = codes.clone()
        codes[:, : self.skip] = 0
        if self.lag:
            codes = torch.cat([torch.zeros_like(codes[:, : self.lag]), codes[:, : -self.lag]], 1)
        return codes @ self.B.T

    def forward(
        self, hidden_states: Tensor, *args: object, **kwargs: object
    ) -> tuple[Tensor, None]:
        return self.sae_out.decode(self.rule(self.sae_in.encode(hidden_states))), None


@dataclass
class PlantedAttentionModel:
    """The model whose attention of `layer` is planted, both SAEs and the rule's B."""

    lm: LoadedModel
    layer: int
    kind: AttnKind
    sae_in: Sae
    sae_out: Sae
    B: Tensor
    attn: PlantedAttention

    def rule(self, codes: Tensor) -> Tensor:
        return self.attn.rule(codes)

    @property
    def sites(self) -> tuple[Site, Site]:
        return Site("resid_pre", self.layer), Site("attn_out", self.layer)


def planted_attention(
    kind: AttnKind = "previous",
    *,
    layer: int = 1,
    width_in: int = 48,
    width_out: int = 32,
    rates: tuple[float, float] = (0.05, 0.3),
    seed: int = 0,
    model: str = "tiny-llama",
) -> PlantedAttentionModel:
    """A tiny Llama whose attention of `layer` reads the raw stream (its norm replaced by
    the identity) and writes out codes B·c_in[t−1] ("previous") or B·c_in[t] ("current"),
    B as the linear MLP plant (1–3 inputs per output, weights in [0.5, 1.5]). The input
    SAE is exact and calibrated on resid_pre[layer]; the output SAE orthonormal, so the
    attn_out codes are the rule's output to float32 rounding."""
    lm = load_model(model, seed=seed)
    if getattr(lm, "_nnsight", None) is not None:
        raise RuntimeError("the nnsight view was made before the modules were replaced")
    d_model = lm.adapter.d_model
    if max(width_in, width_out) > d_model:
        raise ValueError(f"orthonormal SAEs need width ≤ d_model = {d_model}")
    gen = torch.Generator().manual_seed(seed + 1)
    sae_in = _orthonormal_sae(d_model, width_in, gen)
    sae_out = _orthonormal_sae(d_model, width_out, gen)
    site_in, site_out = Site("resid_pre", layer), Site("attn_out", layer)
    sae_in.site, sae_out.site = str(site_in), str(site_out)
    B = _linear_rule(width_out, width_in, width_in, gen)
    attn = PlantedAttention(sae_in, sae_out, B, lag=1 if kind == "previous" else 0)
    _replace(lm.model, lm.adapter.attn_norm_path(layer), nn.Identity())
    _replace(lm.model, lm.adapter.attn_path(layer), attn)
    lm.model.eval().requires_grad_(False)
    _calibrate(lm, layer, sae_in, width_in, rates, gen, seed, site=site_in)
    return PlantedAttentionModel(lm, layer, kind, sae_in, sae_out, B, attn)
