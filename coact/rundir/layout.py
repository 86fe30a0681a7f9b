"""Where a run keeps what it shares: its SAEs, their evaluations and the code store.

A single-layer run keeps them in its own directory. The layers of a whole-model run
(`coact analyze --layers …`) share one set, kept in the model run's directory, so every
SAE is trained once and every activation is encoded in one pass; each layer's directory
names that shared directory in its config.json (`shared_dir`, relative to the layer's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coact.errors import CoactError


@dataclass(frozen=True)
class RunLayout:
    run_dir: Path
    shared_dir: Path  # holds sae/, sae_eval/ and codes/

    @property
    def codes(self) -> Path:
        return self.shared_dir / "codes"

    @property
    def sae(self) -> Path:
        return self.shared_dir / "sae"

    @property
    def sae_eval(self) -> Path:
        return self.shared_dir / "sae_eval"

    @classmethod
    def of(cls, run_dir: str | Path, config: dict[str, Any] | None = None) -> RunLayout:
        """The layout a run's config.json (or the given config) records."""
        run = Path(run_dir)
        if config is None:
            path = run / "config.json"
            config = json.loads(path.read_text()) if path.is_file() else {}
        shared = config.get("shared_dir")
        return cls(run, (run / shared) if shared else run)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """A run's config.json, or one clear error saying the directory is not a run."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CoactError(f"{run_dir} is not a run directory (no config.json); run `coact analyze`")
    return dict(json.loads(path.read_text()))
