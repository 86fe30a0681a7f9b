"""Published SAE files load into `Sae` and encode/decode exactly as their library does.

Each writer below lays files out the way that library saves them (key names, shapes,
config fields), and each reference forward is written out here from the library's own
code, independently of `Sae`, so a wrong transpose or activation rule shows up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from coact.errors import CoactError
from coact.sae.base import Sae
from coact.sae.formats import load_sae, save_saelens

D_IN, WIDTH, K = 8, 16, 4
ATOL = 1e-5


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


@pytest.fixture
def x() -> torch.Tensor:
    return _randn(torch.Generator().manual_seed(123), 32, D_IN, scale=2.0)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _keep_top(values: np.ndarray, k: int) -> np.ndarray:
    """Zero all but the k largest entries of each row (what torch.topk + scatter_ keeps)."""
    out = np.zeros_like(values)
    for i, row in enumerate(values):
        top = np.argsort(-row, kind="stable")[:k]
        out[i, top] = row[top]
    return out


def _check(sae: Sae, x: torch.Tensor, codes: np.ndarray, decode: Any) -> None:
    """`sae` gives the reference codes, and decodes them as the reference decoder does."""
    assert sae.d_in == D_IN and sae.width == WIDTH
    np.testing.assert_allclose(_np(sae.encode(x)), codes, atol=ATOL)
    assert (codes != 0).any(), "the case should exercise some active latents"
    np.testing.assert_allclose(
        _np(sae.decode(torch.tensor(codes).float())), decode(codes), atol=ATOL
    )


# --- SAELens ------------------------------------------------------------------------------


def _saelens_weights(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = {
        "W_enc": _randn(gen, D_IN, WIDTH),
        "W_dec": _randn(gen, WIDTH, D_IN),
        "b_enc": _randn(gen, WIDTH, scale=0.5),
        "b_dec": _randn(gen, D_IN, scale=0.5),
    }
    if arch == "jumprelu":
        weights["threshold"] = torch.rand(WIDTH, generator=gen) * 1.5 + 0.1
    return weights


def _saelens_cfg(arch: str, layout: str, hook: str, apply_b_dec: bool) -> dict[str, Any]:
    """cfg.json as SAELens versions wrote it: v6 (`metadata`), v6 rc (`meta`), 5.x, older."""
    meta = {"model_name": "tiny", "hook_name": hook, "hook_head_index": None, "context_size": 128}
    base = {"d_in": D_IN, "d_sae": WIDTH, "dtype": "float32", "device": "cpu"}
    base["apply_b_dec_to_input"] = apply_b_dec
    if layout in ("v6", "v6-meta"):
        key = "metadata" if layout == "v6" else "meta"
        cfg = {**base, "normalize_activations": "none", "reshape_activations": "none"}
        cfg |= {key: {**meta, "sae_lens_version": "6.5.1"}, "architecture": arch}
        return cfg | ({"k": K} if arch == "topk" else {})
    cfg = {**base, **meta, "finetuning_scaling_factor": False, "normalize_activations": "none"}
    cfg |= {"prepend_bos": True, "dataset_path": "tiny/data", "sae_lens_training_version": "5.9.1"}
    if layout == "pre6":  # 5.x: architecture "topk" with its k in activation_fn_kwargs
        cfg |= {"architecture": arch, "activation_fn_str": "topk" if arch == "topk" else "relu"}
    elif layout == "pre6-fn":  # early topk: a "standard" SAE whose activation_fn is topk
        cfg |= {"architecture": "standard", "activation_fn_str": arch}
    # layout "oldest": no architecture at all, which means standard
    return cfg | ({"activation_fn_kwargs": {"k": K}} if arch == "topk" else {})


def _write_saelens(
    path: Path,
    arch: str,
    *,
    layout: str = "v6",
    hook: str = "blocks.3.hook_resid_pre",
    apply_b_dec: bool = True,
    log_threshold: bool = False,
    cfg_changes: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    path.mkdir(parents=True)
    weights = _saelens_weights(arch)
    stored = dict(weights)
    if log_threshold:  # a JumpReLU training checkpoint keeps log(threshold)
        stored["log_threshold"] = stored.pop("threshold").log()
    save_file(stored, str(path / "sae_weights.safetensors"))
    cfg = _saelens_cfg(arch, layout, hook, apply_b_dec) | (cfg_changes or {})
    (path / "cfg.json").write_text(json.dumps(cfg))
    return weights


def _saelens_encode(w: dict[str, torch.Tensor], arch: str, apply_b_dec: bool, x: torch.Tensor):
    """sae_lens/saes: process_sae_in subtracts b_dec * apply_b_dec_to_input, then the rule."""
    sae_in = _np(x) - _np(w["b_dec"]) * apply_b_dec
    hidden_pre = sae_in @ _np(w["W_enc"]) + _np(w["b_enc"])
    if arch == "standard":
        return np.maximum(hidden_pre, 0)
    if arch == "topk":  # TopK.forward: topk of hidden_pre, ReLU on the kept values
        return np.maximum(_keep_top(hidden_pre, K), 0)
    return np.maximum(hidden_pre, 0) * (hidden_pre > _np(w["threshold"]))  # JumpReLUSAE


SAELENS_CASES = [
    ("standard", "v6", True, False),
    ("topk", "v6", True, False),
    ("jumprelu", "v6", True, False),
    ("topk", "v6-meta", True, False),
    ("jumprelu", "v6-meta", False, True),
    ("standard", "pre6", True, False),
    ("topk", "pre6", True, False),
    ("topk", "pre6-fn", True, False),
    ("jumprelu", "pre6", False, False),  # Gemma Scope style: no b_dec on the input
    ("standard", "oldest", False, False),
]


@pytest.mark.parametrize(("arch", "layout", "apply_b_dec", "log_threshold"), SAELENS_CASES)
def test_saelens_matches_its_forward(
    tmp_path: Path, x: torch.Tensor, arch: str, layout: str, apply_b_dec: bool, log_threshold: bool
) -> None:
    w = _write_saelens(
        tmp_path / "sae", arch, layout=layout, apply_b_dec=apply_b_dec, log_threshold=log_threshold
    )
    sae = load_sae(tmp_path / "sae")
    assert sae.activation == {"standard": "relu"}.get(arch, arch)
    assert sae.k == (K if arch == "topk" else None)
    assert sae.site == "resid_pre[3]"
    assert sae.metadata["format"] == "saelens" and sae.metadata["source"] == str(tmp_path / "sae")
    assert sae.metadata["hook_name"] == "blocks.3.hook_resid_pre"
    assert not sae.training and not any(p.requires_grad for p in sae.parameters())
    codes = _saelens_encode(w, arch, apply_b_dec, x)
    _check(sae, x, codes, lambda f: f @ _np(w["W_dec"]) + _np(w["b_dec"]))


# --- A case small enough to work out by hand -------------------------------------------------

# d_in=2, width=3. x - b_dec = [2, 1] and [-1, 3], so pre-activations are [2, 0, 1] and
# [-1, 2, -4]; ReLU keeps [2, 0, 1] and [0, 2, 0]; top-1 keeps [2, 0, 0] and [0, 2, 0];
# thresholds [2.5, 1.5, 0.5] keep [0, 0, 1] (2 <= 2.5) and [0, 2, 0].
TINY_X = torch.tensor([[3.0, 2.0], [0.0, 4.0]])
TINY_W = {
    "W_enc": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]),
    "b_enc": torch.tensor([0.0, -1.0, 0.0]),
    "W_dec": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
    "b_dec": torch.tensor([1.0, 1.0]),
}
TINY_CODES = {
    "standard": [[2.0, 0.0, 1.0], [0.0, 2.0, 0.0]],
    "topk": [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]],
    "jumprelu": [[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]],
}
# [2, 0, 1] @ W_dec + b_dec = [2 + 1, 0 + 1] + [1, 1] = [4, 2]; [0, 2, 0] -> [1, 3].
TINY_DECODED = [[4.0, 2.0], [1.0, 3.0]]


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_hand_computed_saelens(tmp_path: Path, arch: str) -> None:
    weights = dict(TINY_W)
    if arch == "jumprelu":
        weights["threshold"] = torch.tensor([2.5, 1.5, 0.5])
    save_file(weights, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": 2, "d_sae": 3, "apply_b_dec_to_input": True}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | ({"k": 1} if arch == "topk" else {})))
    sae = load_sae(tmp_path)
    assert sae.encode(TINY_X).tolist() == TINY_CODES[arch]
    assert sae.decode(torch.tensor(TINY_CODES["standard"])).tolist() == TINY_DECODED


def test_hand_computed_dictionary_learning(tmp_path: Path) -> None:
    """The same numbers in AutoEncoder's nn.Linear layout give the same codes."""
    state = {
        "bias": TINY_W["b_dec"],
        "encoder.weight": TINY_W["W_enc"].T.contiguous(),
        "encoder.bias": TINY_W["b_enc"],
        "decoder.weight": TINY_W["W_dec"].T.contiguous(),
    }
    torch.save(state, tmp_path / "ae.pt")
    trainer = {"dict_class": "AutoEncoder", "activation_dim": 2, "dict_size": 3}
    (tmp_path / "config.json").write_text(json.dumps({"trainer": trainer}))
    sae = load_sae(tmp_path)
    # from_pretrained folds the decoder column norms [1, 1, √2] into the encoder: latent 2's
    # code 1 becomes √2 and its decoder row [1, 1] becomes [1, 1]/√2, so x̂ is unchanged.
    root2 = 2.0**0.5
    folded = [[2.0, 0.0, root2], [0.0, 2.0, 0.0]]
    np.testing.assert_allclose(sae.encode(TINY_X).numpy(), folded, rtol=1e-6)
    np.testing.assert_allclose(sae.decode(torch.tensor(folded)).numpy(), TINY_DECODED, rtol=1e-6)
    assert sae.metadata["decoder_norms"].startswith("folded into the encoder")


