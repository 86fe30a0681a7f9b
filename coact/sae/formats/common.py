"""What every format loader shares: reading JSON and tensors safely, checking shapes, site
names from hook / submodule / hookpoint names, and replacing a directory atomically."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from coact.errors import CoactError
from coact.models.sites import Site
from coact.sae.base import Sae

# dictionary_learning submodule names ("resid_post_layer_3") and sparsify hookpoints
# ("layers.3" is a block's output, "layers.3.mlp" its MLP's).
# ("mlp_out_layer1", "resid_out_layer2" in the 10_32768 Pythia set of saprmarks).
_DL_SUBMODULE = re.compile(
    r"^(resid_pre|resid_mid|resid_post|resid_out|resid|attn_out|mlp_out)_layer_?(\d+)$"
)
_HOOKPOINT = re.compile(r"^(?:.+\.)?(?:layers|h)\.(\d+)(\.mlp)?$")


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CoactError(f"cannot read SAE config {path}: {error}") from None
    if not isinstance(data, dict):
        raise CoactError(f"SAE config {path} is not a JSON object")
    return data


def read_tensors(path: Path) -> dict[str, Tensor]:
    """A state dict from safetensors or a `.pt` file; `.pt` files are unpickled with
    `weights_only=True`, so a file holding anything but tensors is refused, never run."""
    try:
        if path.suffix == ".pt":
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state = load_file(str(path))
    except Exception as error:  # corrupt, truncated or pickled with more than tensors
        raise CoactError(f"cannot read SAE weights {path}: {first_line(error)}") from None
    if not isinstance(state, Mapping):
        raise CoactError(f"SAE weights {path} are not a state dict")
    return {k: v.float() for k, v in state.items() if isinstance(v, Tensor)}


def pick(path: Path, weights: Mapping[str, Tensor], *names: str) -> dict[str, Tensor]:
    missing = [n for n in names if n not in weights]
    if missing:
        raise CoactError(f"{path}: missing tensors {missing}; it holds {sorted(weights)}")
    return {n: weights[n] for n in names}


def tensor_names(activation: str) -> tuple[str, ...]:
    """The SAELens tensor names a rule needs (JumpReLU also has its thresholds)."""
    extra = ("threshold",) if activation == "jumprelu" else ()
    return ("W_enc", "b_enc", "W_dec", "b_dec", *extra)


def site_of(name: object) -> str | None:
    """Our site for a hook / submodule / hookpoint name; None when it names none we know."""
    if not isinstance(name, str) or not name:
        return None
    if match := _DL_SUBMODULE.match(name):
        kind, layer = match.group(1), int(match.group(2))
        post = kind in ("resid_post", "resid_out", "resid")  # block N's output
        name = f"resid_pre[{layer + 1}]" if post else f"{kind}[{layer}]"
    elif match := _HOOKPOINT.match(name):
        layer = int(match.group(1))
        name = f"mlp_out[{layer}]" if match.group(2) else f"resid_pre[{layer + 1}]"
    try:
        return str(Site.parse(name))
    except CoactError:
        return None


def build(path: Path, found: dict[str, Tensor], d_in: int, width: int, **options: Any) -> Sae:
    """Check every tensor against the config's shape, then copy it into a fresh `Sae`."""
    sae = Sae(d_in, width, **options)
    for name, tensor in found.items():
        want = tuple(getattr(sae, name).shape)
        if tuple(tensor.shape) != want:
            raise CoactError(
                f"{path}: {name} has shape {tuple(tensor.shape)} but the config says {want} "
                f"(d_in={d_in}, width={width})"
            )
        getattr(sae, name).data.copy_(tensor)
    return sae


def fold_decoder_norms(sae: Sae, norms: Tensor) -> None:
    """Scale each latent's encoder column and bias by its decoder norm and divide the
    decoder row by it: codes come out × norm, reconstructions are unchanged."""
    with torch.no_grad():
        sae.W_enc.mul_(norms[None, :])
        sae.b_enc.mul_(norms)
        sae.W_dec.div_(norms[:, None])


def replace_directory(directory: Path, write: Callable[[Path], None]) -> Path:
    """Fill a sibling temp directory with `write`, then rename it over `directory`, so a
    failure leaves either the old directory or the new one, never a half-written mix."""
    if directory.exists() and not directory.is_dir():
        raise CoactError(f"cannot save the SAE to {directory}: it exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent)
    )
    old = staging.with_suffix(".old")
    try:
        write(staging)
        staging.chmod(0o755)
        if directory.exists():
            os.replace(directory, old)
        try:
            os.replace(staging, directory)
        except BaseException:
            if old.exists():
                os.replace(old, directory)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return directory
