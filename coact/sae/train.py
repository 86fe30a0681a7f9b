"""Training TopK SAEs on activations streamed from the model, with AuxK dead-latent revival.

Activations are captured a buffer of contexts at a time, shuffled within the buffer and
fed in batches, so memory stays bounded by the buffer. Inputs are divided by one scalar
during training (so the learning rate does not depend on the site's norm) and the scalar
is folded back into the weights at the end: the saved SAE reads raw activations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from coact.errors import CoactError
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.progress import tqdm
from coact.sae.base import Sae
from coact.settings import check_ranges, setting


@dataclass(frozen=True)
class SaeTrainConfig:
    """Defaults sized so two SAEs on SmolLM2 train in a few CPU minutes."""

    expansion: int = setting(4, "width = expansion × d_model", low=1)
    k: int = setting(32, "active latents per token", low=1)
    batch_tokens: int = 1024
    buffer_contexts: int = 128
    forward_batch: int = 16  # contexts per forward pass while filling the buffer
    # None: 8e-4 / sqrt(width / 2**14), sparsify's rule ×4: better for our short CPU budgets
    lr: float | None = None
    auxk_alpha: float = 1 / 32
    dead_after_tokens: int = 100_000
    skip_first_positions: int = 1  # the BOS position is an attention sink with a huge norm
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class TrainLog:
    """Per-step training curve of one SAE."""

    fvu: list[float] = field(default_factory=list)
    auxk: list[float] = field(default_factory=list)
    dead_fraction: list[float] = field(default_factory=list)
    tokens_seen: int = 0


def shuffled_activations(
    lm: LoadedModel,
    tokens: Tensor,
    sites: Sequence[Site],
    config: SaeTrainConfig,
    generator: torch.Generator,
    desc: str,
) -> Iterator[dict[Site, Tensor]]:
    """The activations at `sites` of `config.buffer_contexts` contexts at a time (their
    first `skip_first_positions` positions left out), rows shuffled alike by `generator`:
    the buffers the SAE and transcoder trainers step through, one after the other."""
    skip = config.skip_first_positions
    bar = tqdm(total=tokens.shape[0] * (tokens.shape[1] - skip), desc=desc, unit="tok")
    for start in range(0, tokens.shape[0], config.buffer_contexts):
        chunk = tokens[start : start + config.buffer_contexts]
        buffers: dict[Site, list[Tensor]] = {site: [] for site in sites}
        for j in range(0, chunk.shape[0], config.forward_batch):
            acts = capture(lm, chunk[j : j + config.forward_batch], sites)
            for site in sites:
                buffers[site].append(acts[site][:, skip:].reshape(-1, acts[site].shape[-1]))
        order = torch.randperm(chunk.shape[0] * (tokens.shape[1] - skip), generator=generator)
        yield {site: torch.cat(parts)[order.to(lm.device)] for site, parts in buffers.items()}
        bar.update(len(order))
    bar.close()


def train_saes(
    lm: LoadedModel,
    tokens: Tensor,
    sites: Sequence[Site],
    config: SaeTrainConfig = SaeTrainConfig(),
) -> dict[Site, tuple[Sae, TrainLog]]:
    """Train one TopK SAE per site on the contexts `tokens` (n_ctx, ctx_len), in one pass."""
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise CoactError("no training contexts: the corpus gave no tokens for SAE training")
    generator = torch.Generator().manual_seed(config.seed)
    trainers: dict[Site, SaeTrainer] = {}
    desc = f"training SAEs at {', '.join(map(str, sites))}"
    for buffer in shuffled_activations(lm, tokens, sites, config, generator, desc):
        for site in sites:
            data = buffer[site]
            if site not in trainers:
                trainers[site] = SaeTrainer(data, config, generator, site=str(site))
            trainer = trainers[site]
            for b in range(0, data.shape[0], config.batch_tokens):
                trainer.step(data[b : b + config.batch_tokens])
    trained = {site: (t.finish(), t.log) for site, t in trainers.items()}
    for site, (sae, _) in trained.items():
        if site.kind == "mlp_resid":  # the real stream it reads, for SAELens's hook name
            sae.metadata["mlp_resid_kind"] = lm.adapter.mlp_resid_kind()
    return trained


class SaeTrainer:
    """One TopK SAE being trained; `first` (a batch of activations) sets its init and scale."""

    def __init__(
        self,
        first: Tensor,
        config: SaeTrainConfig,
        gen: torch.Generator,
        *,
        site: str | None = None,
    ) -> None:
        d_in = first.shape[-1]
        width = config.expansion * d_in
        self.config = config
        self.mean = first.mean(0)
        self.scale = float((first - self.mean).pow(2).sum(-1).mean().sqrt()) / math.sqrt(d_in)
        if not math.isfinite(self.scale) or self.scale == 0:
            raise CoactError(f"activations at {site} are constant or non-finite; cannot train")
        sae = Sae(d_in, width, activation="topk", k=config.k, site=site).to(first.device)
        with torch.no_grad():
            direction = torch.randn(width, d_in, generator=gen).to(first.device)
            sae.W_dec.copy_(direction / direction.norm(dim=-1, keepdim=True))
            sae.W_enc.copy_(sae.W_dec.T)
            sae.b_dec.copy_(self.mean / self.scale)
        self.sae = sae
        lr = config.lr or 8e-4 / math.sqrt(width / 2**14)
        fused = first.device.type == "cuda"
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=lr, fused=fused)
        self.last_fired = torch.zeros(width, dtype=torch.long, device=first.device)
        self.log = TrainLog()
        self.k_aux = d_in // 2

    def step(self, batch: Tensor) -> None:
        """One Adam step on FVU + α·AuxK, touching only the latents each token uses.

        The encoder's dense product is the one full-width matrix product; the decoder,
        its gradient and the encoder's gradient run over the k (and AuxK) chosen latents
        per token, which is what makes a TopK SAE cheap to train on a CPU.
        """
        sae, config, log = self.sae, self.config, self.log
        x = batch / self.scale
        centred = x - sae.b_dec if sae.subtract_decoder_bias else x
        with torch.no_grad():
            pre = torch.addmm(sae.b_enc, centred, sae.W_enc)
            indices = pre.topk(config.k, dim=-1, sorted=False).indices  # ReLU'd below
        values = torch.relu(gather_pre(centred, sae.W_enc, sae.b_enc, indices, pre))
        recon = sparse_decode(indices, values, sae.W_dec) + sae.b_dec
        error = x - recon
        denom = (x - x.mean(0)).pow(2).sum()
        fvu = error.pow(2).sum() / denom
        log.tokens_seen += x.shape[0]
        dead = mark_fired(
            self.last_fired, indices, values, log.tokens_seen, config.dead_after_tokens
        )
        n_dead = int(dead.sum())
        auxk = auxk_loss(centred, sae.W_enc, sae.b_enc, sae.W_dec, pre, dead, error, self.k_aux)
        loss = fvu + config.auxk_alpha * auxk
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
        log.fvu.append(float(fvu.detach()))
        log.auxk.append(float(auxk.detach()))
        log.dead_fraction.append(n_dead / sae.width)

    def finish(self) -> Sae:
        """Fold the input scale into the weights so the SAE reads raw activations."""
        sae, s = self.sae, self.scale
        with torch.no_grad():
            sae.W_enc.div_(s)
            sae.b_dec.mul_(s)
            sae.W_dec.mul_(s)
        sae.metadata.update(
            {"trained_by": "coact", "tokens": self.log.tokens_seen, "input_scale": s}
        )
        return sae.eval().requires_grad_(False)


def dense_loss(trainer: SaeTrainer, batch: torch.Tensor, tokens_seen: int) -> torch.Tensor:
    """The step's loss written with full-width codes: the reference the sparse step is
    tested and benchmarked against (`tokens_seen` counts the batch, as the step does)."""
    sae, config = trainer.sae, trainer.config
    x = batch / trainer.scale
    pre = sae.pre_activations(x)
    codes = sae.activate(pre)
    error = x - sae.decode(codes)
    fvu = error.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    last_fired = torch.where((codes > 0).any(0), tokens_seen, trainer.last_fired)
    dead = (tokens_seen - last_fired) > config.dead_after_tokens
    if not dead.any():
        return fvu
    dead_pre = torch.where(dead, torch.relu(pre), torch.zeros_like(pre))
    values, indices = dead_pre.topk(min(trainer.k_aux, int(dead.sum())), dim=-1, sorted=False)
    aux = torch.zeros_like(pre).scatter_(-1, indices, values) @ sae.W_dec
    target = error.detach()
    auxk = (target - aux).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
    return fvu + config.auxk_alpha * auxk


def mark_fired(
    last_fired: Tensor, indices: Tensor, values: Tensor, tokens_seen: int, dead_after: int
) -> Tensor:
    """Record (in place) which latents fired in this batch; the dead mask: latents silent
    for more than `dead_after` tokens (shared by the SAE and transcoder trainers)."""
    fired = torch.zeros(last_fired.shape[0], dtype=torch.bool, device=last_fired.device)
    fired[indices[values.detach() > 0]] = True
    last_fired[fired] = tokens_seen
    return (tokens_seen - last_fired) > dead_after


def auxk_loss(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, pre: Tensor, dead: Tensor,
    error: Tensor, k_aux: int,
) -> Tensor:  # fmt: skip
    """AuxK dead-latent revival: the `k_aux` largest dead latents reconstruct the live ones'
    error, normalised like FVU (zero when none is dead). Only the chosen latents are touched."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return torch.zeros((), device=x.device)
    with torch.no_grad():
        dead_pre = torch.where(dead, torch.relu(pre), torch.zeros_like(pre))
        aux_indices = dead_pre.topk(min(k_aux, n_dead), dim=-1, sorted=False).indices
    # Where fewer than k_aux dead latents are positive, topk also returns live ones;
    # as in the dense rule they contribute zero.
    aux_values = torch.relu(gather_pre(x, W_enc, b_enc, aux_indices, pre)) * dead[aux_indices]
    target = error.detach()
    aux_recon = sparse_decode(aux_indices, aux_values, W_dec)
    auxk = (target - aux_recon).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
    return torch.nan_to_num(auxk, nan=0.0)


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_slot values[n, slot] · W_dec[indices[n, slot]]: the decoder over chosen latents only."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")


