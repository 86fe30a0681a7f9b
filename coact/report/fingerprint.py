"""The report is rebuilt only when what it is built from changed: a fingerprint of its
inputs (every result and table of the run, the code store's manifest, the SAEs, the pages
asked for and the report's own code) is stored beside the built report; a resume or a
second `coact report` with the same fingerprint reuses the site as it is. A model run's
layers are each fingerprinted so (with what they read of the SAEs they share), and its
model page over its own files, its layers' fingerprints and its links to their sites.

Figures that change on every run without changing the report's content (summary.json's
timings and the report's own path) are left out of the fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from coact.models.sites import Site
from coact.report.evidence import Decode
from coact.rundir.files import atomic_write, read_json, sha256_file
from coact.rundir.layout import SUMMARY, CodesFiles, ReportFiles, RunLayout

SKIPPED = ("report", "graph")  # what the report writes, or reads nothing from
VOLATILE = ("timings", "report")  # summary.json keys that change on every run


def _inputs(run_dir: Path) -> Iterator[Path]:
    """The run's files the report may read: not its own output, not hidden files (claims,
    stamps, kept copies), and of the code store only its manifest (which holds every
    shard's checksum)."""
    for path in sorted(run_dir.rglob("*")):
        parts = path.relative_to(run_dir).parts
        if not path.is_file() or parts[0] in SKIPPED or path.name.endswith(".tmp"):
            continue
        if any(part.startswith(".") for part in parts):
            continue
        if parts[0] == "codes" and path.name != "manifest.json":
            continue
        yield path


def _digest(path: Path) -> str:
    if path.name == SUMMARY:
        data = read_json(path) or {}
        kept = {k: v for k, v in data.items() if k not in VOLATILE}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    return sha256_file(path)


def _code() -> str:
    """The report package's own source: a new coact draws a new report."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _shared_inputs(layout: RunLayout) -> Iterator[Path]:
    """What a layer of a model run reads from the folder its layers share: the code
    store's manifest and its own SAEs' training logs and evaluations (of the sites
    `coact.rundir.read.load_run` reads them for)."""
    yield CodesFiles(layout.codes).manifest
    config = read_json(layout.config) or {}
    connect = read_json(layout.connect.result) or {}
    layer = config.get("layer")
    for kind, key in (("mlp_resid", "in_site"), ("mlp_out", "out_site")):
        slug = Site.parse(str(connect.get(key) or f"{kind}[{layer}]")).slug
        yield from (layout.train_log(slug), layout.sae_evaluation(slug))


def _entries(root: Path, paths: Iterable[Path]) -> list[tuple[str, str]]:
    """(name relative to `root`, digest) of each path that is a file."""
    return [(os.path.relpath(p, root), _digest(p)) for p in paths if p.is_file()]


def inputs_fingerprint(run_dir: str | Path, features: Sequence[int] | int | None) -> str:
    """sha256 over the report's inputs (names and contents), the pages asked for and the
    report's code."""
    run = Path(run_dir)
    layout = RunLayout.of(run)
    entries = _entries(run, _inputs(run))
    if layout.shared_dir.resolve() != run.resolve():  # a layer of a model run
        entries += _entries(run, _shared_inputs(layout))
    asked = features if features is None or isinstance(features, int) else list(features)
    text = json.dumps({"inputs": entries, "features": asked, "code": _code()})
    return hashlib.sha256(text.encode()).hexdigest()


def model_fingerprint(
    model_dir: str | Path, layers: Mapping[int, str], links: Mapping[int, str]
) -> str:
    """sha256 over what a model run's page is drawn from: the model run's config, summary
    (timings aside), layer table, code manifest and SAE evaluations, each layer's report
    fingerprint (`layers`: its inputs, pages and the report's code) and the links to the
    layers' sites (`links`, which move with the page's folder)."""
    run = Path(model_dir)
    layout = RunLayout.of(run)
    files = (layout.config, layout.summary, layout.layers_table, CodesFiles(layout.codes).manifest)
    entries = _entries(run, (*files, *sorted(layout.sae_eval.glob("*.json"))))
    text = json.dumps(
        {"inputs": entries, "layers": sorted(layers.items()), "links": sorted(links.items())}
    )
    return hashlib.sha256(text.encode()).hexdigest()


def is_current(report: ReportFiles, fingerprint: str) -> bool:
    """The report in `report` is built and was built from inputs with this fingerprint."""
    built = report.index.is_file() and report.inputs.is_file()
    return built and report.inputs.read_text() == fingerprint


def stamp(report: ReportFiles, fingerprint: str) -> None:
    """Record what the report just built in `report` was built from."""
    atomic_write(report.inputs, lambda tmp: tmp.write_text(fingerprint))


def build_report_if_changed(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    decode: Decode | None = None,
    features: Sequence[int] | int | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """`coact.report.build.build_report`, unless the report in `out_dir` was built from the
    same inputs (and `force` is off): then its index is returned as it is."""
    from coact.report.build import build_report

    run = Path(run_dir)
    final = ReportFiles(Path(out_dir) if out_dir is not None else RunLayout.of(run).report.path)
    fingerprint = inputs_fingerprint(run, features)
    if not force and is_current(final, fingerprint):
        return final.index.resolve()
    index = build_report(run, out_dir, decode=decode, features=features, progress=progress)
    stamp(final, fingerprint)
    return index


__all__ = [
    "build_report_if_changed", "inputs_fingerprint", "is_current", "model_fingerprint", "stamp",
]  # fmt: skip
