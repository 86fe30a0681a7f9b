"""The jacobian stage: the feature-space map is the model's own computation (finite
differences, the output SAE's pre-activations reproduced), the linearity score tells a
planted linear MLP from a gated one, and the per-connection and agreement tables match
hand-computed numbers."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from coact.jacobian.agreement import agreement_table, summarise, with_paths
from coact.jacobian.connections import connection_table
from coact.jacobian.entries import Entries
from coact.jacobian.feature_map import FeatureMap, mlp_block
from coact.jacobian.score import ScoreConfig, _nonlinearity
from coact.jacobian.stage import JacobianConfig, jacobian
from coact.models.load import load_model
from coact.models.sites import Site, SitePair
from coact.models.tracing import capture
from coact.sae.base import Sae
from tests.planted_model import planted_model, random_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = JacobianConfig(progress=False, score=ScoreConfig(min_tokens=10))


def _topk_sae(d: int, width: int, k: int, seed: int) -> Sae:
    gen = torch.Generator().manual_seed(seed)
    sae = Sae(d, width, activation="topk", k=k)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(width, d, generator=gen) / d**0.5)
        sae.W_enc.copy_(sae.W_dec.T * 3)
        sae.b_dec.copy_(torch.randn(d, generator=gen) * 0.1)
    return sae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def real_map(tiny, device):
    """A tiny real model's MLP between two random TopK SAEs, and the stream it reads (on
    the test device)."""
    lm = tiny if device == "cpu" else load_model(tiny.name, device=device)
    layer, d = 1, lm.adapter.d_model
    sites = [Site("mlp_resid", layer), Site("mlp_out", layer)]
    acts = capture(lm, random_tokens(2, 12, seed=1), sites)
    stream, out = (acts[s][:, 1:].reshape(-1, d) for s in sites)
    sae_in, sae_out = _topk_sae(d, 24, 4, 0).to(device), _topk_sae(d, 20, 5, 1).to(device)
    return FeatureMap(mlp_block(lm, layer), sae_in, sae_out), stream, out


def test_map_reproduces_the_output_saes_pre_activations(real_map) -> None:
    """g(c) with the input SAE's error held fixed is the output SAE's pre-activation of
    the MLP output the model computed."""
    fmap, stream, out = real_map
    codes = fmap.sae_in.encode(stream)
    error = stream - fmap.sae_in.decode(codes)
    torch.testing.assert_close(fmap(codes, error), fmap.sae_out.pre_activations(out))


def test_jacobian_matches_finite_differences(real_map) -> None:
    fmap, stream, _ = real_map
    found = fmap.token_jacobians(stream)
    h, checked = 1e-3, 0
    for t in (0, 5, 11):
        codes = fmap.sae_in.encode(stream[t : t + 1]).double()
        error = (stream[t : t + 1] - fmap.sae_in.decode(codes.float())).double()
        double = FeatureMap(
            lambda x: fmap.block(x.float()).double(), fmap.sae_in.double(), fmap.sae_out.double()
        )
        for o, j in enumerate(found.outputs[t].tolist()):
            for a, i in enumerate(found.inputs[t].tolist()):
                step = torch.zeros_like(codes)
                step[0, i] = h
                slope = (double(codes + step, error) - double(codes - step, error))[0, j] / (2 * h)
                assert found.jacobian[t, o, a].item() == pytest.approx(slope.item(), abs=2e-3)
                checked += 1
        fmap.sae_in.float(), fmap.sae_out.float()
    assert checked == 3 * 4 * 5


def _run(kind: str, tmp_path, device: str = "cpu"):
    plant = planted_model(kind, dead_inputs=1, device=device)
    tokens = random_tokens(40, 32, seed=3)
    pair = SitePair.mlp(plant.layer)
    result = jacobian(plant.lm, pair, plant.sae_in, plant.sae_out, tokens, tmp_path, CONFIG)
    return plant, result, pl.read_parquet(tmp_path / "features.parquet")


def test_planted_linear_mlp_scores_linear(tmp_path, device) -> None:
    plant, result, features = _run("linear", tmp_path, device)
    scored = features.filter(pl.col("jacobian_verdict") != "too few tokens")
    assert scored.height >= 28
    assert (scored["jacobian_verdict"] == "linear").all()
    assert scored["nonlinearity"].max() < 1e-6
    assert result.share_linear == 1.0
    # the stored connections are the planted weights: the slope of a linear plant
    conns = pl.read_parquet(tmp_path / "connections.parquet")
    planted = plant.B.numpy()[conns["output"].to_numpy(), conns["input"].to_numpy()]
    np.testing.assert_allclose(conns["jacobian_mean"].to_numpy(), planted, atol=1e-4)
    np.testing.assert_allclose(conns["jacobian_std"].to_numpy(), 0, atol=1e-3)


def test_planted_and_gates_score_nonlinear(tmp_path, device) -> None:
    """Threshold plant, by output j mod 3: sums (linear), ANDs (gated), A-AND-NOT-B."""
    _, _, features = _run("threshold", tmp_path, device)
    rule = features["output"].to_numpy() % 3
    verdict = features["jacobian_verdict"].to_numpy()
    score = features["nonlinearity"].to_numpy()
    assert (verdict[rule == 0] == "linear").all()
    assert (verdict[rule == 1] == "nonlinear").all()
    assert (score[rule == 2] > 1e-3).all()  # a NOT input that rarely co-fires moves little


def test_nonlinearity_by_hand() -> None:
    """A = (1, 2, 3), Ā = (1, 1, 1): missed 0 + 1 + 4 = 5, spread 14 − 36/3 = 2 → 2.5."""
    sums = np.array([[5.0], [6.0], [14.0], [3.0]])
    assert _nonlinearity(sums)[0] == pytest.approx(2.5)
    assert _nonlinearity(np.array([[0.0], [6.0], [12.0], [3.0]]))[0] == 0.0  # A constant


def _entries() -> Entries:
    """Two tokens (contexts 0, 1); output 0 active on both, output 1 on the second.
    Token 0: inputs 0 (c 2), 1 (c 1); token 1: input 0 (c 4)."""
    return Entries(
        pair_output=np.array([0, 0, 1]),
        pair_context=np.array([0, 1, 1]),
        pair_pre=np.zeros(3),
        entry_pair=np.array([0, 0, 1, 2]),
        entry_input=np.array([0, 1, 0, 0]),
        entry_jacobian=np.array([0.5, -1.0, 1.5, 2.0]),
        entry_code=np.array([2.0, 1.0, 4.0, 4.0]),
        fires=np.array([2, 1]),
        n_contexts=2,
    )


def test_connection_table_by_hand() -> None:
    table = connection_table(_entries(), n_in=2, min_tokens=1).sort("output", "input")
    assert table.select("output", "input", "n_tokens").rows() == [(0, 0, 2), (0, 1, 1), (1, 0, 1)]
    assert table["jacobian_mean"].to_list() == pytest.approx([1.0, -1.0, 2.0])
    assert table["jacobian_std"].to_list() == pytest.approx([0.5, 0.0, 0.0])
    # (0.5·2 + 1.5·4) / 2 tokens; per firing of input 0: the same sum over its 2 firings
    assert table["attribution_mean"].to_list() == pytest.approx([3.5, -1.0, 8.0])
    assert table["attribution_per_fire"].to_list() == pytest.approx([3.5, -1.0, 4.0])


def test_agreement_by_hand() -> None:
    causal = pl.DataFrame(
        {
            "output": [0, 0, 1],
            "input": [0, 1, 0],
            "weight_refit": [1.0, 0.5, 3.0],
            "n_tokens": [2, 1, 2],
            "actual_mean": [-3.0, 2.0, -5.0],
            "predicted_mean": [-2.0, -0.5, -12.0],
            "judged": [True, True, True],
        }
    )
    table = agreement_table(causal, connection_table(_entries(), 2, 1), (0.5, 2.0))
    assert table["predicted_jacobian"].to_list() == pytest.approx([-3.5, 1.0, -4.0])
    assert table["jacobian_size"].to_list() == [True, True, True]
    assert table["connector_size"].to_list() == [True, False, False]
    assert table["connector_sign"].to_list() == [True, False, True]
    assert table["weight_jacobian_size"].to_list() == [True, False, True]  # 1/1, −1/.5, 2/3
    paths = table.with_columns(
        exact_pre_change=pl.Series([-3.0, 1.0, -4.0]),
        exact_code_change=pl.Series([-3.0, 2.0, -5.0]),
    )
    summary = summarise(with_paths(paths, (0.5, 2.0)))
    assert summary.jacobian_size == 1.0
    assert summary.connector_size == pytest.approx(1 / 3)
    assert summary.map_matches_ablation == 1.0
    assert summary.first_order_size == 1.0
    assert summary.jacobian_spearman == pytest.approx(1.0)


def test_agreement_with_the_causal_check_on_a_linear_plant(tmp_path, device) -> None:
    """Exact SAEs and a linear MLP: the Jacobian predicts every ablation exactly, and the
    exact map's code change is the model's."""
    from coact.calibrate.causal import CausalConfig, causal_check
    from tests.test_causal import _weights

    plant = planted_model("linear", dead_inputs=1, device=device)
    tokens = random_tokens(12, 24, seed=7)
    table = causal_check(
        plant.lm, plant.layer, plant.sae_in, plant.sae_out, tokens, _weights(plant),
        config=CausalConfig(batch_size=4, progress=False),
    )  # fmt: skip
    table.write_parquet(tmp_path / "causal.parquet")
    result = jacobian(
        plant.lm, SitePair.mlp(plant.layer), plant.sae_in, plant.sae_out, tokens,
        tmp_path / "jac", CONFIG, causal=tmp_path / "causal.parquet",
    )  # fmt: skip
    assert result.agreement is not None and result.agreement.judged > 10
    assert result.agreement.jacobian_size == 1.0
    assert result.agreement.map_matches_ablation == 1.0
    again = jacobian(
        plant.lm, SitePair.mlp(plant.layer), plant.sae_in, plant.sae_out, tokens,
        tmp_path / "jac", CONFIG, causal=tmp_path / "causal.parquet",
    )  # fmt: skip
    assert again == result  # a finished result is reused
