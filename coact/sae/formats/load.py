"""`load_sae`: any published SAE, from a directory, a `.pt` file or an hf:// id, as one `Sae`.

The format is told by the files: SAELens (`cfg.json` + `sae_weights.safetensors`),
dictionary_learning (`ae.pt` + `config.json`), sparsify (`cfg.json` + `sae.safetensors`),
or a single `.pt` file of the seed study's sparse_coding SAEs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from coact.errors import CoactError
from coact.sae import hub
from coact.sae.base import Sae
from coact.sae.formats.dictionary_learning import sae_from_dictionary_learning
from coact.sae.formats.saelens import sae_from_saelens
from coact.sae.formats.sparse_coding import sae_from_sparse_coding
from coact.sae.formats.sparsify import sae_from_sparsify

Loader = Callable[[Path], Sae]


def detect(path: Path) -> tuple[str, Loader]:
    """The format of `path` and its loader, from the files it holds."""
    if path.is_file() and path.suffix == ".pt":
        return "sparse_coding", sae_from_sparse_coding
    if not path.is_dir():
        raise CoactError(f"SAE directory {path} does not exist")
    files = {p.name for p in path.iterdir()}
    if {"cfg.json", "sae_weights.safetensors"} <= files:
        return "saelens", sae_from_saelens
    if {"ae.pt", "config.json"} <= files:
        return "dictionary_learning", sae_from_dictionary_learning
    if {"cfg.json", "sae.safetensors"} <= files:
        return "sparsify", sae_from_sparsify
    raise CoactError(
        f"no SAE found in {path}: expected cfg.json + sae_weights.safetensors (SAELens), "
        "ae.pt + config.json (dictionary_learning), cfg.json + sae.safetensors (sparsify) "
        "or a sparse_coding .pt file"
    )


def load_sae(source: str | Path, *, device: str = "cpu") -> Sae:
    """Load an SAE from a directory, a `.pt` file or `hf://OWNER/REPO[/SUBFOLDER]`."""
    text = str(source)
    path = hub.fetch(text) if hub.is_hub_id(text) else Path(text).expanduser()
    fmt, loader = detect(path)
    try:
        sae = loader(path)
    except KeyError as error:
        raise CoactError(f"{path}: the {fmt} config has no field {error}") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise CoactError(f"{path}: malformed {fmt} SAE config ({error})") from None
    sae.metadata.update(format=fmt, source=text)
    return sae.to(device).eval().requires_grad_(False)
