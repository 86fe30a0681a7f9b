"""The SAE protocol every stage relies on, and the one module that implements it.

Published formats (SAELens, dictionary_learning, sparsify) differ only in parameter
names, layouts and the activation rule, so one module with an `activation` switch covers
all of them; loaders translate files into it.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Activation = Literal["relu", "topk", "jumprelu"]


@runtime_checkable
class SparseAutoencoder(Protocol):
    """What the pipeline needs from an SAE: codes in, activations out, its shape, and its
    dictionary (the decoder rows W_dec, width × d_in, and bias b_dec): noise along active
    features, reconstruction norms and implied errors read the dictionary itself."""

    d_in: int
    width: int
    site: str | None
    metadata: dict[str, Any]

    @property
    def W_dec(self) -> Tensor: ...

    @property
    def b_dec(self) -> Tensor: ...

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, codes: Tensor) -> Tensor: ...


class Sae(nn.Module):
    """codes = act(W_encᵀ(x − b_dec·s) + b_enc);  x̂ = W_decᵀ codes + b_dec.

    `s` is 1 when the format subtracts the decoder bias before encoding (most do).
    W_enc is (d_in, width) and W_dec is (width, d_in), as in SAELens.
    """

    threshold: Tensor  # JumpReLU thresholds (a buffer; zeros for other rules)

    def __init__(
        self,
        d_in: int,
        width: int,
        *,
        activation: Activation = "topk",
        k: int | None = None,
        subtract_decoder_bias: bool = True,
        site: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if activation == "topk" and (k is None or not 0 < k <= width):
            raise ValueError(f"a topk SAE needs 0 < k <= width, got k={k}")
        self.d_in, self.width, self.k = d_in, width, k
        self.activation: Activation = activation
        self.subtract_decoder_bias = subtract_decoder_bias
        self.site = site
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.W_enc = nn.Parameter(torch.zeros(d_in, width))
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(torch.zeros(width, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("threshold", torch.zeros(width))

    def pre_activations(self, x: Tensor) -> Tensor:
        if self.subtract_decoder_bias:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        assert self.k is not None
        values, indices = torch.relu(pre).topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def encode(self, x: Tensor) -> Tensor:
        return self.activate(self.pre_activations(x))

    def decode(self, codes: Tensor) -> Tensor:
        return codes @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def describe(self) -> dict[str, Any]:
        """Shape and rule, for manifests and fingerprints."""
        return {
            "d_in": self.d_in,
            "width": self.width,
            "activation": self.activation,
            "k": self.k,
            "subtract_decoder_bias": self.subtract_decoder_bias,
            "site": self.site,
        }
