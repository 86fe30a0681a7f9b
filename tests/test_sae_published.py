"""Published dictionaries offline: sparsify skip transcoders, the seed study's pickled SAEs,
SAELens TopK files that rescale by decoder norms, and hf:// ids (the download is replaced
by a function that hands back files written here in each library's exact layout)."""

from __future__ import annotations

import json
import os
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from coact.errors import CoactError
from coact.sae.formats import SparsifyCoder, load_sae, read_sparsify, save_sparsify

# --- sparsify skip transcoders ---------------------------------------------------------------

# d_in = 2, 3 latents, k = 1. A transcoder does not subtract b_dec: pre = ReLU(E x + b) with
# x = [1, 2]: E x = [1, 2, 3] + b = [0, 0, -1] -> [1, 2, 2] -> ReLU [1, 2, 2]; top-1 keeps the
# first largest (torch.topk of a tie keeps one) -- so the bias of latent 2 is -1.5 instead:
# [1, 2, 1.5] -> top-1 keeps latent 1 (2.0). decode: 2 * W_dec[1] + b_dec = 2*[0, 1] + [1, 0]
# = [1, 2]; skip: W_skip x = [[1, 0], [1, 1]] @ [1, 2] = [1, 3]; output [2, 5].
TINY = {
    "encoder.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
    "encoder.bias": torch.tensor([0.0, 0.0, -1.5]),
    "W_dec": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
    "b_dec": torch.tensor([1.0, 0.0]),
    "W_skip": torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
}


def _tiny_coder(**changes: Any) -> SparsifyCoder:
    fields = {
        "encoder_weight": TINY["encoder.weight"],
        "encoder_bias": TINY["encoder.bias"],
        "W_dec": TINY["W_dec"],
        "b_dec": TINY["b_dec"],
        "W_skip": TINY["W_skip"],
        "k": 1,
        "transcode": True,
    }
    return SparsifyCoder(**(fields | changes))


def test_skip_transcoder_by_hand() -> None:
    coder = _tiny_coder()
    x = torch.tensor([[1.0, 2.0]])
    assert coder.encode(x).tolist() == [[0.0, 2.0, 0.0]]
    assert coder.forward(x).tolist() == [[2.0, 5.0]]
    # as an SAE (no transcode) x - b_dec = [0, 2]: pre [0, 2, 0.5] -> the same latent, and
    # no skip path: [1, 2]
    sae_like = _tiny_coder(transcode=False, W_skip=None)
    assert sae_like.encode(x).tolist() == [[0.0, 2.0, 0.0]]
    assert sae_like.forward(x).tolist() == [[1.0, 2.0]]


