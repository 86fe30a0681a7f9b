"""Loading the SAE formats researchers publish, and saving ours in the SAELens one.

Every format becomes the same `Sae` module, since only parameter names, layouts and the
activation rule differ. The format is detected from the files in the directory:
SAELens (`cfg.json` + `sae_weights.safetensors`), dictionary_learning (`ae.pt` +
`config.json`) and sparsify (`cfg.json` + `sae.safetensors`). Weights are taken as
stored (no decoder-norm folding), so codes are the ones the library's own forward gives.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from coact.errors import CoactError
from coact.models.sites import Site
from coact.sae.base import Sae

_SAELENS_RULES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
_DL_CLASSES = ("AutoEncoder", "AutoEncoderTopK", "JumpReluAutoEncoder", "BatchTopKSAE")
# Site kind -> TransformerLens hook suffix (Site.parse reads these back); else hook_KIND.
_TL_SUFFIX = {"mlp_in": "ln2.hook_normalized", "mlp_resid": "mlp_resid"}
# dictionary_learning submodule names ("resid_post_layer_3") and sparsify hookpoints
# ("layers.3" is a block's output, "layers.3.mlp" its MLP's).
_DL_SUBMODULE = re.compile(r"^(resid_pre|resid_mid|resid_post|attn_out|mlp_out)_layer_(\d+)$")
_HOOKPOINT = re.compile(r"^(?:.+\.)?(?:layers|h)\.(\d+)(\.mlp)?$")


def load_sae(source: str | Path, *, device: str = "cpu") -> Sae:
    """Load an SAE from a directory or `hf://OWNER/REPO[/SUBFOLDER]` as one `Sae`."""
    text = str(source)
    path = _download(text[len("hf://") :]) if text.startswith("hf://") else Path(text).expanduser()
    if not path.is_dir():
        raise CoactError(f"SAE directory {path} does not exist")
    files = {p.name for p in path.iterdir()}
    if {"cfg.json", "sae_weights.safetensors"} <= files:
        fmt, loader = "saelens", _from_saelens
    elif {"ae.pt", "config.json"} <= files:
        fmt, loader = "dictionary_learning", _from_dictionary_learning
    elif {"cfg.json", "sae.safetensors"} <= files:
        fmt, loader = "sparsify", _from_sparsify
    else:
        raise CoactError(
            f"no SAE found in {path}: expected cfg.json + sae_weights.safetensors (SAELens), "
            "ae.pt + config.json (dictionary_learning) or cfg.json + sae.safetensors (sparsify)"
        )
    try:
        sae = loader(path)
    except KeyError as error:
        raise CoactError(f"{path}: the {fmt} config has no field {error}") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise CoactError(f"{path}: malformed {fmt} SAE config ({error})") from None
    sae.metadata.update(format=fmt, source=text)
    return sae.to(device).eval().requires_grad_(False)


def _download(reference: str) -> Path:
    parts = reference.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise CoactError(f"hf://{reference} is not of the form hf://OWNER/REPO[/SUBFOLDER]")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as error:  # offline, unknown repo, gated: all mean "cannot get it"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CoactError(
            f"cannot download SAE repo {repo!r} from the Hugging Face hub ({first}); "
            "download it yourself and pass the local directory instead"
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
    except Exception as error:  # corrupt, truncated or pickled with more than tensors
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CoactError(f"cannot read SAE weights {path}: {first}") from None
    if not isinstance(state, Mapping):
        raise CoactError(f"SAE weights {path} are not a state dict")
    return {k: v.float() for k, v in state.items() if isinstance(v, Tensor)}


def _pick(path: Path, weights: Mapping[str, Tensor], *names: str) -> dict[str, Tensor]:
    missing = [n for n in names if n not in weights]
    if missing:
        raise CoactError(f"{path}: missing tensors {missing}; it holds {sorted(weights)}")
    return {n: weights[n] for n in names}


def _names(activation: str) -> tuple[str, ...]:
    """The SAELens tensor names a rule needs (JumpReLU also has its thresholds)."""
    extra = ("threshold",) if activation == "jumprelu" else ()
    return ("W_enc", "b_enc", "W_dec", "b_dec", *extra)


def _site(name: object) -> str | None:
    """Our site for a hook / submodule / hookpoint name; None when it names none we know."""
    if not isinstance(name, str) or not name:
        return None
    if match := _DL_SUBMODULE.match(name):
        kind, layer = match.group(1), int(match.group(2))
        name = f"resid_pre[{layer + 1}]" if kind == "resid_post" else f"{kind}[{layer}]"
    elif match := _HOOKPOINT.match(name):
        layer = int(match.group(1))
        name = f"mlp_out[{layer}]" if match.group(2) else f"resid_pre[{layer + 1}]"
    try:
        return str(Site.parse(name))
    except CoactError:
        return None


def _build(path: Path, found: dict[str, Tensor], d_in: int, width: int, **options: Any) -> Sae:
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


def _from_saelens(path: Path) -> Sae:
    cfg_file, weights_file = path / "cfg.json", path / "sae_weights.safetensors"
    cfg = _json(cfg_file)
    meta = {**(cfg.get("meta") or {}), **(cfg.get("metadata") or {})}  # SAELens >= 6
    norm = cfg.get("normalize_activations")
    if norm not in (None, False, "none"):  # SAELens < 6 wrote True for expected_average_only_in
        raise CoactError(
            f"{cfg_file}: normalize_activations={norm!r} is not supported (only 'none'); "
            "fold the normalisation into the weights first"
        )
    arch = cfg.get("architecture") or meta.get("architecture") or "standard"
    rule = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    if arch == "standard" and rule == "topk":  # how SAELens < 6 wrote TopK SAEs
        arch = "topk"
    elif arch not in _SAELENS_RULES or rule not in ("relu", "topk"):
        raise CoactError(
            f"{cfg_file}: SAELens architecture {arch!r} with activation {rule!r} is not "
            f"supported (supported: {', '.join(_SAELENS_RULES)})"
        )
    weights = _tensors(weights_file)
    scale = weights.get("scaling_factor", weights.get("finetuning_scaling_factor"))
    if scale is not None and not bool((scale == 1).all()):
        raise CoactError(f"{weights_file}: a finetuning scaling factor is not supported")
    if arch == "jumprelu" and "threshold" not in weights and "log_threshold" in weights:
        weights["threshold"] = weights["log_threshold"].exp()  # a training checkpoint
    found = _pick(weights_file, weights, *_names(_SAELENS_RULES[arch]))
    k = cfg.get("k", meta.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k")))
    hook = cfg.get("hook_name") or cfg.get("hook_point") or meta.get("hook_name")
    options = {
        "activation": _SAELENS_RULES[arch],
        "k": int(k) if arch == "topk" and k is not None else None,
        "subtract_decoder_bias": bool(cfg.get("apply_b_dec_to_input", True)),
        "site": str(Site.parse(cfg["coact_site"])) if cfg.get("coact_site") else _site(hook),
        "metadata": {**meta, "hook_name": hook},
    }
    return _build(weights_file, found, int(cfg["d_in"]), int(cfg["d_sae"]), **options)


def _from_dictionary_learning(path: Path) -> Sae:
    cfg_file, weights_file = path / "config.json", path / "ae.pt"
    trainer = _json(cfg_file)["trainer"]
    kind = trainer.get("dict_class")
    if kind not in _DL_CLASSES:
        raise CoactError(
            f"{cfg_file}: dictionary_learning class {kind!r} is not supported "
            f"(supported: {', '.join(_DL_CLASSES)})"
        )
    weights = _tensors(weights_file)
    d_in, width = int(trainer["activation_dim"]), int(trainer["dict_size"])
    options: dict[str, Any] = {"activation": "relu"}
    if kind == "JumpReluAutoEncoder":  # SAELens layout; apply_b_dec_to_input is False
        found = _pick(weights_file, weights, *_names("jumprelu"))
        options = {"activation": "jumprelu", "subtract_decoder_bias": False}
    else:  # nn.Linear layouts: encoder.weight (dict, act), decoder.weight (act, dict)
        bias = "bias" if kind == "AutoEncoder" else "b_dec"
        names = ("encoder.weight", "encoder.bias", "decoder.weight", bias)
        enc_w, enc_b, dec_w, b_dec = _pick(weights_file, weights, *names).values()
        found = {"W_enc": enc_w.T, "b_enc": enc_b, "W_dec": dec_w.T, "b_dec": b_dec}
    k = int(weights["k"]) if "k" in weights else trainer.get("k")
    if kind == "AutoEncoderTopK":
        options = {"activation": "topk", "k": int(k) if k is not None else None}
    elif kind == "BatchTopKSAE":  # at inference it keeps codes above one learned threshold
        threshold = _pick(weights_file, weights, "threshold")["threshold"]
        found["threshold"] = torch.full((width,), float(threshold.max()))
        options = {"activation": "jumprelu"}
    options["site"] = _site(trainer.get("submodule_name"))
    keep = ("layer", "submodule_name", "lm_name")
    options["metadata"] = {"dict_class": kind, "k": k, **{n: trainer.get(n) for n in keep}}
    return _build(weights_file, found, d_in, width, **options)


def _from_sparsify(path: Path) -> Sae:
    cfg_file, weights_file = path / "cfg.json", path / "sae.safetensors"
    cfg = _json(cfg_file)
    weights = _tensors(weights_file)
    if cfg.get("skip_connection") or "W_skip" in weights:
        raise CoactError(f"{path}: sparsify coders with a skip connection (W_skip) are unsupported")
    if cfg.get("transcode"):
        raise CoactError(f"{cfg_file}: sparsify transcoders are unsupported (they write elsewhere)")
    if cfg.get("activation", "topk") != "topk":
        raise CoactError(f"{cfg_file}: sparsify activation {cfg['activation']!r} is unsupported")
    names = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
    enc_w, enc_b, w_dec, b_dec = _pick(weights_file, weights, *names).values()
    d_in = int(cfg["d_in"])
    width = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    found = {"W_enc": enc_w.T, "b_enc": enc_b, "W_dec": w_dec, "b_dec": b_dec}
    options = {"k": int(cfg["k"]), "site": _site(path.name), "metadata": {"hookpoint": path.name}}
    return _build(weights_file, found, d_in, width, activation="topk", **options)


def _hook_name(site: str) -> str:
    parsed = Site.parse(site)
    return f"blocks.{parsed.layer}.{_TL_SUFFIX.get(parsed.kind, f'hook_{parsed.kind}')}"


def save_saelens(
    sae: Sae, directory: str | Path, *, extra_cfg: dict[str, Any] | None = None
) -> Path:
    """Write cfg.json + sae_weights.safetensors so SAELens (and `load_sae`) can read it.

    Written into a sibling temp directory and renamed over `directory`, so a failure
    leaves either the old directory or the new one, never a half-written mix.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CoactError(f"cannot save the SAE to {directory}: it exists and is not a directory")
    hook = _hook_name(sae.site) if sae.site is not None else None
    cfg: dict[str, Any] = {
        "architecture": {v: k for k, v in _SAELENS_RULES.items()}[sae.activation],
        "d_in": sae.d_in,
        "d_sae": sae.width,
        "dtype": "float32",
        "apply_b_dec_to_input": sae.subtract_decoder_bias,
        "normalize_activations": "none",
        "coact_site": sae.site,
        "metadata": {**sae.metadata, **({"hook_name": hook} if hook else {})},
    }
    if hook is not None:  # SAELens < 6 configs must not hold hook_name: null
        cfg["hook_name"] = hook
    if sae.activation == "topk":
        cfg["k"] = sae.k
        cfg["activation_fn_kwargs"] = {"k": sae.k}
    cfg.update(extra_cfg or {})
    tensors = {
        n: getattr(sae, n).detach().to("cpu", torch.float32).contiguous()
        for n in _names(sae.activation)
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent)
    )
    old = staging.with_suffix(".old")
    try:
        save_file(tensors, str(staging / "sae_weights.safetensors"))
        (staging / "cfg.json").write_text(json.dumps(cfg, indent=2, default=str))
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
