"""The seed study's SAEs (`jbrinkma/Pythia-70M-deduped-SAEs`): one `.pt` file per SAE
(`Pythia-70M-deduped-{mlp,res}-{layer}.pt`), each a pickled `UntiedSAE` or `TiedSAE`
object of the `sparse_coding` project (module `autoencoders.learned_dict`).

Those are objects, not state dicts, so a plain `torch.load` would run their pickle. Here
they are read with `weights_only=True`: the two class names are allowed, and only as empty
attribute holders (`_Untied`, `_Tied`) that receive the stored tensors; anything else in
the file (another class, a function) stops the load with one error line.

Their forward (LearnedDict): codes = ReLU(E x + b) with E the encoder (rows normalised
first for a TiedSAE with norm_encoder); x̂ = Dᵀ codes with D the decoder rows (the encoder
rows for a TiedSAE) normalised to unit norm, and no decoder bias.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from coact.errors import CoactError
from coact.sae.base import Sae
from coact.sae.formats.common import build, first_line

MODULE = "autoencoders.learned_dict"
# "Pythia-70M-deduped-mlp-3.pt": the kind and layer, kept in the metadata only (the
# files do not say which residual stream "res" is, so no site is claimed).
_NAME = re.compile(r"-(res|mlp|attn)-(\d+)\.pt$")


class _Stored:
    """An attribute holder; the safe unpickler fills its __dict__ from the file."""


class _Untied(_Stored):
    pass


class _Tied(_Stored):
    pass


# the module as sparse_coding's scripts import it, and as a checkout or a copy may name it
MODULES = (MODULE, f"sparse_coding.{MODULE}", "learned_dict")
_ALLOWED: list[Any] = [
    (holder, f"{module}.{name}")
    for module in MODULES
    for holder, name in ((_Untied, "UntiedSAE"), (_Tied, "TiedSAE"))
]


def read_learned_dict(path: Path) -> tuple[str, dict[str, Any]]:
    """(class name, stored attributes) of a sparse_coding file, or a plain state dict."""
    try:
        with torch.serialization.safe_globals(_ALLOWED):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # another class, a function, a corrupt file: never run
        raise CoactError(
            f"refusing to load {path}: not a sparse_coding UntiedSAE/TiedSAE or state dict "
            f"readable without unsafe unpickling ({first_line(error)})"
        ) from None
    if isinstance(obj, _Untied | _Tied):
        return ("UntiedSAE" if isinstance(obj, _Untied) else "TiedSAE"), dict(vars(obj))
    if isinstance(obj, Mapping):
        kind = "UntiedSAE" if "decoder" in obj else "TiedSAE"
        return kind, dict(obj)
    raise CoactError(f"{path} holds a {type(obj).__name__}, not an UntiedSAE, TiedSAE or dict")


def _tensor(path: Path, stored: Mapping[str, Any], name: str) -> Tensor:
    value = stored.get(name)
    if not isinstance(value, Tensor):
        raise CoactError(f"{path}: no tensor {name!r}; it holds {sorted(stored)}")
    return value.detach().float()


def _unit_rows(matrix: Tensor) -> Tensor:
    """LearnedDict.get_learned_dict: rows over max(‖row‖, 1e-8)."""
    return matrix / matrix.norm(dim=-1).clamp(min=1e-8)[:, None]


def _check_centering(path: Path, stored: Mapping[str, Any]) -> None:
    """A TiedSAE's centering acts in predict only; one that moves the input is refused."""
    d = _tensor(path, stored, "encoder").shape[1]
    identity = {
        "center_trans": torch.zeros(d),
        "center_rot": torch.eye(d),
        "center_scale": torch.ones(d),
    }
    for name, neutral in identity.items():
        value = stored.get(name)
        if isinstance(value, Tensor) and not torch.equal(value.float(), neutral):
            raise CoactError(f"{path}: a TiedSAE with a non-trivial {name} is not supported")


def sae_from_sparse_coding(path: Path) -> Sae:
    kind, stored = read_learned_dict(path)
    encoder = _tensor(path, stored, "encoder")  # (n_feats, d)
    bias = _tensor(path, stored, "encoder_bias")
    if kind == "UntiedSAE":
        decoder = _unit_rows(_tensor(path, stored, "decoder"))
    else:
        _check_centering(path, stored)
        decoder = _unit_rows(encoder)
        if stored.get("norm_encoder", False):
            encoder = decoder
    width, d_in = encoder.shape
    found = {"W_enc": encoder.T, "b_enc": bias, "W_dec": decoder, "b_dec": torch.zeros(d_in)}
    metadata: dict[str, Any] = {"learned_dict": kind, "file": path.name}
    if match := _NAME.search(path.name):
        metadata.update(kind=match.group(1), layer=int(match.group(2)))
    options = {"activation": "relu", "subtract_decoder_bias": False, "metadata": metadata}
    return build(path, found, int(d_in), int(width), **options)
