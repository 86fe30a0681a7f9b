"""Training skip transcoders with the SAE trainer's recipe: the same width (expansion ×
d_model), k, token budget, batch, learning-rate rule and AuxK dead-latent revival
(`coact.sae.train`), on pairs (what the MLP reads, what it writes) streamed from the model.

Inputs and targets are each divided by one scalar during training and the scalars are
folded back at the end, so the saved transcoder reads and writes raw activations. As in
sparsify, the decoder starts at zero and is not normalised (a transcoder's latents write
outputs whose scale the decoder must carry), and the skip path starts at zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from coact.errors import CoactError
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.sae.train import (
    SaeTrainConfig,
    TrainLog,
    auxk_loss,
    gather_pre,
    mark_fired,
    shuffled_activations,
    sparse_decode,
)
from coact.transcoder.model import SkipTranscoder


def transcoder_sites(layer: int) -> tuple[Site, Site]:
    """(what the MLP of `layer` reads: its module's input, after the norm; what it writes)."""
    return Site("mlp_in", layer), Site("mlp_out", layer)


def train_transcoders(
    lm: LoadedModel,
    tokens: Tensor,
    layers: Sequence[int],
    config: SaeTrainConfig,
    *,
    skip: bool = True,
) -> dict[int, tuple[SkipTranscoder, TrainLog]]:
    """One skip transcoder per layer on the contexts `tokens` (n_ctx, ctx_len), in one pass
    over the model, buffered and shuffled as `coact.sae.train.train_saes` does."""
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise CoactError("no training contexts: the corpus gave no tokens for transcoder training")
    generator = torch.Generator().manual_seed(config.seed)
    sites = [site for layer in layers for site in transcoder_sites(layer)]
    trainers: dict[int, TranscoderTrainer] = {}
    desc = "training transcoders"
    for buffer in shuffled_activations(lm, tokens, sites, config, generator, desc):
        for layer in layers:
            x_site, y_site = transcoder_sites(layer)
            x, y = buffer[x_site], buffer[y_site]
            if layer not in trainers:
                trainers[layer] = TranscoderTrainer(x, y, config, generator, layer=layer, skip=skip)
            for b in range(0, x.shape[0], config.batch_tokens):
                trainers[layer].step(x[b : b + config.batch_tokens], y[b : b + config.batch_tokens])
    return {layer: (t.finish(), t.log) for layer, t in trainers.items()}


def _scale(batch: Tensor, what: str) -> float:
    """The RMS distance of a batch from its mean, per dimension (a scale the lr ignores)."""
    scale = float((batch - batch.mean(0)).pow(2).sum(-1).mean().sqrt()) / math.sqrt(batch.shape[-1])
    if not math.isfinite(scale) or scale == 0:
        raise CoactError(f"{what} activations are constant or non-finite; cannot train")
    return scale


class TranscoderTrainer:
    """One skip transcoder being trained; the first batch (x, y) sets its init and scales."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        config: SaeTrainConfig,
        gen: torch.Generator,
        *,
        layer: int | None = None,
        skip: bool = True,
    ) -> None:
        d_in, d_out = x.shape[-1], y.shape[-1]
        width = config.expansion * d_in
        self.config, self.log = config, TrainLog()
        self.x_scale, self.y_scale = _scale(x, "MLP input"), _scale(y, "MLP output")
        tc = SkipTranscoder(d_in, d_out, width, config.k, skip=skip, layer=layer).to(x.device)
        with torch.no_grad():
            direction = torch.randn(width, d_in, generator=gen).to(x.device)
            tc.W_enc.copy_((direction / direction.norm(dim=-1, keepdim=True)).T)
            tc.b_dec.copy_(y.mean(0) / self.y_scale)
        self.tc = tc
        lr = config.lr or 8e-4 / math.sqrt(width / 2**14)
        params = [p for p in tc.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=lr, fused=x.device.type == "cuda")
        self.last_fired = torch.zeros(width, dtype=torch.long, device=x.device)
        self.k_aux = d_out // 2

    def step(self, x_raw: Tensor, y_raw: Tensor) -> None:
        """One Adam step on FVU(y) + α·AuxK; only the k (and AuxK) chosen latents per token
        enter the decoder and the encoder's gradient, as in the SAE trainer's step."""
        tc, config, log = self.tc, self.config, self.log
        x, y = x_raw / self.x_scale, y_raw / self.y_scale
        with torch.no_grad():
            pre = torch.addmm(tc.b_enc, x, tc.W_enc)
            indices = pre.topk(config.k, dim=-1, sorted=False).indices
        values = torch.relu(gather_pre(x, tc.W_enc, tc.b_enc, indices, pre))
        recon = sparse_decode(indices, values, tc.W_dec) + tc.b_dec
        if tc.skip:
            recon = recon + x @ tc.W_skip.T
        error = y - recon
        fvu = error.pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        log.tokens_seen += x.shape[0]
        dead = mark_fired(
            self.last_fired, indices, values, log.tokens_seen, config.dead_after_tokens
        )
        auxk = auxk_loss(x, tc.W_enc, tc.b_enc, tc.W_dec, pre, dead, error, self.k_aux)
        self.optimizer.zero_grad(set_to_none=True)
        (fvu + config.auxk_alpha * auxk).backward()
        self.optimizer.step()
        log.fvu.append(float(fvu.detach()))
        log.auxk.append(float(auxk.detach()))
        log.dead_fraction.append(float(dead.float().mean()))

    def finish(self) -> SkipTranscoder:
        """Fold both scales into the weights so the transcoder maps raw to raw activations."""
        tc, sx, sy = self.tc, self.x_scale, self.y_scale
        with torch.no_grad():
            tc.W_enc.div_(sx)
            tc.W_dec.mul_(sy)
            tc.b_dec.mul_(sy)
            tc.W_skip.mul_(sy / sx)
        tc.metadata.update(
            {"trained_by": "coact", "tokens": self.log.tokens_seen, "input_scale": sx,
             "output_scale": sy, "final_fvu": self.log.fvu[-1] if self.log.fvu else None}
        )  # fmt: skip
        return tc.eval().requires_grad_(False)
