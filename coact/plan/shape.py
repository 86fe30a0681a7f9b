"""A model's shape from its config alone: the embedded default's cached config (or the
copy kept here), a tiny test model's, a local directory's config.json or a hub id's from
the local cache. The model is built on the meta device, so no weights load and its
parameter counts are exact."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from coact.errors import CoactError
from coact.models.adapters import adapter_for, resolve
from coact.models.load import EMBEDDED, TINY_MODELS, cache_dir, tiny_model

# SmolLM2-135M-Instruct's config (what the converted copy's config.json says), for plans
# made before the model was ever fetched
SMOLLM2_CONFIG: dict[str, Any] = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: sizes and parameter counts."""

    name: str
    n_layers: int
    d_model: int
    vocab: int
    block_params: int  # parameters of one block
    params: int  # all parameters (tied embeddings counted once)
    embed_params: int  # the token embedding (and an untied LM head's, when there is one)
    head_params: int  # parameters the logits cost per token (the LM head's matrix)
    parallel: bool  # parallel residual: mlp_resid is resid_pre


def _config(spec: str) -> PretrainedConfig:
    if spec in ("embedded", EMBEDDED):
        cached = cache_dir() / "models" / "smollm2-135m-instruct" / "config.json"
        if cached.is_file():
            return AutoConfig.from_pretrained(str(cached.parent))
        return LlamaConfig(**SMOLLM2_CONFIG)
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise CoactError(f"model directory {spec!r} has no config.json")
        return AutoConfig.from_pretrained(str(path))
    if spec.count("/") != 1:
        raise CoactError(
            f"unknown model {spec!r}: use {EMBEDDED!r}, one of {', '.join(TINY_MODELS)}, "
            "a local directory, or a Hugging Face id"
        )
    try:
        return AutoConfig.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError):
        raise CoactError(
            f"no config for {spec!r} in the local Hugging Face cache: fetch the model once "
            "(or pass its local directory) to plan a run of it"
        ) from None


@functools.cache
def reference_shape() -> ModelShape:
    """SmolLM2-135M's shape from the config kept here: the rates' reference model."""
    return _shape("smollm2-135m", LlamaConfig(**SMOLLM2_CONFIG))


@functools.cache
def model_shape(spec: str) -> ModelShape:
    """The shape of model `spec`, read from its config; no weights are loaded."""
    return _shape(spec, None if spec in TINY_MODELS else _config(spec))


def _shape(spec: str, config: PretrainedConfig | None) -> ModelShape:
    with torch.device("meta"):
        model = tiny_model(spec) if config is None else AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(model)
    block = resolve(model, adapter.block(0))
    embed: torch.Tensor = model.get_input_embeddings().weight  # type: ignore[assignment]
    head_module = model.get_output_embeddings()
    head: torch.Tensor = embed if head_module is None else head_module.weight
    embed_params = embed.numel() * (1 if head is embed else 2)
    return ModelShape(
        name=spec,
        n_layers=adapter.n_layers,
        d_model=adapter.d_model,
        vocab=int(embed.shape[0]),
        block_params=sum(p.numel() for p in block.parameters()),
        params=sum(p.numel() for p in model.parameters()),
        embed_params=embed_params,
        head_params=head.numel(),
        parallel=adapter.parallel,
    )