def test_save_then_read_sparsify(tmp_path: Path) -> None:
    """The files are those SparseCoder.save_to_disk writes: exactly its state-dict keys and
    its config's fields plus d_in."""
    out = save_sparsify(_tiny_coder(extra_cfg={"signed": False}), tmp_path / "layers.2.mlp")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg == {
        "signed": False,
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": 3,
        "k": 1,
        "multi_topk": False,
        "skip_connection": True,
        "transcode": True,
        "d_in": 2,
    }
    again = read_sparsify(out)
    assert again.hookpoint == "layers.2.mlp" and again.extra_cfg == {"signed": False}
    for name, tensor in again.tensors().items():
        assert torch.equal(tensor, TINY[name]), name
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    assert torch.equal(again.forward(x), _tiny_coder().forward(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.2.mlp"]


def test_sparsify_shape_mismatch(tmp_path: Path) -> None:
    out = save_sparsify(_tiny_coder(), tmp_path / "layers.0.mlp")
    save_file({**TINY, "W_skip": torch.zeros(3, 3)}, str(out / "sae.safetensors"))
    with pytest.raises(CoactError, match=r"W_skip has shape \(3, 3\) but the config says"):
        read_sparsify(out)


# --- the seed study's sparse_coding SAEs -------------------------------------------------------


class _LearnedDict:
    """The attributes sparse_coding's UntiedSAE / TiedSAE set in __init__."""

    def __init__(self, **attributes: Any) -> None:
        self.__dict__.update(attributes)


@pytest.fixture(params=["autoencoders.learned_dict", "learned_dict"])
def learned_dict_module(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> types.ModuleType:
    """`autoencoders.learned_dict` with its two classes, so torch.save pickles them by the
    names the published files hold (or as a copy of the module would name them)."""
    module = types.ModuleType(request.param)
    for name in ("UntiedSAE", "TiedSAE"):
        cls = type(name, (_LearnedDict,), {"__module__": module.__name__})
        setattr(module, name, cls)
    monkeypatch.setitem(sys.modules, "autoencoders", types.ModuleType("autoencoders"))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def _seed_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "encoder": torch.randn(12, 6, generator=gen),
        "decoder": torch.randn(12, 6, generator=gen) * 3,
        "encoder_bias": torch.randn(12, generator=gen) * 0.3,
    }


def _learned_dict_forward(w: dict[str, np.ndarray], x: np.ndarray, tied: bool, norm: bool):
    """LearnedDict.encode / decode (get_learned_dict: unit rows, clamped at 1e-8)."""
    unit = lambda m: m / np.maximum(np.linalg.norm(m, axis=1), 1e-8)[:, None]  # noqa: E731
    encoder = unit(w["encoder"]) if tied and norm else w["encoder"]
    codes = np.maximum(x @ encoder.T + w["encoder_bias"], 0)
    dictionary = unit(w["encoder"] if tied else w["decoder"])
    return codes, lambda c: c @ dictionary


@pytest.mark.parametrize(("tied", "norm"), [(False, False), (True, False), (True, True)])
def test_seed_sae_matches_its_forward(
    tmp_path: Path, learned_dict_module: types.ModuleType, tied: bool, norm: bool
) -> None:
    w = _seed_weights()
    if tied:
        obj = learned_dict_module.TiedSAE(
            encoder=w["encoder"], encoder_bias=w["encoder_bias"], norm_encoder=norm,
            n_feats=12, activation_size=6, center_trans=torch.zeros(6),
            center_rot=torch.eye(6), center_scale=torch.ones(6),
        )  # fmt: skip
    else:
        obj = learned_dict_module.UntiedSAE(**w, n_feats=12, activation_size=6)
    path = tmp_path / "Pythia-70M-deduped-mlp-3.pt"
    torch.save(obj, path)
    sae = load_sae(path)
    assert (sae.d_in, sae.width, sae.site) == (6, 12, None)
    assert sae.metadata["learned_dict"] == ("TiedSAE" if tied else "UntiedSAE")
    assert sae.metadata["kind"] == "mlp" and sae.metadata["layer"] == 3
    assert sae.metadata["format"] == "sparse_coding"
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(5)) * 2
    codes, decode = _learned_dict_forward(
        {k: v.numpy() for k, v in w.items()}, x.numpy(), tied, norm
    )
    assert (codes > 0).any() and (codes == 0).any()
    np.testing.assert_allclose(sae.encode(x).numpy(), codes, atol=1e-5)
    np.testing.assert_allclose(sae.decode(torch.tensor(codes)).numpy(), decode(codes), atol=1e-5)


def test_seed_state_dict_loads(tmp_path: Path) -> None:
    w = _seed_weights(1)
    torch.save(w, tmp_path / "Pythia-70M-deduped-res-2.pt")
    sae = load_sae(tmp_path / "Pythia-70M-deduped-res-2.pt")
    assert sae.metadata["learned_dict"] == "UntiedSAE" and sae.metadata["kind"] == "res"
    x = torch.randn(8, 6)
    assert torch.allclose(sae.encode(x), torch.relu(x @ w["encoder"].T + w["encoder_bias"]))


class Payload:
    """A pickle that would run a command when unpickled unsafely."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo unsafe",))


@pytest.mark.parametrize("payload", ["reduce", "class"])
def test_seed_refuses_unsafe_pickles(tmp_path: Path, payload: str) -> None:
    path = tmp_path / "Pythia-70M-deduped-mlp-1.pt"
    torch.save(Payload() if payload == "reduce" else {"sae": _LearnedDict(a=1)}, path)
    with pytest.raises(CoactError) as caught:
        load_sae(path)
    message = str(caught.value)
    assert message.startswith(f"refusing to load {path}") and "\n" not in message


def test_seed_refuses_centred_tied_sae(tmp_path: Path, learned_dict_module) -> None:
    w = _seed_weights()
    obj = learned_dict_module.TiedSAE(
        encoder=w["encoder"], encoder_bias=w["encoder_bias"], norm_encoder=True,
        center_trans=torch.ones(6),
    )  # fmt: skip
    torch.save(obj, tmp_path / "tied.pt")
    with pytest.raises(CoactError, match="non-trivial center_trans"):
        load_sae(tmp_path / "tied.pt")


# --- SAELens TopK files that rank by decoder-norm-scaled pre-activations ---------------------


def test_saelens_topk_rescaled_by_decoder_norm(tmp_path: Path) -> None:
    """TopKSAE with rescale_acts_by_decoder_norm: codes = TopK(ReLU)(pre × ‖W_dec‖) and
    x̂ = (codes / ‖W_dec‖) W_dec + b_dec (sae_lens/saes/topk_sae.py)."""
    gen = torch.Generator().manual_seed(7)
    w = {
        "W_enc": torch.randn(6, 16, generator=gen),
        "b_enc": torch.randn(16, generator=gen) * 0.2,
        "W_dec": torch.randn(16, 6, generator=gen) * torch.rand(16, 1, generator=gen) * 4,
        "b_dec": torch.randn(6, generator=gen) * 0.2,
    }
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": "topk", "d_in": 6, "d_sae": 16, "k": 3, "apply_b_dec_to_input": True}
    cfg |= {"rescale_acts_by_decoder_norm": True, "metadata": {"sae_lens_version": "6.54.12"}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(tmp_path)
    x = torch.randn(64, 6, generator=gen) * 2
    n = w["W_dec"].norm(dim=-1)
    pre = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * n
    values, idx = pre.topk(3, dim=-1)
    codes = torch.zeros_like(pre).scatter_(-1, idx, values.relu())
    assert torch.equal(sae.encode(x) > 0, codes > 0)
    torch.testing.assert_close(sae.encode(x), codes, atol=1e-5, rtol=1e-5)
    decoded = (codes / n) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(sae.decode(codes), decoded, atol=1e-5, rtol=1e-5)
    assert "rescale_acts_by_decoder_norm folded" in sae.metadata["decoder_norms"]


# --- hf:// ids ---------------------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fake hub: repo -> a local folder; records what was asked for."""
    asked: dict[str, Any] = {"root": tmp_path / "hub"}

    def snapshot_download(repo: str, allow_patterns: Any = None, **_: Any) -> str:
        asked["snapshot"] = (repo, allow_patterns)
        return str(asked["root"] / repo)

    def hf_hub_download(repo: str, filename: str, **_: Any) -> str:
        asked["file"] = (repo, filename)
        return str(asked["root"] / repo / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return asked


def test_hub_sparsify_skip_transcoder_and_sae(hub: dict[str, Any]) -> None:
    repo = hub["root"] / "EleutherAI/skip-transcoder-SmolLM2-135M-128x"
    save_sparsify(_tiny_coder(), repo / "layers.3.mlp")
    coder = read_sparsify("hf://EleutherAI/skip-transcoder-SmolLM2-135M-128x/layers.3.mlp")
    assert hub["snapshot"] == ("EleutherAI/skip-transcoder-SmolLM2-135M-128x", ["layers.3.mlp/*"])
    assert coder.transcode and coder.skip_connection
    save_sparsify(_tiny_coder(transcode=False, W_skip=None), repo.parent / "sae-x" / "layers.2")
    sae = load_sae("hf://EleutherAI/sae-x/layers.2")
    assert sae.site == "resid_pre[3]" and sae.metadata["source"] == "hf://EleutherAI/sae-x/layers.2"


def test_hub_saelens_and_dictionary_learning(hub: dict[str, Any]) -> None:
    folder = hub["root"] / "someone/saes/blocks.3.hook_resid_pre"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    w = {n: torch.randn(*s, generator=gen) for n, s in
         {"W_enc": (4, 8), "b_enc": (8,), "W_dec": (8, 4), "b_dec": (4,)}.items()}  # fmt: skip
    save_file(w, str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": 4, "d_sae": 8, "hook_name": folder.name}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae("hf://someone/saes/blocks.3.hook_resid_pre")
    assert sae.metadata["format"] == "saelens" and sae.site == "resid_pre[3]"
    ae = hub["root"] / "saprmarks/pythia-70m-deduped-saes/_dictionaries/mlp_out_layer1/10_32768"
    ae.mkdir(parents=True)
    state = {"bias": w["b_dec"], "encoder.weight": w["W_enc"].T.contiguous()}
    state |= {"encoder.bias": w["b_enc"], "decoder.weight": w["W_dec"].T.contiguous()}
    torch.save(state, ae / "ae.pt")
    # the 2024 10_32768 set predates {"trainer": ...}: hyperparameters only
    (ae / "config.json").write_text(json.dumps({"lr": 1e-3, "dictionary_size": 8}))
    sub = "_dictionaries/mlp_out_layer1/10_32768"
    sae = load_sae(f"hf://saprmarks/pythia-70m-deduped-saes/{sub}")
    assert hub["snapshot"] == ("saprmarks/pythia-70m-deduped-saes", [f"{sub}/*"])
    assert sae.metadata["format"] == "dictionary_learning" and sae.site == "mlp_out[1]"


def test_hub_seed_file(hub: dict[str, Any]) -> None:
    name = "Pythia-70M-deduped-mlp-2.pt"
    (hub["root"] / "jbrinkma/Pythia-70M-deduped-SAEs").mkdir(parents=True)
    torch.save(_seed_weights(), hub["root"] / "jbrinkma/Pythia-70M-deduped-SAEs" / name)
    sae = load_sae(f"hf://jbrinkma/Pythia-70M-deduped-SAEs/{name}")
    assert hub["file"] == ("jbrinkma/Pythia-70M-deduped-SAEs", name)
    assert sae.width == 12 and sae.metadata["format"] == "sparse_coding"


def test_hub_missing_folder(hub: dict[str, Any]) -> None:
    (hub["root"] / "a/b").mkdir(parents=True)
    with pytest.raises(CoactError, match=r"the hub repo 'a/b' has no folder 'layers\.9'"):
        load_sae("hf://a/b/layers.9")


def test_hub_folder_inside_a_zip(hub: dict[str, Any], tmp_path: Path) -> None:
    """saprmarks/pythia-70m-deduped-saes ships its 10_32768 set as one zip of
    dictionaries/pythia-70m-deduped/<submodule>/10_32768/{ae.pt, config.json}."""
    repo = hub["root"] / "saprmarks/pythia-70m-deduped-saes"
    repo.mkdir(parents=True)
    gen = torch.Generator().manual_seed(3)
    state = {"bias": torch.randn(4, generator=gen), "encoder.bias": torch.randn(8, generator=gen)}
    state |= {"encoder.weight": torch.randn(8, 4, generator=gen)}
    state |= {"decoder.weight": torch.randn(4, 8, generator=gen)}
    torch.save(state, tmp_path / "ae.pt")
    with zipfile.ZipFile(repo / "dictionaries_pythia-70m-deduped_10.zip", "w") as zipped:
        for sub in ("mlp_out_layer3", "resid_out_layer2"):
            folder = f"dictionaries/pythia-70m-deduped/{sub}/10_32768"
            zipped.write(tmp_path / "ae.pt", f"{folder}/ae.pt")
            zipped.writestr(f"{folder}/config.json", json.dumps({"dictionary_size": 8}))
    base = "hf://saprmarks/pythia-70m-deduped-saes/dictionaries_pythia-70m-deduped_10.zip"
    inner = "dictionaries/pythia-70m-deduped/{}/10_32768"
    sae = load_sae(f"{base}/{inner.format('resid_out_layer2')}")
    assert hub["file"] == (
        "saprmarks/pythia-70m-deduped-saes",
        "dictionaries_pythia-70m-deduped_10.zip",
    )
    assert sae.site == "resid_pre[3]" and sae.metadata["format"] == "dictionary_learning"
    unzipped = repo / "dictionaries_pythia-70m-deduped_10.zip.unzipped"
    assert not (unzipped / inner.format("mlp_out_layer3")).exists()  # only what was asked
    assert load_sae(f"{base}/{inner.format('mlp_out_layer3')}").site == "mlp_out[3]"
    with pytest.raises(CoactError, match="has no folder 'dictionaries/x'"):
        load_sae(f"{base}/dictionaries/x")
    (repo / "dictionaries_pythia-70m-deduped_10.zip").unlink()  # extracted once: not re-read
    assert load_sae(f"{base}/{inner.format('mlp_out_layer3')}").site == "mlp_out[3]"


def test_hub_transcoder_loads_as_skip_transcoder(hub: dict[str, Any]) -> None:
    from coact.transcoder.formats import load_transcoder

    repo = hub["root"] / "EleutherAI/skip-transcoder-SmolLM2-135M-128x"
    coder = _tiny_coder()
    save_sparsify(coder, repo / "layers.3.mlp")
    tc = load_transcoder("hf://EleutherAI/skip-transcoder-SmolLM2-135M-128x/layers.3.mlp")
    assert hub["snapshot"] == ("EleutherAI/skip-transcoder-SmolLM2-135M-128x", ["layers.3.mlp/*"])
    assert tc.layer == 3
    x = torch.randn(5, coder.d_in, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(tc(x), coder.forward(x))
