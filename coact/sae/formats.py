"""Loading the SAE formats researchers publish, and saving ours in the SAELens one.

Every format becomes the same `Sae` module: only parameter names, layouts and the
activation rule differ. Format is detected from the files in the directory:
SAELens (`cfg.json` + `sae_weights.safetensors`), dictionary_learning (`ae.pt` +
`config.json`) and sparsify (`cfg.json` + `sae.safetensors`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from coact.errors import CoactError
from coact.sae.base import Sae
from coact.sites import Site

_TL_NAMES = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out",
             "resid_mid": "hook_resid_mid", "mlp_out": "hook_mlp_out"}  # fmt: skip


def load_sae(source: str | Path, *, device: str = "cpu") -> Sae:
    """Load an SAE from a directory or `hf://OWNER/REPO[/SUBFOLDER]`."""
    text = str(source)
    path = _download(text[len("hf://") :]) if text.startswith("hf://") else Path(text).expanduser()
    if not path.is_dir():
        raise CoactError(f"SAE directory {path} does not exist")
    if (path / "sae_weights.safetensors").is_file() and (path / "cfg.json").is_file():
        sae = _from_saelens(path)
    elif (path / "ae.pt").is_file() and (path / "config.json").is_file():
        sae = _from_dictionary_learning(path)
    elif (path / "sae.safetensors").is_file() and (path / "cfg.json").is_file():
        sae = _from_sparsify(path)
    else:
        raise CoactError(
            f"no SAE found in {path}: expected cfg.json + sae_weights.safetensors (SAELens), "
            "ae.pt + config.json (dictionary_learning) or cfg.json + sae.safetensors (sparsify)"
        )
    sae.metadata.setdefault("source", text)
    return sae.to(device).eval().requires_grad_(False)


def _download(reference: str) -> Path:
    parts = reference.strip("/").split("/")
    if len(parts) < 2:
        raise CoactError(f"hf://{reference} is not hf://OWNER/REPO[/SUBFOLDER]")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as error:  # offline, unknown repo, gated: all mean "cannot get it"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CoactError(
            f"cannot download SAE repo {repo!r} from the Hugging Face hub ({first}); "
            "pass a local directory instead"
        ) from None
    return Path(root) / sub


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CoactError(f"cannot read SAE config {path}: {error}") from None
    if not isinstance(data, dict):
        raise CoactError(f"SAE config {path} is not a JSON object")
    return data


def _tensors(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".pt":
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state = load_file(str(path))
    except Exception as error:  # corrupt or truncated weights
        raise CoactError(f"cannot read SAE weights {path}: {error}") from None
    if not isinstance(state, Mapping):
        raise CoactError(f"SAE weights {path} are not a state dict")
    return {k: v.float() for k, v in state.items()}


def _site(hook: Any) -> str | None:
    if not isinstance(hook, str) or not hook:
        return None
    try:
        return str(Site.parse(hook))
    except CoactError:
        return None


def _build(where: Path, weights: dict[str, Tensor], d_in: int, width: int, **options: Any) -> Sae:
    """Check shapes against the config and copy (W_enc, b_enc, W_dec, b_dec, threshold) in."""
    sae = Sae(d_in, width, **options)
    expected = {"W_enc": (d_in, width), "b_enc": (width,), "W_dec": (width, d_in), "b_dec": (d_in,),
                "threshold": (width,)}  # fmt: skip
    for name, tensor in weights.items():
        if tuple(tensor.shape) != expected[name]:
            raise CoactError(
                f"{where}: {name} has shape {tuple(tensor.shape)} but the config says "
                f"{expected[name]} (d_in={d_in}, width={width})"
            )
        getattr(sae, name).data.copy_(tensor)
    return sae


def _need(where: Path, weights: Mapping[str, Tensor], *names: str) -> list[Tensor]:
    missing = [n for n in names if n not in weights]
    if missing:
        raise CoactError(f"{where}: missing tensors {missing}; found {sorted(weights)}")
    return [weights[n] for n in names]


def _from_saelens(path: Path) -> Sae:
    cfg = _json(path / "cfg.json")
    weights = _tensors(path / "sae_weights.safetensors")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise CoactError(f"{path}: normalize_activations={norm!r} is not supported")
    arch = cfg.get("architecture") or cfg.get("metadata", {}).get("architecture") or "standard"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", kwargs.get("k"))
    w_enc, b_enc, w_dec, b_dec = _need(path, weights, "W_enc", "b_enc", "W_dec", "b_dec")
    found = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    if arch == "jumprelu":
        if "log_threshold" in weights:
            found["threshold"] = weights["log_threshold"].exp()
        else:
            found["threshold"] = _need(path, weights, "threshold")[0]
    elif arch not in ("standard", "topk"):
        raise CoactError(f"{path}: SAELens architecture {arch!r} is not supported")
    if arch == "topk" and k is None:
        raise CoactError(f"{path}: a topk SAE needs k in cfg.json")
    hook = cfg.get("hook_name") or cfg.get("metadata", {}).get("hook_name")
    return _build(
        path,
        found,
        int(cfg.get("d_in", w_enc.shape[0])),
        int(cfg.get("d_sae", w_enc.shape[1])),
        activation={"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch],
        k=int(k) if arch == "topk" and k is not None else None,
        subtract_decoder_bias=bool(cfg.get("apply_b_dec_to_input", True)),
        site=cfg.get("coact_site") or _site(hook),
        metadata={**cfg.get("coact_metadata", {}), "format": "saelens", "hook_name": hook},
    )


def _from_dictionary_learning(path: Path) -> Sae:
    trainer = _json(path / "config.json").get("trainer", {})
    weights = _tensors(path / "ae.pt")
    kind = trainer.get("dict_class", "AutoEncoder")
    site = _site(trainer.get("submodule_name"))
    meta = {"format": "dictionary_learning", "dict_class": kind, "layer": trainer.get("layer")}
    if kind == "AutoEncoder":
        enc_w, enc_b, dec_w, bias = _need(path, weights, "encoder.weight", "encoder.bias",
                                          "decoder.weight", "bias")  # fmt: skip
        found = {"W_enc": enc_w.T, "b_enc": enc_b, "W_dec": dec_w.T, "b_dec": bias}
        return _build(path, found, enc_w.shape[1], enc_w.shape[0], activation="relu",
                      site=site, metadata=meta)  # fmt: skip
    if kind in ("AutoEncoderTopK", "BatchTopKSAE"):
        enc_w, enc_b, dec_w, b_dec = _need(path, weights, "encoder.weight", "encoder.bias",
                                           "decoder.weight", "b_dec")  # fmt: skip
        found = {"W_enc": enc_w.T, "b_enc": enc_b, "W_dec": dec_w.T, "b_dec": b_dec}
        k = int(trainer["k"]) if "k" in trainer else int(weights.get("k", torch.tensor(0)).item())
        threshold = float(weights.get("threshold", torch.tensor(-1.0)).max().item())
        if kind == "BatchTopKSAE" and threshold >= 0:  # its inference rule is a threshold
            found["threshold"] = torch.full((enc_w.shape[0],), threshold)
            return _build(path, found, enc_w.shape[1], enc_w.shape[0], activation="jumprelu",
                          site=site, metadata=meta)  # fmt: skip
        return _build(path, found, enc_w.shape[1], enc_w.shape[0], activation="topk", k=k,
                      site=site, metadata=meta)  # fmt: skip
    if kind == "JumpReluAutoEncoder":
        w_enc, b_enc, w_dec, b_dec, thr = _need(path, weights, "W_enc", "b_enc", "W_dec",
                                                "b_dec", "threshold")  # fmt: skip
        # Its codes are scaled by ‖W_dec row‖ and unscaled in decode; fold that in.
        norms = w_dec.norm(dim=1).clamp_min(1e-12)
        found = {"W_enc": w_enc * norms, "b_enc": b_enc * norms, "W_dec": w_dec / norms[:, None],
                 "b_dec": b_dec, "threshold": thr * norms}  # fmt: skip
        return _build(path, found, w_enc.shape[0], w_enc.shape[1], activation="jumprelu",
                      subtract_decoder_bias=False, site=site, metadata=meta)  # fmt: skip
    raise CoactError(f"{path}: dictionary_learning class {kind!r} is not supported")


def _from_sparsify(path: Path) -> Sae:
    cfg = _json(path / "cfg.json")
    weights = _tensors(path / "sae.safetensors")
    if cfg.get("skip_connection") or "W_skip" in weights:
        raise CoactError(f"{path}: sparsify SAEs with a skip connection are not supported")
    enc_w, enc_b, w_dec, b_dec = _need(path, weights, "encoder.weight", "encoder.bias",
                                       "W_dec", "b_dec")  # fmt: skip
    if "k" not in cfg:
        raise CoactError(f"{path}: cfg.json has no k")
    found = {"W_enc": enc_w.T, "b_enc": enc_b, "W_dec": w_dec, "b_dec": b_dec}
    d_in = int(cfg.get("d_in", enc_w.shape[1]))
    width = int(cfg.get("num_latents") or cfg.get("expansion_factor", 0) * d_in or enc_w.shape[0])
    return _build(path, found, d_in, width, activation="topk", k=int(cfg["k"]),
                  metadata={"format": "sparsify"})  # fmt: skip


def save_saelens(
    sae: Sae, directory: str | Path, *, extra_cfg: dict[str, Any] | None = None
) -> Path:
    """Write cfg.json + sae_weights.safetensors atomically (a temp dir renamed into place)."""
    directory = Path(directory)
    hook = None
    if sae.site is not None:
        site = Site.parse(sae.site)
        hook = f"blocks.{site.layer}.{_TL_NAMES.get(site.kind, site.kind)}"
    arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[sae.activation]
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.width,
        "apply_b_dec_to_input": sae.subtract_decoder_bias,
        "hook_name": hook,
        "coact_site": sae.site,
        "dtype": "float32",
        "normalize_activations": "none",
        "coact_metadata": sae.metadata,
        **(extra_cfg or {}),
    }
    if sae.k is not None:
        cfg["k"] = sae.k
        cfg["activation_fn_kwargs"] = {"k": sae.k}
    tensors = {n: getattr(sae, n).detach().to("cpu", torch.float32).contiguous()
               for n in ("W_enc", "b_enc", "W_dec", "b_dec")}  # fmt: skip
    if sae.activation == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().cpu().float().contiguous()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        save_file(tensors, str(staging / "sae_weights.safetensors"))
        (staging / "cfg.json").write_text(json.dumps(cfg, indent=2, default=str))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
