"""The skip transcoder: ŷ = W_decᵀ TopK(ReLU(W_encᵀ x + b_enc)) + b_dec + W_skip x.

It reads what the MLP reads (the MLP module's input, after its norm) and predicts what the
MLP writes, so it replaces the whole block with one sparse layer and one dense linear map;
the skip path carries the MLP's linear part, leaving the latents for the rest. Parameter
layouts follow coact's `Sae` (W_enc is d_in × width, W_dec width × d_out); W_skip is
d_out × d_in, as sparsify stores it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class SkipTranscoder(nn.Module):
    """A TopK transcoder with a linear skip path (`skip=False`: none, W_skip stays zero)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        width: int,
        k: int,
        *,
        skip: bool = True,
        layer: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0 < k <= width:
            raise ValueError(f"a TopK transcoder needs 0 < k <= width, got k={k}")
        self.d_in, self.d_out, self.width, self.k = d_in, d_out, width, k
        self.skip, self.layer = skip, layer
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.W_enc = nn.Parameter(torch.zeros(d_in, width))
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(torch.zeros(width, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in), requires_grad=skip)

    def pre_activations(self, x: Tensor) -> Tensor:
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Full-width codes: the k largest ReLU'd pre-activations per token, zero elsewhere."""
        pre = torch.relu(self.pre_activations(x))
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        # out of place: forward-mode autograd (the Jacobian's jvp) flows through it
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def decode(self, codes: Tensor, x: Tensor) -> Tensor:
        """The latents' output plus the skip path's (which reads the input `x` itself)."""
        out = codes @ self.W_dec + self.b_dec
        return out + x @ self.W_skip.T if self.skip else out

    def skip_output(self, x: Tensor) -> Tensor:
        """The skip path alone (with the output bias): the transcoder's linear part."""
        return x @ self.W_skip.T + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x), x)

    def describe(self) -> dict[str, Any]:
        """Shape and rule, for fingerprints and result keys."""
        return {
            "d_in": self.d_in,
            "d_out": self.d_out,
            "width": self.width,
            "k": self.k,
            "skip": self.skip,
            "layer": self.layer,
        }
