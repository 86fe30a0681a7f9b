"""EleutherAI sparsify's format: `cfg.json` + `sae.safetensors` in a folder named after the
hookpoint, for SAEs and for (skip) transcoders alike.

`SparsifyCoder` holds a file's config and tensors as stored, and runs its forward as
sparsify's `SparseCoder` does; `read_sparsify` / `save_sparsify` read and write it, so the
transcoder trainer and the loaders share one definition. An SAE (no `transcode`, no skip
path) also becomes a `Sae` through `load_sae`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from coact.errors import CoactError
from coact.sae import hub
from coact.sae.base import Sae
from coact.sae.formats.common import build, pick, read_json, read_tensors, replace_directory
from coact.sae.formats.common import site_of as _site_of

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae.safetensors"
# SparseCoderConfig's fields, as SparseCoder.save_to_disk writes them (plus d_in)
_CFG_FIELDS = ("activation", "expansion_factor", "normalize_decoder", "num_latents", "k")
_CFG_FLAGS = ("multi_topk", "skip_connection", "transcode")


@dataclass(frozen=True)
class SparsifyCoder:
    """A sparsify SparseCoder: encoder.weight (latents, d_in), encoder.bias (latents),
    W_dec (latents, d_in), b_dec (d_in) and, with a skip connection, W_skip (d_in, d_in).

    A transcoder (`transcode`) reads one site and writes another, so its encoder does not
    subtract b_dec; its output is W_decᵀ codes + b_dec (+ W_skip x)."""

    encoder_weight: Tensor
    encoder_bias: Tensor
    W_dec: Tensor
    b_dec: Tensor
    k: int
    W_skip: Tensor | None = None
    transcode: bool = False
    activation: str = "topk"
    normalize_decoder: bool = True
    expansion_factor: int = 32
    multi_topk: bool = False
    hookpoint: str | None = None  # the folder name: "layers.3.mlp", ...
    extra_cfg: dict[str, Any] = field(default_factory=dict)  # other cfg.json fields, kept

    @property
    def d_in(self) -> int:
        return int(self.encoder_weight.shape[1])

    @property
    def num_latents(self) -> int:
        return int(self.encoder_weight.shape[0])

    @property
    def skip_connection(self) -> bool:
        return self.W_skip is not None

    def encode(self, x: Tensor) -> Tensor:
        """Full-width codes: ReLU of the pre-activations, the top k kept (sparsify's
        fused_encoder for activation "topk")."""
        if not self.transcode:
            x = x - self.b_dec
        pre = torch.relu(x @ self.encoder_weight.T + self.encoder_bias)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def decode(self, codes: Tensor) -> Tensor:
        return codes @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """What SparseCoder.forward returns as sae_out: decoded codes plus the skip path."""
        out = self.decode(self.encode(x))
        if self.W_skip is not None:
            out = out + x @ self.W_skip.T
        return out

    def cfg(self) -> dict[str, Any]:
        """cfg.json as SparseCoder.save_to_disk writes it: the config's fields and d_in."""
        return {
            **self.extra_cfg,
            "activation": self.activation,
            "expansion_factor": self.expansion_factor,
            "normalize_decoder": self.normalize_decoder,
            "num_latents": self.num_latents,
            "k": self.k,
            "multi_topk": self.multi_topk,
            "skip_connection": self.skip_connection,
            "transcode": self.transcode,
            "d_in": self.d_in,
        }

    def tensors(self) -> dict[str, Tensor]:
        """The state dict sparsify's load_model expects (strict: exactly these keys)."""
        out = {
            "encoder.weight": self.encoder_weight,
            "encoder.bias": self.encoder_bias,
            "W_dec": self.W_dec,
            "b_dec": self.b_dec,
        }
        if self.W_skip is not None:
            out["W_skip"] = self.W_skip
        return {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in out.items()}


