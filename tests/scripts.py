"""analyses/ scripts imported as modules, for the tests of their reusable parts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


def analyses_script(name: str) -> ModuleType:
    """analyses/<name>.py as a module (analyses/ is a folder of scripts, not a package),
    registered in sys.modules: typed results resolve their annotations through it."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ANALYSES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
