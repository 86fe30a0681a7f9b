"""The report's page names and the links between its pages: one place decides that output
feature j's page is `features/out-<j>`, attention feature j's `features/attn-<j>`, and how
a layer of a model run links the model report.

Links written in raw HTML point at the built `.html` files (the site is built with
`use_directory_urls: false`, so it opens from the file system); markdown links point at
the `.md` sources and are checked by `mkdocs build --strict`."""

from __future__ import annotations

import html
import os
from collections.abc import Collection
from pathlib import Path

from coact.report.embed import Figures
from coact.rundir.layout import RunLayout
from coact.rundir.read import RunData

FEATURES_DIR = "features"  # under docs/: one page per featured output or attention feature


def feature_page_name(feature: int) -> str:
    """The page of output feature j (docs/features/out-<j>.md)."""
    return f"out-{int(feature)}"


def attention_page_name(feature: int) -> str:
    """The page of attention feature j (docs/features/attn-<j>.md; output features'
    pages are out-<j>)."""
    return f"attn-{int(feature)}"


def layer_page_name(data: RunData) -> str:
    """The layer page (docs/layer-<ℓ>.md)."""
    return f"layer-{data.layer}"


def feature_link(j: int, pages: Collection[int], prefix: str = "features/") -> str:
    """'out j', linked to its page (HTML) where it has one; `prefix` leads to the pages."""
    name = f"out {j}"
    if j not in pages:
        return name
    return f'<a href="{prefix}{feature_page_name(j)}.html">{name}</a>'


def attention_link(fig: Figures, j: int, text: str) -> str:
    """`text` linked to attention feature j's page where the report wrote one (build_report
    writes the attention pages before the layer page; `fig` writes into docs/charts/)."""
    name = attention_page_name(j)
    if not (fig.dir.parent / FEATURES_DIR / f"{name}.md").is_file():
        return text
    return f'<a href="{FEATURES_DIR}/{name}.html">{text}</a>'


def model_link(data: RunData, page_dir: Path) -> str | None:
    """A relative link from a page in `page_dir` (of this layer's built site) to the model
    report, when the run is a layer of a model run (its config names the shared directory,
    the model run's, whose report `build_model_report` writes); None otherwise."""
    if not data.config.shared_dir:
        return None
    model = data.layout.shared_dir
    target = RunLayout(model, model).report.index
    return Path(os.path.relpath(target.absolute(), page_dir.absolute())).as_posix()


def model_backlink(model: str | None) -> str:
    """' · the model report' linked (HTML), for a page's links line; '' outside a model run."""
    return f' · <a href="{html.escape(model, True)}">the model report</a>' if model else ""


def run_file(data: RunData, path: Path) -> str:
    """A file of the run as the pages name it: relative to the run directory, e.g.
    `connect/connect.json`."""
    return path.relative_to(data.layout.run_dir).as_posix()