# --- dictionary_learning ---------------------------------------------------------------------

DL_TRAINERS = {
    "AutoEncoder": "StandardTrainer",
    "AutoEncoderTopK": "TopKTrainer",
    "BatchTopKSAE": "BatchTopKTrainer",
    "JumpReluAutoEncoder": "JumpReluTrainer",
}


def _write_dictionary_learning(
    path: Path, dict_class: str, *, threshold: float = 0.8, submodule: str = "resid_post_layer_3"
) -> dict[str, torch.Tensor]:
    """ae.pt is `trainer.ae.state_dict()`; config.json is {"trainer": config, "buffer": ...}."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    if dict_class == "JumpReluAutoEncoder":  # nn.Parameters W_enc (act, dict), W_dec (dict, act)
        state = {
            "W_enc": _randn(gen, D_IN, WIDTH),
            "b_enc": _randn(gen, WIDTH, scale=0.5),
            "W_dec": _randn(gen, WIDTH, D_IN),
            "b_dec": _randn(gen, D_IN, scale=0.5),
            "threshold": torch.rand(WIDTH, generator=gen) + 0.1,
        }
    else:  # nn.Linear: encoder.weight (dict, act), decoder.weight (act, dict)
        state = {
            "encoder.weight": _randn(gen, WIDTH, D_IN),
            "encoder.bias": _randn(gen, WIDTH, scale=0.5),
            "decoder.weight": _randn(gen, D_IN, WIDTH),
        }
        if dict_class == "AutoEncoder":
            state["bias"] = _randn(gen, D_IN, scale=0.5)
        else:  # TopK-style classes register k and threshold buffers
            state["b_dec"] = _randn(gen, D_IN, scale=0.5)
            state["k"] = torch.tensor(K, dtype=torch.int)
            state["threshold"] = torch.tensor(threshold, dtype=torch.float32)
    torch.save(state, path / "ae.pt")
    trainer = {
        "trainer_class": DL_TRAINERS[dict_class],
        "dict_class": dict_class,
        "lr": 1e-4,
        "steps": 100,
        "seed": 0,
        "activation_dim": D_IN,
        "dict_size": WIDTH,
        "device": "cpu",
        "layer": 3,
        "lm_name": "tiny/model",
        "wandb_name": dict_class,
        "submodule_name": submodule,
    }
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        trainer |= {"k": K, "auxk_alpha": 1 / 32, "threshold_beta": 0.999}
    buffer = {"d_submodule": D_IN, "io": "out", "n_ctxs": 30, "ctx_len": 16, "device": "cpu"}
    (path / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": buffer}, indent=4))
    return state


def _dl_forward(state: dict[str, torch.Tensor], dict_class: str, x: torch.Tensor):
    """dictionary.py / trainers/top_k.py / trainers/batch_top_k.py encode and decode."""
    s = {k: _np(v) for k, v in state.items()}
    if dict_class == "JumpReluAutoEncoder":  # apply_b_dec_to_input is False
        pre_jump = _np(x) @ s["W_enc"] + s["b_enc"]
        codes = np.maximum(pre_jump * (pre_jump > s["threshold"]), 0)
        return codes, lambda f: f @ s["W_dec"] + s["b_dec"]
    bias = s["bias"] if dict_class == "AutoEncoder" else s["b_dec"]
    if dict_class == "AutoEncoder":  # from_pretrained(normalize_decoder=True) folds the norms
        norms = np.linalg.norm(s["decoder.weight"], axis=0)
        s["decoder.weight"] = s["decoder.weight"] / norms
        s["encoder.weight"] = s["encoder.weight"] * norms[:, None]
        s["encoder.bias"] = s["encoder.bias"] * norms
    post_relu = np.maximum((_np(x) - bias) @ s["encoder.weight"].T + s["encoder.bias"], 0)
    if dict_class == "AutoEncoder":
        codes = post_relu
    elif dict_class == "AutoEncoderTopK":
        codes = _keep_top(post_relu, K)
    else:  # BatchTopKSAE.encode(use_threshold=True), its inference default
        codes = post_relu * (post_relu > s["threshold"])
    return codes, lambda f: f @ s["decoder.weight"].T + bias


@pytest.mark.parametrize(
    ("dict_class", "threshold"),
    [
        ("AutoEncoder", 0.0),
        ("AutoEncoderTopK", -1.0),
        ("BatchTopKSAE", 0.8),
        ("BatchTopKSAE", -1.0),  # threshold never tracked: every positive code passes
        ("JumpReluAutoEncoder", 0.0),
    ],
)
def test_dictionary_learning_matches_its_forward(
    tmp_path: Path, x: torch.Tensor, dict_class: str, threshold: float
) -> None:
    state = _write_dictionary_learning(tmp_path / "ae", dict_class, threshold=threshold)
    sae = load_sae(tmp_path / "ae")
    assert sae.site == "resid_pre[4]"  # resid_post of layer 3
    assert sae.metadata["format"] == "dictionary_learning"
    assert sae.metadata["dict_class"] == dict_class and sae.metadata["layer"] == 3
    codes, decode = _dl_forward(state, dict_class, x)
    _check(sae, x, codes, decode)


# --- sparsify --------------------------------------------------------------------------------


def _write_sparsify(
    path: Path, *, num_latents: int = WIDTH, expansion_factor: int = 32, **cfg_changes: Any
) -> dict[str, torch.Tensor]:
    """`SparseCoder.save_to_disk`: save_model(...) and {**cfg.to_dict(), "d_in": d_in}."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(2)
    weights = {
        "encoder.weight": _randn(gen, WIDTH, D_IN),
        "encoder.bias": _randn(gen, WIDTH, scale=0.5),
        "W_dec": _randn(gen, WIDTH, D_IN),
        "b_dec": _randn(gen, D_IN, scale=0.5),
    }
    save_file(weights, str(path / "sae.safetensors"))
    cfg = {
        "activation": "topk",
        "expansion_factor": expansion_factor,
        "normalize_decoder": True,
        "num_latents": num_latents,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D_IN,
    }
    (path / "cfg.json").write_text(json.dumps(cfg | cfg_changes))
    return weights


