"""Attention's exact map at the same position: it is the model's own attention (the output
SAE's pre-activations reproduced at the observed codes, at position 0 and later ones), its
Jacobian matches finite differences taken through the model's own forward pass with one
position's stream moved, and the jacobian stage runs on attention pairs, its per-connection
means matching those finite differences averaged by hand."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from coact.errors import CoactError
from coact.jacobian.attention_map import AttentionMap
from coact.jacobian.feature_map import FeatureMap
from coact.jacobian.score import ScoreConfig
from coact.jacobian.stage import JacobianConfig, jacobian
from coact.models.load import LoadedModel, load_model
from coact.models.sites import Site, SitePair
from coact.models.tracing import attention_output_with_input, capture
from tests.planted_model import random_tokens
from tests.test_jacobian import _topk_sae

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = 1
H = 1e-2  # float32 model: central differences good to ~5e-4 at this step


def _setup(lm: LoadedModel, tokens: torch.Tensor, skip: int):
    d = lm.adapter.d_model
    sites = [Site("resid_pre", LAYER), Site("attn_out", LAYER)]
    acts = capture(lm, tokens, sites)
    stream, out = acts[sites[0]], acts[sites[1]]
    amap = AttentionMap(lm, LAYER, stream, skip)
    fmap = FeatureMap(amap, _topk_sae(d, 24, 4, 0), _topk_sae(d, 20, 5, 1), tangents_per_pass=2)
    return fmap, stream, out


def _moved(lm, tokens, stream, b: int, t: int, direction: torch.Tensor) -> torch.Tensor:
    """∂ attn_out[b, t] / ∂ stream[b, t] along `direction`, by central differences through
    the model's own forward pass (every other position as the model computed it)."""
    ends = []
    for sign in (1.0, -1.0):
        edited = stream.clone()
        edited[b, t] += sign * H * direction
        ends.append(attention_output_with_input(lm, tokens, LAYER, edited)[b, t])
    return (ends[0] - ends[1]) / (2 * H)


def test_map_reproduces_attention_at_every_position(tiny) -> None:
    """g(c) with the input SAE's error held fixed is the output SAE's pre-activation of
    attention's output, at position 0 (which attends to itself only) and every later one;
    a subset of the rows gives the same rows."""
    tokens = random_tokens(2, 9, seed=2)
    fmap, stream, out = _setup(tiny, tokens, skip=0)
    rows = stream.reshape(-1, tiny.adapter.d_model)
    codes = fmap.sae_in.encode(rows)
    error = rows - fmap.sae_in.decode(codes)
    want = fmap.sae_out.pre_activations(out.reshape(rows.shape))
    torch.testing.assert_close(fmap(codes, error), want, atol=1e-5, rtol=1e-5)
    subset = torch.tensor([13, 0, 9, 4])  # context 1 position 4, context 0 positions 0 and 4
    torch.testing.assert_close(fmap.on_rows(subset)(rows[subset]), out.reshape(rows.shape)[subset])


def test_jacobian_matches_finite_differences_through_the_model(tiny) -> None:
    tokens = random_tokens(2, 9, seed=4)
    fmap, stream, _ = _setup(tiny, tokens, skip=0)
    rows = stream.reshape(-1, tiny.adapter.d_model)
    found = fmap.token_jacobians(rows)
    checked = 0
    for b, t in ((0, 0), (1, 6)):  # position 0, and a later position of another context
        n = b * tokens.shape[1] + t
        for a, i in enumerate(found.inputs[n].tolist()):
            moved = _moved(tiny, tokens, stream, b, t, fmap.sae_in.W_dec[i])
            slope = moved @ fmap.sae_out.W_enc  # the encoder is affine: its slope is W_enc
            for o, j in enumerate(found.outputs[n].tolist()):
                assert found.jacobian[n, o, a].item() == pytest.approx(slope[j].item(), abs=2e-3)
                checked += 1
    assert checked == 2 * 4 * 5
    assert found.jacobian.abs().max() > 0.05  # the check is not of zeros


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return load_model("tiny-llama")


def test_stage_on_attention_matches_averaged_differences(llama, tmp_path) -> None:
    """The stage on resid_pre[1] → attn_out[1] writes the MLP stage's tables; a stored
    connection's mean slope is the finite differences through the model averaged over the
    tokens where both features are active (BOS skipped), and its count is theirs."""
    tokens = random_tokens(3, 10, seed=5)
    fmap, stream, out = _setup(llama, tokens, skip=1)
    config = JacobianConfig(batch_size=2, progress=False, score=ScoreConfig(min_tokens=5))
    pair = SitePair.attention(LAYER)
    result = jacobian(llama, pair, fmap.sae_in, fmap.sae_out, tokens, tmp_path, config)
    assert (result.in_site, result.out_site, result.tokens) == ("resid_pre[1]", "attn_out[1]", 27)
    assert result.agreement is None  # attention has no causal check
    assert pl.read_parquet(tmp_path / "agreement.parquet").height == 0
    features = pl.read_parquet(tmp_path / "features.parquet")
    assert features.height == fmap.sae_out.width
    conns = pl.read_parquet(tmp_path / "connections.parquet")
    top = conns.sort("n_tokens", "input", "output", descending=True).row(0, named=True)
    i, j = top["input"], top["output"]
    codes_in = fmap.sae_in.encode(stream)
    codes_out = fmap.sae_out.encode(out)
    both = (codes_in[:, 1:, i] != 0) & (codes_out[:, 1:, j] != 0)
    slopes = []
    for b, t in both.nonzero().tolist():
        moved = _moved(llama, tokens, stream, b, t + 1, fmap.sae_in.W_dec[i])
        slopes.append(float(fmap.sae_out.W_enc[:, j] @ moved))
    assert top["n_tokens"] == len(slopes) >= 3
    assert top["jacobian_mean"] == pytest.approx(sum(slopes) / len(slopes), abs=2e-3)


def test_stage_refuses_a_pair_across_blocks(llama, tmp_path) -> None:
    d = llama.adapter.d_model
    pair = SitePair.of("resid_pre[1]", "mlp_out[1]")
    with pytest.raises(CoactError, match="attention's"):
        jacobian(llama, pair, _topk_sae(d, 8, 2, 0), _topk_sae(d, 8, 2, 1),
                 random_tokens(2, 6), tmp_path, JacobianConfig(progress=False))  # fmt: skip
