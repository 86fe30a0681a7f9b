"""The mkdocs-material site around the report's pages: its configuration (no web fonts, no
script or style sheet from a network, plain `.html` links so it opens from the file system)
and an offline, strict build."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from coact.errors import CoactError
from coact.report.assets import SCRIPT, STYLE, vega_bundle
from coact.report.browser_js import BROWSER_SCRIPT
from coact.rundir.layout import ReportFiles

VEGA_JS = "assets/javascripts/vega.js"
COACT_JS = "assets/javascripts/coact.js"
COACT_CSS = "assets/stylesheets/coact.css"
RELATIVE = ReportFiles(Path())  # the report folder's names, as mkdocs.yml (inside it) gives them


def write_assets(docs: Path) -> None:
    """The vega bundle, the report's script and its style sheet, under docs/assets/."""
    for relative, text in (
        (VEGA_JS, vega_bundle()),
        (COACT_JS, SCRIPT + BROWSER_SCRIPT),
        (COACT_CSS, STYLE),
    ):
        path = docs / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def mkdocs_config(
    site_name: str, nav: Sequence[Any], *, search: bool = False, description: str = ""
) -> dict[str, Any]:
    """The mkdocs.yml of a report: docs/ in, site/ out, everything local. Search is off by
    default: its worker cannot start from the file system, where the report is read."""
    return {
        "site_name": site_name,
        "site_description": description,
        "docs_dir": RELATIVE.docs.as_posix(),
        "site_dir": RELATIVE.site.as_posix(),
        "use_directory_urls": False,
        "theme": {"name": "material", "font": False, "features": ["navigation.top"]},
        "plugins": ["search"] if search else [],
        "extra_javascript": [VEGA_JS, COACT_JS],
        "extra_css": [COACT_CSS],
        "markdown_extensions": ["tables", "admonition", "attr_list", {"toc": {"permalink": True}}],
        "nav": list(nav),
        "extra": {"generator": False},  # no "Made with Material" link in the footer
        "validation": {
            "nav": {"omitted_files": "warn", "not_found": "warn"},
            "links": {"not_found": "warn", "anchors": "warn", "unrecognized_links": "warn"},
        },
    }


def write_config(out_dir: Path, config: dict[str, Any]) -> Path:
    """The report's mkdocs.yml in `out_dir`; its path, for `build_site`."""
    path = ReportFiles(out_dir).mkdocs
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def build_site(config_file: Path) -> Path:
    """`mkdocs build --strict` in-process, into a fresh directory that replaces site/ only
    when the build succeeded; returns site/index.html."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import MkDocsException

    report = ReportFiles(config_file.parent)
    final, staging = report.site, report.staging
    shutil.rmtree(staging, ignore_errors=True)
    messages = _Collect()
    logger = logging.getLogger("mkdocs")
    logger.addHandler(messages)
    try:
        config = load_config(str(config_file), strict=True, site_dir=str(staging))
        build(config)
    except (MkDocsException, SystemExit) as error:
        shutil.rmtree(staging, ignore_errors=True)
        detail = "; ".join(messages.lines[-5:]) or str(error)
        raise CoactError(f"mkdocs build of {config_file} failed: {detail}") from None
    finally:
        logger.removeHandler(messages)
    if not any("search" in str(name) for name in config.plugins):
        # the theme ships the search worker and its lunr languages even without the
        # search plugin; with no search box nothing loads them
        for unused in ("assets/javascripts/lunr", "assets/javascripts/workers"):
            shutil.rmtree(staging / unused, ignore_errors=True)
    # a file system never serves 404.html, and its root-absolute asset paths break there
    (staging / "404.html").unlink(missing_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return report.index


class _Collect(logging.Handler):
    """Keeps mkdocs' warnings, so a failed strict build can say why."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
