"""Attention's exact map at the same position: the stream of token t moves, every other
position's stream stays as the model computed it.

For token t of a context, with the input SAE's error e_t and every other position held
fixed, attention's output at t as a function of the stream x_t = Dec_in(c) + e_t is

    attn_out_t(x_t) = Attention(norm(x_0), …, norm(x_{t−1}), norm(x_t))[t]

through the model's own norm and attention module: the query, key and value of t move with
x_t; the keys and values of earlier positions do not (later positions never reach t). A
tangent pushed at every position of one sequence would mix positions (t's tangent reaches
t + 1 through its key and value), so each token gets a *copy*: the context's streams are
followed by one copy of each token's stream, at the token's own position id, and the mask
lets the copy of t attend to the originals before t and to itself only. The copies are
then independent rows, as an MLP's tokens are: one forward-mode product per active input
gives every token's Jacobian at once (`coact.jacobian.feature_map.FeatureMap`), and at the
observed streams the copies reproduce attention's output exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from coact.jacobian.feature_map import BlockFn
from coact.models.load import LoadedModel

TANGENTS_PER_PASS = 8  # forward-mode products batched together: bounds the scores' memory


@dataclass(frozen=True)
class AttentionMap:
    """Attention of block `layer` at the same position, over the contexts `streams`
    (n_ctx, seq, d_model: resid_pre at every position). Rows are the tokens from position
    `skip` on, context-major, as the stage flattens them."""

    lm: LoadedModel
    layer: int
    streams: Tensor
    skip: int

    @property
    def per_context(self) -> int:
        return self.streams.shape[1] - self.skip

    def __call__(self, x: Tensor) -> Tensor:
        """Every row's attention output with its own stream replaced by `x`'s row."""
        rows = torch.arange(self.streams.shape[0] * self.per_context, device=x.device)
        return self.at(rows)(x)

    def at(self, rows: Tensor) -> BlockFn:
        """The map of the tokens `rows` only (indices into the rows), for x (len(rows), d)."""
        context = torch.div(rows, self.per_context, rounding_mode="floor")
        position = rows % self.per_context + self.skip
        used, slot_context = torch.unique(context, return_inverse=True)
        counts = torch.bincount(slot_context, minlength=len(used))
        width = int(counts.max()) if len(rows) else 0
        order = torch.argsort(slot_context, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(rows), device=rows.device) - starts[slot_context[order]]
        slot = slot_context * width + rank  # where each row's copy sits, flattened
        pad = torch.full((len(used) * width,), len(rows), dtype=torch.long, device=rows.device)
        source = pad.index_put((slot,), torch.arange(len(rows), device=rows.device))
        copy_position = torch.zeros(len(used) * width, dtype=torch.long, device=rows.device)
        copy_position[slot] = position
        dtype = next(self.lm.model.parameters()).dtype
        seq = self.streams.shape[1]
        mask, positions = _mask(seq, copy_position.view(len(used), width), dtype)
        originals = self.streams[used]

        def block(x: Tensor) -> Tensor:
            padded = torch.cat([x, x.new_zeros(1, x.shape[-1])])[source]
            copies = padded.view(len(used), width, -1)
            stream = torch.cat([originals.to(x.dtype), copies], dim=1).to(dtype)
            with sdpa_kernel(SDPBackend.MATH):  # the one kernel with forward-mode AD
                out = self.lm.adapter.attend(self.lm.model, self.layer, stream, mask, positions)
            return out[:, seq:].reshape(len(used) * width, -1)[slot].to(x.dtype)

        return block


def _mask(seq: int, copies: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The additive mask and position ids of originals (causal, 0..seq−1) followed by
    `copies` (n, width: each copy's position): a copy attends to the originals before its
    position and to itself (a padding copy, at position 0, to itself only)."""
    n, width = copies.shape
    device = copies.device
    allow = torch.zeros(n, seq + width, seq + width, dtype=torch.bool, device=device)
    allow[:, :seq, :seq] = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    allow[:, seq:, :seq] = torch.arange(seq, device=device) < copies[..., None]
    allow[:, seq:, seq:] = torch.eye(width, dtype=torch.bool, device=device)
    mask = torch.zeros(allow.shape, dtype=dtype, device=device)
    mask = mask.masked_fill(~allow, torch.finfo(dtype).min)
    originals = torch.arange(seq, device=device).expand(n, seq)
    return mask[:, None], torch.cat([originals, copies], dim=1)
