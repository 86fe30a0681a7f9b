"""Token-wise Jacobians flattened for aggregation: one row per (token, active output) —
a *pair* — and one per (token, active output, active input) — an *entry*."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coact.jacobian.feature_map import TokenJacobians


@dataclass(frozen=True)
class Entries:
    """Pairs carry the output feature, its context and its pre-activation; entries the
    pair they belong to, the input feature, ∂g_j/∂c_i and the input's code c_i.
    `fires` counts, per input feature, the tokens where it is active."""

    pair_output: np.ndarray
    pair_context: np.ndarray
    pair_pre: np.ndarray
    entry_pair: np.ndarray
    entry_input: np.ndarray
    entry_jacobian: np.ndarray
    entry_code: np.ndarray
    fires: np.ndarray
    n_contexts: int

    def first_contexts(self, n: int) -> Entries:
        """The entries of contexts 0..n−1 only; `fires` is left as it was (the caller
        recounts it over those contexts)."""
        pairs = self.pair_context < n
        renumber = np.cumsum(pairs) - 1
        entries = pairs[self.entry_pair]
        return Entries(
            pair_output=self.pair_output[pairs],
            pair_context=self.pair_context[pairs],
            pair_pre=self.pair_pre[pairs],
            entry_pair=renumber[self.entry_pair[entries]],
            entry_input=self.entry_input[entries],
            entry_jacobian=self.entry_jacobian[entries],
            entry_code=self.entry_code[entries],
            fires=self.fires,
            n_contexts=min(n, self.n_contexts),
        )

    @property
    def entry_output(self) -> np.ndarray:
        return self.pair_output[self.entry_pair]

    @property
    def entry_context(self) -> np.ndarray:
        return self.pair_context[self.entry_pair]


def flatten(
    batches: Sequence[tuple[TokenJacobians, np.ndarray]], n_in: int, n_contexts: int
) -> Entries:
    """`batches` pairs each TokenJacobians with the context of each of its tokens."""
    names: tuple[str, ...] = ("pair_output", "pair_context", "pair_pre")
    names += ("entry_pair", "entry_input", "entry_jacobian", "entry_code")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    fires = np.zeros(n_in, dtype=np.int64)
    offset = 0
    for found, context in batches:
        inputs, outputs = found.inputs.cpu().numpy(), found.outputs.cpu().numpy()
        has_out, has_in = outputs >= 0, inputs >= 0
        pair_index = np.full(outputs.shape, -1, dtype=np.int64)
        pair_index[has_out] = offset + np.arange(int(has_out.sum()))
        offset += int(has_out.sum())
        both = has_out[:, :, None] & has_in[:, None, :]
        shape = both.shape
        parts["pair_output"].append(outputs[has_out])
        parts["pair_context"].append(np.broadcast_to(context[:, None], outputs.shape)[has_out])
        parts["pair_pre"].append(found.pre.cpu().double().numpy()[has_out])
        parts["entry_pair"].append(np.broadcast_to(pair_index[:, :, None], shape)[both])
        parts["entry_input"].append(np.broadcast_to(inputs[:, None, :], shape)[both])
        parts["entry_jacobian"].append(found.jacobian.cpu().double().numpy()[both])
        codes = found.codes.cpu().double().numpy()
        parts["entry_code"].append(np.broadcast_to(codes[:, None, :], shape)[both])
        fires += np.bincount(inputs[has_in], minlength=n_in)
    joined = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    return Entries(
        pair_output=joined["pair_output"].astype(np.int64),
        pair_context=joined["pair_context"].astype(np.int64),
        pair_pre=joined["pair_pre"],
        entry_pair=joined["entry_pair"].astype(np.int64),
        entry_input=joined["entry_input"].astype(np.int64),
        entry_jacobian=joined["entry_jacobian"],
        entry_code=joined["entry_code"],
        fires=fires,
        n_contexts=n_contexts,
    )
