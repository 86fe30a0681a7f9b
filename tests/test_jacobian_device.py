"""The jacobian stage gives the CPU's tables on a GPU (skipped without CUDA).

Both run float32 (PyTorch leaves TF32 off for float32 matrix products by default), so the
two differ by rounding in a different order of operations: about 1e-6 relative. Allowed:
slopes and scores within rtol 1e-4 / atol 1e-5, the same connections with the same token
counts, and the same verdicts. Plants (known slopes) and a real tiny MLP between random
TopK SAEs, where the active sets come from TopK on the device's own numbers."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from coact.jacobian.score import ScoreConfig
from coact.jacobian.stage import JacobianConfig, JacobianResult, jacobian
from coact.models.load import load_model
from coact.models.sites import SitePair
from coact.sae.base import Sae
from tests.planted_model import planted_model, random_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIG = JacobianConfig(progress=False, score=ScoreConfig(min_tokens=10))
RTOL, ATOL = 1e-4, 1e-5
Tables = tuple[JacobianResult, pl.DataFrame, pl.DataFrame]


def _tables(out_dir) -> tuple[pl.DataFrame, pl.DataFrame]:
    connections = pl.read_parquet(out_dir / "connections.parquet").sort("output", "input")
    return connections, pl.read_parquet(out_dir / "features.parquet").sort("output")


def _close(a: pl.Series, b: pl.Series) -> None:
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=RTOL, atol=ATOL, equal_nan=True)


def _same(cpu: Tables, cuda: Tables) -> None:
    (r_cpu, c_cpu, f_cpu), (r_gpu, c_gpu, f_gpu) = cpu, cuda
    # stored in order of total attribution: ties (planted weights) may break either way
    c_cpu, c_gpu = (c.sort("output", "input") for c in (c_cpu, c_gpu))
    assert r_cpu.key == r_gpu.key  # same model, SAEs and tokens: the same inputs
    assert (r_cpu.tokens, r_cpu.connections) == (r_gpu.tokens, r_gpu.connections)
    assert (r_cpu.features_scored, r_cpu.share_linear) == (
        r_gpu.features_scored,
        r_gpu.share_linear,
    )
    assert c_cpu.select("output", "input", "n_tokens").equals(
        c_gpu.select("output", "input", "n_tokens")
    )
    for column in ("jacobian_mean", "jacobian_std"):
        _close(c_cpu[column], c_gpu[column])
    assert f_cpu["jacobian_verdict"].to_list() == f_gpu["jacobian_verdict"].to_list()
    for column in ("nonlinearity", "nonlinearity_low", "nonlinearity_high"):
        _close(f_cpu[column], f_gpu[column])


@pytest.mark.parametrize("kind", ["linear", "threshold"])
def test_plants_give_the_cpu_tables_on_cuda(kind, tmp_path) -> None:
    tokens = random_tokens(40, 32, seed=3)
    found = {}
    for device in ("cpu", "cuda"):
        plant = planted_model(kind, dead_inputs=1, device=device)
        pair = SitePair.mlp(plant.layer)
        result = jacobian(
            plant.lm, pair, plant.sae_in, plant.sae_out, tokens, tmp_path / device, CONFIG
        )
        found[device] = (result, *_tables(tmp_path / device))
    _alike(found["cpu"], found["cuda"])


def _alike(cpu: Tables, cuda: Tables) -> None:
    """The plants' output SAE is ReLU on orthonormal rows: where the rule gives 0, float
    rounding leaves codes of ~1e-7 that count as active on one device and not the other
    (seen on an H200: 70 vs 73 tokens for one connection), so counts agree to a few
    percent and the slopes, scores and verdicts agree closely, not bit for bit."""
    (r_cpu, c_cpu, f_cpu), (r_gpu, c_gpu, f_gpu) = cpu, cuda
    assert r_cpu.key == r_gpu.key and r_cpu.tokens == r_gpu.tokens
    both = c_cpu.join(c_gpu, on=["output", "input"], suffix="_gpu")
    assert both.height >= 0.95 * max(c_cpu.height, c_gpu.height)
    np.testing.assert_allclose(both["n_tokens"], both["n_tokens_gpu"], rtol=0.05, atol=2)
    np.testing.assert_allclose(both["jacobian_mean"], both["jacobian_mean_gpu"], atol=0.05)
    verdicts = (f["jacobian_verdict"].to_numpy() for f in (f_cpu, f_gpu))
    assert np.mean(np.equal(*verdicts)) >= 0.95
    assert abs(r_cpu.share_linear - r_gpu.share_linear) <= 0.05


def _topk_sae(d: int, width: int, k: int, seed: int, site: str) -> Sae:
    gen = torch.Generator().manual_seed(seed)
    sae = Sae(d, width, activation="topk", k=k, site=site)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(width, d, generator=gen) / d**0.5)
        sae.W_enc.copy_(sae.W_dec.T * 3)
        sae.b_dec.copy_(torch.randn(d, generator=gen) * 0.1)
    return sae.eval().requires_grad_(False)


@pytest.mark.parametrize("pair", [SitePair.mlp(1), SitePair.attention(1)], ids=str)
def test_a_real_block_gives_the_cpu_tables_on_cuda(pair, tmp_path) -> None:
    """The MLP, and attention at the same position (its copies attend through the math
    kernel on both devices)."""
    tokens = random_tokens(24, 32, seed=5)
    found = {}
    for device in ("cpu", "cuda"):
        lm = load_model("tiny-llama", device=device)
        d = lm.adapter.d_model
        sae_in = _topk_sae(d, 24, 4, 0, str(pair.in_site)).to(device)
        sae_out = _topk_sae(d, 20, 5, 1, str(pair.out_site)).to(device)
        result = jacobian(lm, pair, sae_in, sae_out, tokens, tmp_path / device, CONFIG)
        found[device] = (result, *_tables(tmp_path / device))
    assert found["cpu"][0].features_scored > 5
    _same(found["cpu"], found["cuda"])
