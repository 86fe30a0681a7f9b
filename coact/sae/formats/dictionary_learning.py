"""dictionary_learning's format: `ae.pt` (a state dict) + `config.json` ({"trainer": ...}).

Codes follow each class's `from_pretrained` with its defaults, as a user of the library
gets them: `AutoEncoder.from_pretrained(normalize_decoder=True)` folds the decoder's column
norms into the encoder (codes × ‖decoder column‖, unit decoder columns); the other classes
load their weights as stored. The loaded SAE's metadata says which (`decoder_norms`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from coact.errors import CoactError
from coact.sae.base import Sae
from coact.sae.formats.common import (
    build,
    fold_decoder_norms,
    pick,
    read_json,
    read_tensors,
    site_of,
    tensor_names,
)

CFG_FILE, WEIGHTS_FILE = "config.json", "ae.pt"
CLASSES = ("AutoEncoder", "AutoEncoderTopK", "JumpReluAutoEncoder", "BatchTopKSAE")
FOLDED = "folded into the encoder, as AutoEncoder.from_pretrained(normalize_decoder=True) does"
AS_STORED = "as stored (this class's from_pretrained does not rescale)"


def _fold_like_from_pretrained(sae: Sae) -> str:
    """AutoEncoder.normalize_decoder: skipped when every column norm is already ~1."""
    norms = sae.W_dec.norm(dim=-1)
    if torch.allclose(norms, torch.ones_like(norms)):
        return AS_STORED + "; its decoder columns already have unit norm"
    fold_decoder_norms(sae, norms)
    return FOLDED


def _plain(weights: dict[str, torch.Tensor]) -> bool:
    return {"encoder.weight", "encoder.bias", "decoder.weight", "bias"} <= set(weights)


def _early(path: Path, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Configs written before `{"trainer": ...}` (the 2024 `10_32768` Pythia set): a plain
    AutoEncoder whose shape is its weights' and whose submodule names its folder's parent
    (`.../mlp_out_layer1/10_32768`)."""
    width, d_in = weights["encoder.weight"].shape
    submodule = cfg.get("submodule_name") or path.resolve().parent.name
    found = {"dict_class": "AutoEncoder", "activation_dim": d_in, "dict_size": width}
    return found | {"submodule_name": submodule, "layer": cfg.get("layer")}


def sae_from_dictionary_learning(path: Path) -> Sae:
    cfg_file, weights_file = path / CFG_FILE, path / WEIGHTS_FILE
    cfg = read_json(cfg_file)
    weights = read_tensors(weights_file)
    trainer = (
        cfg["trainer"] if "trainer" in cfg or not _plain(weights) else _early(path, cfg, weights)
    )
    kind = trainer.get("dict_class")
    if kind not in CLASSES:
        raise CoactError(
            f"{cfg_file}: dictionary_learning class {kind!r} is not supported "
            f"(supported: {', '.join(CLASSES)})"
        )
    d_in, width = int(trainer["activation_dim"]), int(trainer["dict_size"])
    options: dict[str, Any] = {"activation": "relu"}
    if kind == "JumpReluAutoEncoder":  # SAELens layout; apply_b_dec_to_input is False
        found = pick(weights_file, weights, *tensor_names("jumprelu"))
        options = {"activation": "jumprelu", "subtract_decoder_bias": False}
    else:  # nn.Linear layouts: encoder.weight (dict, act), decoder.weight (act, dict)
        bias = "bias" if kind == "AutoEncoder" else "b_dec"
        names = ("encoder.weight", "encoder.bias", "decoder.weight", bias)
        enc_w, enc_b, dec_w, b_dec = pick(weights_file, weights, *names).values()
        found = {"W_enc": enc_w.T, "b_enc": enc_b, "W_dec": dec_w.T, "b_dec": b_dec}
    k = int(weights["k"]) if "k" in weights else trainer.get("k")
    if kind == "AutoEncoderTopK":
        options = {"activation": "topk", "k": int(k) if k is not None else None}
    elif kind == "BatchTopKSAE":  # at inference it keeps codes above one learned threshold
        threshold = pick(weights_file, weights, "threshold")["threshold"]
        found["threshold"] = torch.full((width,), float(threshold.max()))
        options = {"activation": "jumprelu"}
    options["site"] = site_of(trainer.get("submodule_name"))
    keep = ("layer", "submodule_name", "lm_name")
    options["metadata"] = {"dict_class": kind, "k": k, **{n: trainer.get(n) for n in keep}}
    sae = build(weights_file, found, d_in, width, **options)
    norms = _fold_like_from_pretrained(sae) if kind == "AutoEncoder" else AS_STORED
    sae.metadata["decoder_norms"] = norms
    return sae
