"""Round trips through the real libraries: files written by SAELens's and sparsify's own
save methods load in coact with the codes the library's own loader gives, and coact's
files load in those libraries' own loaders with coact's codes.

Needs the `libs` extra (`pip install -e '.[libs]'`). Skips without it, except where
COACT_REQUIRE_LIBS=1 (set by .ci/run), where a missing library fails the test instead.
dictionary_learning pins nnsight < 0.4, so its reference stays hand-written
(tests/test_sae_formats.py).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from coact.sae.base import Sae
from coact.sae.formats import SparsifyCoder, load_sae, read_sparsify, save_saelens, save_sparsify

D_IN, WIDTH, K, ROWS = 16, 64, 6, 1024


def _library(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        if os.environ.get("COACT_REQUIRE_LIBS") == "1":
            pytest.fail(f"COACT_REQUIRE_LIBS=1 but {name} does not import ({error})")
        pytest.skip(f"{name} is not installed: pip install -e '.[libs]'")


@pytest.fixture(scope="module")
def sae_lens() -> ModuleType:
    return _library("sae_lens")


@pytest.fixture(scope="module")
def sparsify() -> ModuleType:
    return _library("sparsify")


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(ROWS, D_IN, generator=torch.Generator().manual_seed(11)) * 2


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, decoder rows of unequal norms (so norm handling matters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
            if name == "threshold":
                param.copy_(torch.rand(param.shape, generator=gen) * 0.5)
            if name in ("W_dec",) and param.dim() == 2:
                param.mul_(torch.rand(param.shape[0], 1, generator=gen) * 3 + 0.2)


def _same_codes(theirs: torch.Tensor, ours: torch.Tensor) -> None:
    """Every row keeps the same active latents, with the same values."""
    theirs, ours = theirs.detach(), ours.detach()
    rows_same = ((theirs > 0) == (ours > 0)).all(dim=1)
    assert int(rows_same.sum()) == len(rows_same), (
        f"{int(rows_same.sum())} rows of {len(rows_same)}"
    )
    assert (ours > 0).any()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# --- SAELens -------------------------------------------------------------------------------


def _saelens_sae(sae_lens: ModuleType, kind: str) -> Any:
    """An SAE as a SAELens user makes one; "topk-training" is what its trainer saves."""
    saes = sae_lens.saes
    if kind == "standard":
        return saes.StandardSAE(saes.StandardSAEConfig(d_in=D_IN, d_sae=WIDTH))
    if kind == "topk":
        return saes.TopKSAE(saes.TopKSAEConfig(d_in=D_IN, d_sae=WIDTH, k=K))
    if kind == "topk-training":  # rescale_acts_by_decoder_norm=True is its default
        config = saes.TopKTrainingSAEConfig(d_in=D_IN, d_sae=WIDTH, k=K)
        assert config.rescale_acts_by_decoder_norm
        return saes.TopKTrainingSAE(config)
    config = saes.JumpReLUSAEConfig(d_in=D_IN, d_sae=WIDTH, apply_b_dec_to_input=False)
    return saes.JumpReLUSAE(config)


@pytest.mark.parametrize("kind", ["standard", "topk", "topk-training", "jumprelu"])
def test_saelens_files_load_in_coact(
    sae_lens: ModuleType, tmp_path: Path, x: torch.Tensor, kind: str
) -> None:
    written = _saelens_sae(sae_lens, kind)
    _randomise(written, seed=len(kind))
    written.save_model(tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    ours = load_sae(tmp_path / "sae")
    codes = theirs.encode(x)
    _same_codes(codes, ours.encode(x))
    torch.testing.assert_close(
        ours.decode(codes), theirs.decode(codes).detach(), atol=1e-4, rtol=1e-5
    )


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_coact_files_load_in_saelens(
    sae_lens: ModuleType, tmp_path: Path, x: torch.Tensor, activation: Any
) -> None:
    sae = Sae(
        D_IN, WIDTH, activation=activation, k=K if activation == "topk" else None,
        subtract_decoder_bias=activation != "jumprelu", site="mlp_resid[2]",
        metadata={"model": "tiny/model", "trained_by": "coact"},
    )  # fmt: skip
    _randomise(sae, seed=3)
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(WIDTH, generator=torch.Generator().manual_seed(4)) * 0.5)
    save_saelens(sae, tmp_path / "sae", mlp_resid_kind="resid_mid")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    assert theirs.cfg.architecture() == {"relu": "standard"}.get(activation, activation)
    meta = theirs.cfg.metadata
    assert meta.hook_name == "blocks.2.hook_resid_mid"  # a real TransformerLens hook
    assert meta.model == "tiny/model" and meta.trained_by == "coact"  # read as a 6.x file
    assert meta.sae_lens_version is not None
    _same_codes(theirs.encode(x), sae.encode(x))
    codes = sae.encode(x)
    torch.testing.assert_close(
        theirs.decode(codes).detach(), sae.decode(codes), atol=1e-5, rtol=1e-5
    )


# --- sparsify --------------------------------------------------------------------------------


def _sparse_coder(sparsify: ModuleType, transcode: bool) -> Any:
    config = sparsify.SparseCoderConfig(
        num_latents=WIDTH, k=K, transcode=transcode, skip_connection=transcode
    )
    coder = sparsify.SparseCoder(D_IN, config)
    _randomise(coder, seed=5 + transcode)
    return coder


def _sparsify_codes(coder: Any, x: torch.Tensor) -> torch.Tensor:
    top_acts, top_indices, _ = coder.encode(x)
    return torch.zeros(len(x), WIDTH).scatter_(-1, top_indices, top_acts).detach()


@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify_files_load_in_coact(
    sparsify: ModuleType, tmp_path: Path, x: torch.Tensor, transcode: bool
) -> None:
    coder = _sparse_coder(sparsify, transcode)
    coder.save_to_disk(tmp_path / "layers.3.mlp")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "layers.3.mlp")
    ours = read_sparsify(tmp_path / "layers.3.mlp")
    assert (ours.transcode, ours.skip_connection) == (transcode, transcode)
    _same_codes(_sparsify_codes(theirs, x), ours.encode(x))
    out = theirs(x).sae_out.detach()
    torch.testing.assert_close(ours.forward(x), out, atol=1e-4, rtol=1e-5)
    if not transcode:  # an SAE also loads as a Sae, with the same codes
        _same_codes(_sparsify_codes(theirs, x), load_sae(tmp_path / "layers.3.mlp").encode(x))


@pytest.mark.parametrize("transcode", [False, True])
def test_coact_sparsify_files_load_in_sparsify(
    sparsify: ModuleType, tmp_path: Path, x: torch.Tensor, transcode: bool
) -> None:
    gen = torch.Generator().manual_seed(9)
    ours = SparsifyCoder(
        encoder_weight=torch.randn(WIDTH, D_IN, generator=gen),
        encoder_bias=torch.randn(WIDTH, generator=gen) * 0.3,
        W_dec=torch.randn(WIDTH, D_IN, generator=gen),
        b_dec=torch.randn(D_IN, generator=gen) * 0.3,
        W_skip=torch.randn(D_IN, D_IN, generator=gen) * 0.1 if transcode else None,
        k=K, transcode=transcode,
    )  # fmt: skip
    save_sparsify(ours, tmp_path / "layers.1.mlp")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "layers.1.mlp")
    assert (theirs.cfg.transcode, theirs.cfg.skip_connection) == (transcode, transcode)
    _same_codes(_sparsify_codes(theirs, x), ours.encode(x))
    torch.testing.assert_close(theirs(x).sae_out.detach(), ours.forward(x), atol=1e-4, rtol=1e-5)