def gather_pre(x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, pre: Tensor) -> Tensor:
    """`pre` (= x W_enc + b_enc, computed without gradient) at `indices`, differentiable in
    x, W_enc and b_enc through a backward pass over those latents only."""
    return _GatherPre.apply(x, W_enc, b_enc, indices, pre)


class _GatherPre(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, pre: Tensor
    ) -> Tensor:
        ctx.save_for_backward(x, W_enc, indices)
        return pre.gather(-1, indices)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, W_enc, indices = ctx.saved_tensors
        latents = indices.reshape(-1)
        flat = grad.reshape(-1)
        grad_b = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device)
        grad_b.index_add_(0, latents, flat)
        grad_w = None
        if ctx.needs_input_grad[1]:
            tokens = torch.arange(indices.shape[0], device=grad.device).repeat_interleave(
                indices.shape[1]
            )
            by_latent = torch.sparse_coo_tensor(
                torch.stack([latents, tokens]),
                flat,
                (W_enc.shape[1], x.shape[0]),
                check_invariants=False,
            )
            grad_w = torch.sparse.mm(by_latent.coalesce(), x).T
        grad_x = None
        if ctx.needs_input_grad[0]:
            rows = W_enc.T.contiguous()  # embedding_bag is ~7× slower on the strided view
            grad_x = F.embedding_bag(indices, rows, per_sample_weights=grad, mode="sum")
        return grad_x, grad_w, grad_b, None, None