def read_sparsify(source: str | Path) -> SparsifyCoder:
    """Read a sparsify folder (SAE or transcoder), local or `hf://OWNER/REPO/HOOKPOINT`,
    into a `SparsifyCoder`, shapes checked."""
    path = hub.fetch(str(source)) if hub.is_hub_id(source) else Path(source).expanduser()
    cfg_file, weights_file = path / CFG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights_file.is_file():
        raise CoactError(f"{path} is not a sparsify folder: it needs {CFG_FILE} and {WEIGHTS_FILE}")
    cfg = read_json(cfg_file)
    weights = read_tensors(weights_file)
    if cfg.get("activation", "topk") != "topk":
        raise CoactError(f"{cfg_file}: sparsify activation {cfg['activation']!r} is unsupported")
    skip = bool(cfg.get("skip_connection")) or "W_skip" in weights
    names = ("encoder.weight", "encoder.bias", "W_dec", "b_dec", *(("W_skip",) if skip else ()))
    found = pick(weights_file, weights, *names)
    try:
        d_in, k = int(cfg["d_in"]), int(cfg["k"])
        width = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    except KeyError as error:
        raise CoactError(f"{cfg_file}: the sparsify config has no field {error}") from None
    except (TypeError, ValueError) as error:
        raise CoactError(f"{cfg_file}: malformed sparsify config ({error})") from None
    want = {"encoder.weight": (width, d_in), "encoder.bias": (width,), "W_dec": (width, d_in)}
    want |= {"b_dec": (d_in,), "W_skip": (d_in, d_in)}
    for name, tensor in found.items():
        if tuple(tensor.shape) != want[name]:
            raise CoactError(
                f"{weights_file}: {name} has shape {tuple(tensor.shape)} but the config says "
                f"{want[name]} (d_in={d_in}, num_latents={width})"
            )
    if not 0 < k <= width:
        raise CoactError(f"{cfg_file}: k={k} must be in 1..{width}")
    known = {*_CFG_FIELDS, *_CFG_FLAGS, "d_in"}
    return SparsifyCoder(
        encoder_weight=found["encoder.weight"],
        encoder_bias=found["encoder.bias"],
        W_dec=found["W_dec"],
        b_dec=found["b_dec"],
        W_skip=found.get("W_skip"),
        k=k,
        transcode=bool(cfg.get("transcode", False)),
        normalize_decoder=bool(cfg.get("normalize_decoder", True)),
        expansion_factor=int(cfg.get("expansion_factor", 32)),
        multi_topk=bool(cfg.get("multi_topk", False)),
        hookpoint=path.name,
        extra_cfg={n: v for n, v in cfg.items() if n not in known},
    )


def save_sparsify(coder: SparsifyCoder, directory: str | Path) -> Path:
    """Write `coder` as SparseCoder.save_to_disk does (atomically: old folder or new one).
    The folder's name is the hookpoint sparsify's loaders look for."""

    def write(staging: Path) -> None:
        save_file(coder.tensors(), str(staging / WEIGHTS_FILE))
        (staging / CFG_FILE).write_text(json.dumps(coder.cfg()))

    return replace_directory(Path(directory), write)


def sae_from_sparsify(path: Path) -> Sae:
    """A sparsify SAE as a `Sae`; a transcoder or skip path is refused (it writes another
    site than it reads, which one `Sae` cannot say): read those with `read_sparsify`."""
    coder = read_sparsify(path)
    if coder.transcode or coder.skip_connection:
        what = "skip transcoder" if coder.skip_connection else "transcoder"
        raise CoactError(
            f"{path} is a sparsify {what} (a skip connection W_skip / transcode), not an SAE: "
            "read it with coact.sae.formats.read_sparsify"
        )
    found = {
        "W_enc": coder.encoder_weight.T,
        "b_enc": coder.encoder_bias,
        "W_dec": coder.W_dec,
        "b_dec": coder.b_dec,
    }
    options = {"k": coder.k, "site": _site_of(path.name), "metadata": {"hookpoint": path.name}}
    weights_file = path / WEIGHTS_FILE
    return build(weights_file, found, coder.d_in, coder.num_latents, activation="topk", **options)
