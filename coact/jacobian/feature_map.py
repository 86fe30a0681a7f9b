"""The exact feature-space map of an MLP block and its per-token Jacobian.

With the input SAE's reconstruction error e held fixed per token, the block maps input
codes c to the output SAE's pre-activations through the model's own modules:

    g(c) = pre_out( MLP( norm( Dec_in(c) + e ) ) )

At the observed codes g reproduces the output SAE's pre-activations exactly (Dec_in(c) + e
is the stream the MLP read). Its Jacobian ∂g/∂c restricted to the token's active inputs and
active outputs (k_out × k_in with TopK SAEs) costs k_in forward-mode products of the MLP
per token: the tangent of input i is its decoder row, pushed through norm and MLP by
`torch.func.jvp`, then read by the active outputs' encoder columns. Attention's map at the
same position (`coact.jacobian.attention_map`) is a `ContextBlock`: its rows are tokens of
contexts, read through the same machinery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.func import jvp, vmap

from coact.errors import CoactError
from coact.models.adapters import resolve
from coact.models.load import LoadedModel
from coact.sae.base import SparseAutoencoder

BlockFn = Callable[[Tensor], Tensor]


@runtime_checkable
class ContextBlock(Protocol):
    """A block whose rows are tokens of contexts (attention): a subset of the rows needs
    to know which tokens they are."""

    def __call__(self, x: Tensor) -> Tensor: ...

    def at(self, rows: Tensor) -> BlockFn: ...


def mlp_block(lm: LoadedModel, layer: int) -> BlockFn:
    """x ↦ MLP(norm(x)) for the stream the MLP of `layer` reads, with the model's modules."""
    norm = resolve(lm.model, lm.adapter.mlp_input_point(layer).path)
    mlp = resolve(lm.model, lm.adapter.mlp_path(layer))

    def block(x: Tensor) -> Tensor:  # a bfloat16 model computes in bfloat16, read as float32
        return mlp(norm(x.to(lm.dtype))).float()

    return block


@dataclass(frozen=True)
class TokenJacobians:
    """Per token (rows), its active inputs and outputs and the Jacobian between them.
    Padding slots (fewer active features than slots) have index −1 and value 0."""

    inputs: Tensor  # (N, k_in) int64 input features
    codes: Tensor  # (N, k_in) their codes
    outputs: Tensor  # (N, k_out) int64 active output features
    pre: Tensor  # (N, k_out) their pre-activations g_j(c)
    jacobian: Tensor  # (N, k_out, k_in) ∂g_j/∂c_i
    pushed: Tensor  # (N, k_in, d) J_block · W_dec[i]: ∂(block output)/∂c_i


@dataclass(frozen=True)
class FeatureMap:
    """The block between two SAEs: `block` maps the input stream to the output site."""

    block: BlockFn | ContextBlock
    sae_in: SparseAutoencoder
    sae_out: SparseAutoencoder
    tangents_per_pass: int | None = None  # None: every active input's product at once

    def on_rows(self, rows: Tensor) -> BlockFn:
        """The block for the stream's rows `rows` alone (each token is its own row for an
        MLP; attention's rows are tokens of their contexts)."""
        return self.block.at(rows) if isinstance(self.block, ContextBlock) else self.block

    def pre_out(self, y: Tensor) -> Tensor:
        pre = getattr(self.sae_out, "pre_activations", None)
        if pre is None:
            raise CoactError("the output SAE exposes no pre_activations; load it with coact")
        return pre(y)

    def __call__(self, codes: Tensor, error: Tensor) -> Tensor:
        """g(c) with the input SAE's error `error` held fixed."""
        return self.pre_out(self.block(self.sae_in.decode(codes) + error))

    @torch.no_grad()
    def token_jacobians(self, stream: Tensor) -> TokenJacobians:
        """The Jacobian of g at the codes of each row of `stream` (N × d_model)."""
        codes = self.sae_in.encode(stream)
        in_idx, in_val = _active(codes)
        out_codes = self.sae_out.encode(self.block(stream))
        out_idx, _ = _active(out_codes)
        pre = self.pre_out(self.block(stream))
        tangents = self.sae_in.W_dec[in_idx.clamp(min=0)] * (in_idx >= 0)[..., None]
        pushed = vmap(
            lambda v: jvp(self.block, (stream,), (v,))[1],
            in_dims=1,
            out_dims=1,
            chunk_size=self.tangents_per_pass,
        )(tangents.to(stream.dtype))  # (N, k_in, d): J_block · W_dec[i]
        read = _encoder_columns(self.sae_out, out_idx)  # (N, d, k_out)
        jacobian = torch.einsum("nad,ndo->noa", pushed, read) * (out_idx >= 0)[..., None]
        pre_active = pre.gather(1, out_idx.clamp(min=0)) * (out_idx >= 0)
        return TokenJacobians(in_idx, in_val, out_idx, pre_active, jacobian, pushed)


def _active(codes: Tensor) -> tuple[Tensor, Tensor]:
    """The nonzero entries of each row, padded to the longest row with index −1."""
    width = int((codes != 0).sum(dim=1).max().item()) if codes.numel() else 0
    values, indices = codes.abs().topk(max(width, 1), dim=1)
    keep = values > 0
    return torch.where(keep, indices, -1), codes.gather(1, indices) * keep


def _encoder_columns(sae: SparseAutoencoder, outputs: Tensor) -> Tensor:
    """∂pre_j/∂y for each active output j: the encoder's column j (linear encoders)."""
    weight = getattr(sae, "W_enc", None)
    if not isinstance(weight, Tensor):
        raise CoactError("the output SAE has no linear encoder (W_enc); load it with coact")
    columns = weight.detach()[:, outputs.clamp(min=0)]  # (d, N, k_out)
    return columns.permute(1, 0, 2)