@pytest.mark.parametrize(("num_latents", "expansion_factor"), [(WIDTH, 32), (0, WIDTH // D_IN)])
def test_sparsify_matches_its_forward(
    tmp_path: Path, x: torch.Tensor, num_latents: int, expansion_factor: int
) -> None:
    written = _write_sparsify(
        tmp_path / "layers.3", num_latents=num_latents, expansion_factor=expansion_factor
    )
    w = {k: _np(v) for k, v in written.items()}
    sae = load_sae(tmp_path / "layers.3")
    assert sae.site == "resid_pre[4]" and sae.metadata["format"] == "sparsify"
    # SparseCoder.encode: x - b_dec, then relu(linear) and topk -> (top_acts, top_indices)
    pre = np.maximum((_np(x) - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"], 0)
    top_indices = np.argsort(-pre, axis=1, kind="stable")[:, :K]
    top_acts = np.take_along_axis(pre, top_indices, axis=1)
    codes = np.zeros_like(pre)
    np.put_along_axis(codes, top_indices, top_acts, axis=1)

    def decode(f: np.ndarray) -> np.ndarray:  # decoder_impl: sum of top_acts * W_dec rows
        out = np.tile(w["b_dec"], (len(f), 1))
        for row, (acts, idx) in enumerate(zip(top_acts, top_indices, strict=True)):
            assert np.allclose(f[row, idx], acts)
            for act, latent in zip(acts, idx, strict=True):
                out[row] += act * w["W_dec"][latent]
        return out

    _check(sae, x, codes, decode)


# --- Sites from hook, submodule and hookpoint names -----------------------------------------


@pytest.mark.parametrize(
    ("hook", "site"),
    [
        ("blocks.3.hook_resid_pre", "resid_pre[3]"),
        ("blocks.3.hook_resid_post", "resid_pre[4]"),
        ("blocks.0.hook_mlp_out", "mlp_out[0]"),
        ("blocks.2.hook_attn_out", "attn_out[2]"),
        ("blocks.2.ln2.hook_normalized", "mlp_in[2]"),
        ("blocks.5.attn.hook_z", None),
    ],
)
def test_saelens_hook_name_gives_site(tmp_path: Path, hook: str, site: str | None) -> None:
    _write_saelens(tmp_path / "sae", "standard", layout="pre6", hook=hook)
    sae = load_sae(tmp_path / "sae")
    assert sae.site == site
    assert sae.metadata["hook_name"] == hook  # kept even when it names no site we know


@pytest.mark.parametrize(
    ("submodule", "site"),
    [("resid_post_layer_3", "resid_pre[4]"), ("mlp_out_layer_1", "mlp_out[1]"), ("enc", None)],
)
def test_dictionary_learning_submodule_gives_site(
    tmp_path: Path, submodule: str, site: str | None
) -> None:
    _write_dictionary_learning(tmp_path / "ae", "AutoEncoder", submodule=submodule)
    assert load_sae(tmp_path / "ae").site == site


@pytest.mark.parametrize(
    ("hookpoint", "site"),
    [("layers.2.mlp", "mlp_out[2]"), ("model.layers.0", "resid_pre[1]"), ("latest", None)],
)
def test_sparsify_hookpoint_gives_site(tmp_path: Path, hookpoint: str, site: str | None) -> None:
    _write_sparsify(tmp_path / hookpoint)
    sae = load_sae(tmp_path / hookpoint)
    assert sae.site == site and sae.metadata["hookpoint"] == hookpoint


# --- Saving in the SAELens layout ------------------------------------------------------------


def _random_sae(activation: str, site: str | None = "mlp_out[2]", seed: int = 3) -> Sae:
    sae = Sae(
        D_IN,
        WIDTH,
        activation=activation,  # type: ignore[arg-type]
        k=K if activation == "topk" else None,
        subtract_decoder_bias=activation != "jumprelu",
        site=site,
        metadata={"model": "tiny/model", "layer": 2},
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (*sae.parameters(), sae.threshold):
            tensor.copy_(torch.rand(tensor.shape, generator=gen) * 2 - 1)
    return sae


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_save_then_load_reproduces_the_sae(
    tmp_path: Path, x: torch.Tensor, activation: str
) -> None:
    sae = _random_sae(activation)
    out = save_saelens(sae, tmp_path / "out" / "sae", extra_cfg={"model_name": "tiny/model"})
    assert out == tmp_path / "out" / "sae"
    loaded = load_sae(out)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    codes = sae.encode(x)
    assert torch.equal(loaded.decode(codes), sae.decode(codes))
    assert loaded.describe() == sae.describe()
    assert loaded.metadata["model"] == "tiny/model" and loaded.metadata["format"] == "saelens"
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard"}.get(activation, activation)
    assert cfg["hook_name"] == "blocks.2.hook_mlp_out" and cfg["coact_site"] == "mlp_out[2]"
    assert cfg["dtype"] == "float32" and cfg["normalize_activations"] == "none"
    # SAELens reads a config without sae_lens_version as pre-6.0 and drops `metadata`
    assert cfg["metadata"]["sae_lens_version"] == "6.0.0"
    assert cfg["metadata"]["model"] == "tiny/model"
    assert cfg["model_name"] == "tiny/model" and cfg["d_in"] == D_IN and cfg["d_sae"] == WIDTH
    if activation == "topk":
        assert cfg["k"] == K and cfg["activation_fn_kwargs"] == {"k": K}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sae"]


@pytest.mark.parametrize(
    ("site", "hook"),
    [
        ("resid_pre[3]", "blocks.3.hook_resid_pre"),
        ("attn_out[1]", "blocks.1.hook_attn_out"),
        ("resid_mid[0]", "blocks.0.hook_resid_mid"),
        ("mlp_in[2]", "blocks.2.ln2.hook_normalized"),
    ],
)
def test_saved_hook_name_follows_site(tmp_path: Path, site: str, hook: str) -> None:
    out = save_saelens(_random_sae("relu", site=site), tmp_path / "sae")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["hook_name"] == cfg["metadata"]["hook_name"] == hook
    assert load_sae(out).site == site


@pytest.mark.parametrize(
    ("kind", "hook"),
    [("resid_pre", "blocks.2.hook_resid_pre"), ("resid_mid", "blocks.2.hook_resid_mid")],
)
def test_mlp_resid_saves_the_real_hook(tmp_path: Path, kind: str, hook: str) -> None:
    """mlp_resid is no TransformerLens hook: parallel models read hook_resid_pre, sequential
    ones hook_resid_mid; coact's own name stays in coact_site."""
    sae = _random_sae("relu", site="mlp_resid[2]")
    out = save_saelens(sae, tmp_path / "a", mlp_resid_kind=kind)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["hook_name"] == cfg["metadata"]["hook_name"] == hook
    assert cfg["coact_site"] == "mlp_resid[2]" and load_sae(out).site == "mlp_resid[2]"
    sae = _random_sae("relu", site="mlp_resid[2]")
    sae.metadata["mlp_resid_kind"] = kind  # the same, told by the SAE's own metadata
    cfg = json.loads((save_saelens(sae, tmp_path / "b") / "cfg.json").read_text())
    assert cfg["hook_name"] == hook


def test_mlp_resid_without_its_kind_writes_no_hook(tmp_path: Path) -> None:
    out = save_saelens(_random_sae("relu", site="mlp_resid[2]"), tmp_path / "sae")
    cfg = json.loads((out / "cfg.json").read_text())
    assert "hook_name" not in cfg and "hook_name" not in cfg["metadata"]
    assert cfg["coact_site"] == "mlp_resid[2]"


def test_save_without_site_writes_no_hook_name(tmp_path: Path) -> None:
    out = save_saelens(_random_sae("relu", site=None), tmp_path / "sae")
    assert "hook_name" not in json.loads((out / "cfg.json").read_text())
    assert load_sae(out).site is None


def test_load_convert_save_roundtrip(tmp_path: Path, x: torch.Tensor) -> None:
    """A dictionary_learning SAE re-saved as SAELens still encodes identically."""
    _write_dictionary_learning(tmp_path / "ae", "BatchTopKSAE")
    original = load_sae(tmp_path / "ae")
    again = load_sae(save_saelens(original, tmp_path / "converted"))
    assert torch.equal(again.encode(x), original.encode(x))
    assert again.site == original.site == "resid_pre[4]"


def test_save_replaces_an_existing_directory(tmp_path: Path, x: torch.Tensor) -> None:
    save_saelens(_random_sae("topk", seed=1), tmp_path / "sae")
    (tmp_path / "sae" / "stale.txt").write_text("from the old save")
    second = _random_sae("jumprelu", seed=2)
    save_saelens(second, tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    assert torch.equal(load_sae(tmp_path / "sae").encode(x), second.encode(x))
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no temp or old directories left


@pytest.mark.parametrize("failure", ["writing", "renaming"])
def test_failed_save_leaves_the_old_directory(tmp_path: Path, monkeypatch, failure: str) -> None:
    save_saelens(_random_sae("relu"), tmp_path / "sae")
    before = {p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()}
    real_replace = os.replace

    def broken_write(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    def broken_rename(src: Any, dst: Any) -> None:  # moving the new directory in fails
        if str(src).endswith(".tmp"):
            raise OSError("disk full")
        real_replace(src, dst)

    if failure == "writing":
        monkeypatch.setattr("coact.sae.formats.saelens.save_file", broken_write)
    else:
        monkeypatch.setattr(os, "replace", broken_rename)
    with pytest.raises(OSError, match="disk full"):
        save_saelens(_random_sae("topk"), tmp_path / "sae")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


# --- Bad input: one CoactError line that names the problem -----------------------------------


def _error(source: str | Path) -> str:
    with pytest.raises(CoactError) as caught:
        load_sae(source)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_directory(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nowhere")


def test_directory_without_an_sae(tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text("{}")
    message = _error(tmp_path)
    assert "no SAE found" in message and "sae_weights.safetensors" in message


def test_corrupt_json(tmp_path: Path) -> None:
    _write_saelens(tmp_path / "sae", "standard")
    (tmp_path / "sae" / "cfg.json").write_text('{"d_in": 8,')
    message = _error(tmp_path / "sae")
    assert "cannot read SAE config" in message and "cfg.json" in message


@pytest.mark.parametrize("weights_file", ["sae_weights.safetensors", "ae.pt"])
def test_corrupt_weights(tmp_path: Path, weights_file: str) -> None:
    if weights_file == "ae.pt":
        _write_dictionary_learning(tmp_path / "sae", "AutoEncoder")
    else:
        _write_saelens(tmp_path / "sae", "standard")
    (tmp_path / "sae" / weights_file).write_bytes(b"\x00\x01 definitely not tensors")
    message = _error(tmp_path / "sae")
    assert "cannot read SAE weights" in message and weights_file in message


@pytest.mark.parametrize("norm", ["layer_norm", "expected_average_only_in", True])
def test_unsupported_normalisation(tmp_path: Path, norm: Any) -> None:
    _write_saelens(tmp_path / "sae", "standard", cfg_changes={"normalize_activations": norm})
    message = _error(tmp_path / "sae")
    assert f"normalize_activations={norm!r} is not supported" in message


def test_shape_mismatch(tmp_path: Path) -> None:
    _write_saelens(tmp_path / "sae", "standard", cfg_changes={"d_in": D_IN + 1})
    message = _error(tmp_path / "sae")
    assert "W_enc has shape (8, 16) but the config says (9, 16)" in message
    assert "sae_weights.safetensors" in message


def test_dictionary_learning_shape_mismatch(tmp_path: Path) -> None:
    _write_dictionary_learning(tmp_path / "ae", "AutoEncoderTopK")
    config = json.loads((tmp_path / "ae" / "config.json").read_text())
    config["trainer"]["dict_size"] = 2 * WIDTH
    (tmp_path / "ae" / "config.json").write_text(json.dumps(config))
    assert "W_enc has shape (8, 16) but the config says (8, 32)" in _error(tmp_path / "ae")


def test_missing_tensor(tmp_path: Path) -> None:
    _write_saelens(tmp_path / "sae", "jumprelu")
    weights = {k: v for k, v in _saelens_weights("jumprelu").items() if k != "threshold"}
    save_file(weights, str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert "missing tensors ['threshold']" in _error(tmp_path / "sae")


def test_missing_config_field(tmp_path: Path) -> None:
    _write_saelens(tmp_path / "sae", "standard")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    del cfg["d_sae"]
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    assert "has no field 'd_sae'" in _error(tmp_path / "sae")


def test_topk_without_k(tmp_path: Path) -> None:
    _write_saelens(tmp_path / "sae", "topk", layout="v6")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    del cfg["k"]
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    assert "needs 0 < k <= width, got k=None" in _error(tmp_path / "sae")


def test_unsupported_saelens_architecture(tmp_path: Path) -> None:
    _write_saelens(tmp_path / "sae", "standard", cfg_changes={"architecture": "gated"})
    assert "architecture 'gated'" in _error(tmp_path / "sae")


def test_unsupported_dictionary_learning_class(tmp_path: Path) -> None:
    _write_dictionary_learning(tmp_path / "ae", "AutoEncoder")
    (tmp_path / "ae" / "config.json").write_text(
        json.dumps({"trainer": {"dict_class": "GatedAutoEncoder"}})
    )
    assert "class 'GatedAutoEncoder' is not supported" in _error(tmp_path / "ae")


def test_sparsify_skip_connection(tmp_path: Path) -> None:
    weights = _write_sparsify(tmp_path / "layers.1", skip_connection=True)
    weights["W_skip"] = torch.zeros(D_IN, D_IN)
    save_file(weights, str(tmp_path / "layers.1" / "sae.safetensors"))
    message = _error(tmp_path / "layers.1")
    assert "skip transcoder" in message and "read_sparsify" in message


def test_sparsify_transcoder(tmp_path: Path) -> None:
    _write_sparsify(tmp_path / "layers.1", transcode=True)
    message = _error(tmp_path / "layers.1")
    assert "is a sparsify transcoder" in message and "not an SAE" in message


def test_hub_source_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = _error("hf://coact-test/no-such-sae/layers.3")
    assert "'coact-test/no-such-sae'" in message and "local directory" in message


def test_hub_source_needs_owner_and_repo() -> None:
    assert "hf://OWNER/REPO" in _error("hf://just-a-name")
