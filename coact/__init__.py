"""coact: how the SAE features a transformer block reads turn into the features it writes."""

from __future__ import annotations

import importlib
from typing import Any

from coact.errors import CoactError

__version__ = "0.1.0"
_API = {
    "AnalyzeConfig",
    "CodeStore",
    "Site",
    "analyze",
    "collect",
    "load_model",
    "load_sae",
    "train_sae",
}
__all__ = ["CoactError", *sorted(_API)]


def __getattr__(name: str) -> Any:
    """Import the API on first use, so `coact --help` and light imports stay fast."""
    if name in _API:
        return getattr(importlib.import_module("coact.api"), name)
    raise AttributeError(f"module 'coact' has no attribute {name!r}")
