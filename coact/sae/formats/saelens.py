"""SAELens's format: `cfg.json` + `sae_weights.safetensors`, read in every layout SAELens
has written (6.x `metadata`, 6.0 rc `meta`, 5.x and older) and written in the 6.x one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from coact.errors import CoactError
from coact.models.sites import Site
from coact.sae.base import Sae
from coact.sae.formats.common import (
    build,
    fold_decoder_norms,
    pick,
    read_json,
    read_tensors,
    replace_directory,
    site_of,
    tensor_names,
)

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
RULES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
# The config layout coact writes: SAELens reads a file without sae_lens_version as pre-6.0
# and rebuilds its config, dropping `metadata`.
SAELENS_VERSION = "6.0.0"
# Site kind -> TransformerLens hook suffix (Site.parse reads these back); else hook_KIND.
_TL_SUFFIX = {"mlp_in": "ln2.hook_normalized"}
RESCALE_NOTE = "rescale_acts_by_decoder_norm folded: W_enc, b_enc × ‖W_dec‖ and W_dec ÷ ‖W_dec‖"


def _architecture(cfg: dict[str, Any], meta: dict[str, Any], cfg_file: Path) -> str:
    arch = cfg.get("architecture") or meta.get("architecture") or "standard"
    rule = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    if arch == "standard" and rule == "topk":  # how SAELens < 6 wrote TopK SAEs
        return "topk"
    if arch not in RULES or rule not in ("relu", "topk"):
        raise CoactError(
            f"{cfg_file}: SAELens architecture {arch!r} with activation {rule!r} is not "
            f"supported (supported: {', '.join(RULES)})"
        )
    return arch


def sae_from_saelens(path: Path) -> Sae:
    cfg_file, weights_file = path / CFG_FILE, path / WEIGHTS_FILE
    cfg = read_json(cfg_file)
    meta = {**(cfg.get("meta") or {}), **(cfg.get("metadata") or {})}  # SAELens >= 6
    norm = cfg.get("normalize_activations")
    if norm not in (None, False, "none"):  # SAELens < 6 wrote True for expected_average_only_in
        raise CoactError(
            f"{cfg_file}: normalize_activations={norm!r} is not supported (only 'none'); "
            "fold the normalisation into the weights first"
        )
    arch = _architecture(cfg, meta, cfg_file)
    weights = read_tensors(weights_file)
    scale = weights.get("scaling_factor", weights.get("finetuning_scaling_factor"))
    if scale is not None and not bool((scale == 1).all()):
        raise CoactError(f"{weights_file}: a finetuning scaling factor is not supported")
    if arch == "jumprelu" and "threshold" not in weights and "log_threshold" in weights:
        weights["threshold"] = weights["log_threshold"].exp()  # a training checkpoint
    found = pick(weights_file, weights, *tensor_names(RULES[arch]))
    k = cfg.get("k", meta.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k")))
    hook = cfg.get("hook_name") or cfg.get("hook_point") or meta.get("hook_name")
    options = {
        "activation": RULES[arch],
        "k": int(k) if arch == "topk" and k is not None else None,
        "subtract_decoder_bias": bool(cfg.get("apply_b_dec_to_input", True)),
        "site": str(Site.parse(cfg["coact_site"])) if cfg.get("coact_site") else site_of(hook),
        "metadata": {**meta, "hook_name": hook},
    }
    sae = build(weights_file, found, int(cfg["d_in"]), int(cfg["d_sae"]), **options)
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # TopKSAE.encode ranks hidden_pre × ‖W_dec‖ and decode divides the codes by it:
        # folding the norms gives the same codes and reconstructions from a plain Sae.
        fold_decoder_norms(sae, sae.W_dec.norm(dim=-1))
        sae.metadata["decoder_norms"] = RESCALE_NOTE
    return sae


def hook_name(site: str, mlp_resid_kind: str | None = None) -> str | None:
    """The TransformerLens hook of `site`. `mlp_resid[ℓ]` is no hook of its own: it is
    hook_resid_pre in parallel models and hook_resid_mid in sequential ones, so it needs
    `mlp_resid_kind`; without it there is no honest answer (None)."""
    parsed = Site.parse(site)
    kind: str = parsed.kind
    if kind == "mlp_resid":
        if mlp_resid_kind not in ("resid_pre", "resid_mid"):
            return None
        kind = mlp_resid_kind
    return f"blocks.{parsed.layer}.{_TL_SUFFIX.get(kind, f'hook_{kind}')}"


def saelens_cfg(sae: Sae, mlp_resid_kind: str | None = None) -> dict[str, Any]:
    """cfg.json in SAELens 6's layout; coact's own site name stays in `coact_site`."""
    kind = mlp_resid_kind or sae.metadata.get("mlp_resid_kind")
    hook = hook_name(sae.site, kind) if sae.site is not None else None
    metadata = {**sae.metadata, "sae_lens_version": SAELENS_VERSION}
    if hook is not None:
        metadata["hook_name"] = hook
    cfg: dict[str, Any] = {
        "architecture": {v: k for k, v in RULES.items()}[sae.activation],
        "d_in": sae.d_in,
        "d_sae": sae.width,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.subtract_decoder_bias,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "coact_site": sae.site,
        "metadata": metadata,
    }
    if hook is not None:  # SAELens < 6 configs must not hold hook_name: null
        cfg["hook_name"] = hook
    if sae.activation == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = False
        cfg["activation_fn_kwargs"] = {"k": sae.k}
    return cfg


def save_saelens(
    sae: Sae,
    directory: str | Path,
    *,
    extra_cfg: dict[str, Any] | None = None,
    mlp_resid_kind: str | None = None,
) -> Path:
    """Write cfg.json + sae_weights.safetensors so SAELens (and `load_sae`) can read it.

    `mlp_resid_kind` ("resid_pre" for parallel models, "resid_mid" for sequential ones,
    else read from `sae.metadata["mlp_resid_kind"]`) names the hook of an mlp_resid SAE.
    Written into a sibling temp directory and renamed over `directory`, so a failure
    leaves either the old directory or the new one, never a half-written mix.
    """
    cfg = saelens_cfg(sae, mlp_resid_kind) | (extra_cfg or {})
    tensors = {
        n: getattr(sae, n).detach().to("cpu", torch.float32).contiguous()
        for n in tensor_names(sae.activation)
    }

    def write(staging: Path) -> None:
        save_file(tensors, str(staging / WEIGHTS_FILE))
        (staging / CFG_FILE).write_text(json.dumps(cfg, indent=2, default=str))

    return replace_directory(Path(directory), write)
