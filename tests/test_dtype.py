"""A model held in bfloat16: activations leave it as float32 and close to the float32
model's, splices write back in the model's dtype, and a whole run finishes with codes that
agree with the float32 run's (the tolerance a GPU user trades for half the memory)."""

from __future__ import annotations

import json

import pytest
import torch

from coact.codes.store import CodeStore
from coact.jacobian.feature_map import mlp_block
from coact.models.load import load_model
from coact.models.sites import Site
from coact.models.tracing import capture, spliced_logits
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.run import analyze
from coact.rundir.layout import RunLayout
from tests.tiny_run import tiny_config

SITES = [Site("mlp_resid", 1), Site("mlp_out", 1), Site("attn_out", 0)]


def _tokens() -> torch.Tensor:
    return torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt-neox"])
def test_bfloat16_activations_are_float32_and_close(name: str, device: str) -> None:
    full = load_model(name, device=device)
    half = load_model(name, device=device, dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    exact, approx = capture(full, _tokens(), SITES), capture(half, _tokens(), SITES)
    for site in SITES:
        assert approx[site].dtype == torch.float32
        error = (approx[site] - exact[site]).norm() / exact[site].norm()
        assert 0 < error < 0.05, (site, float(error))  # bfloat16 rounds, but not by much


def test_identity_splice_on_bfloat16_leaves_logits_unchanged(device: str) -> None:
    half = load_model("tiny-llama", device=device, dtype="bfloat16")
    clean = spliced_logits(half, _tokens(), None, None)
    same = spliced_logits(half, _tokens(), Site("mlp_out", 1), lambda x: x)
    assert clean.dtype == torch.float32
    torch.testing.assert_close(same, clean, rtol=0, atol=0)


def test_block_of_bfloat16_model_reads_and_returns_float32() -> None:
    half = load_model("tiny-llama", dtype="bfloat16")
    x = torch.randn(3, half.adapter.d_model)
    out = mlp_block(half, 1)(x)
    exact = mlp_block(load_model("tiny-llama"), 1)(x)
    assert out.dtype == torch.float32
    assert ((out - exact).norm() / exact.norm()) < 0.05


def test_unknown_dtype_is_one_clear_error() -> None:
    with pytest.raises(Exception, match="unknown dtype 'float8'"):
        AnalyzeConfig(dtype="float8")


def test_bfloat16_run_codes_agree_with_float32(tmp_path, device: str) -> None:
    """The same SAEs encode the bfloat16 model's activations into nearly the same codes."""
    full_dir, half_dir = tmp_path / "full", tmp_path / "half"
    small = {"stages": (), "device": device, "tokens": 1_000, "sae_tokens": 1_500}
    analyze(tiny_config(full_dir, **small))
    layout = RunLayout.of(full_dir)
    sae_in, sae_out = layout.sae_dir("mlp_resid.1"), layout.sae_dir("mlp_out.1")
    analyze(
        tiny_config(
            half_dir, **small, dtype="bfloat16", sae_in=str(sae_in), sae_out=str(sae_out),
            code_offset_tokens=1_500,
        )
    )  # fmt: skip
    assert json.loads((half_dir / "config.json").read_text())["dtype"] == "bfloat16"
    full = CodeStore.open(layout.codes)
    full_offset = json.loads((full_dir / "config.json").read_text())["code_offset_tokens"]
    assert full_offset in (None, 1_500)  # both runs' codes start at the same corpus token
    half = CodeStore.open(RunLayout.of(half_dir).codes)
    for slug in ("mlp_resid.1", "mlp_out.1"):
        exact, approx = full.read_site(slug), half.read_site(slug)
        assert exact.shape == approx.shape
        same = exact.astype(bool).multiply(approx.astype(bool)).sum() / exact.nnz
        assert same > 0.9, (slug, same)  # the active sets agree on over 90 % of codes
        diff = abs(exact - approx).sum() / abs(exact).sum()
        assert 0 < diff < 0.1, (slug, diff)  # 0 would mean the float32 model ran again
