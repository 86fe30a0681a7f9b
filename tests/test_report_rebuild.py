"""A model run's reports are rebuilt only where their inputs changed: each layer's report
and the model page carry a fingerprint of what they were built from, as a single run's
report does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from coact.cli import app
from coact.pipeline.run import analyze
from coact.report import model
from coact.report.model import build_model_report
from tests.fast_model_run import LAYERS, fast_model_config


def build_fast_model_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fast model run (two layers of tiny-llama) with its reports, built once per test
    session in the session's base temporary directory (about 40 s on two busy cores)."""
    run = tmp_path_factory.getbasetemp() / "fast-model-run" / "model"
    if (run / "report" / "site" / "index.html").is_file():
        return run
    shutil.rmtree(run.parent, ignore_errors=True)
    analyze(fast_model_config(run))
    return run


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fast_model_run(tmp_path_factory)


def record_builds(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Which layers' reports and how many model pages `build_model_report` builds from now
    on (each still built for real)."""
    built: dict[str, list[str]] = {"layers": [], "model pages": []}
    build_report, build_site = model.build_report, model.build_site

    def layer_report(run_dir: Path, **kwargs: Any) -> Path:
        built["layers"].append(Path(run_dir).name)
        return build_report(run_dir, **kwargs)

    def model_site(config: Path) -> Any:
        built["model pages"].append(str(config))
        return build_site(config)

    monkeypatch.setattr(model, "build_report", layer_report)
    monkeypatch.setattr(model, "build_site", model_site)
    return built


def _forget(built: dict[str, list[str]]) -> None:
    for names in built.values():
        names.clear()


def _site_files(run: Path) -> dict[str, tuple[int, int]]:
    """Inode and modification time of every layer's and the model's index.html."""
    pages = [run / f"L{ell}" / "report" / "site" / "index.html" for ell in LAYERS]
    pages.append(run / "report" / "site" / "index.html")
    return {str(p.relative_to(run)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in pages}


def test_a_model_report_after_analyze_rebuilds_nothing(
    fast_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _site_files(fast_run)
    built = record_builds(monkeypatch)
    index = build_model_report(fast_run, progress=False)
    assert built == {"layers": [], "model pages": []}
    assert _site_files(fast_run) == before
    assert index == fast_run / "report" / "site" / "index.html"


def test_only_the_layer_whose_inputs_changed_is_rebuilt(
    fast_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "model"
    shutil.copytree(fast_run, run)
    before = _site_files(run)
    built = record_builds(monkeypatch)
    done = CliRunner().invoke(app, ["report", str(run)])  # moved, its links relative
    assert done.exit_code == 0, done.output
    assert built == {"layers": [], "model pages": []}  # built again: nothing rebuilt
    assert _site_files(run) == before
    # layer 1's output SAE (in the folder the layers share) was evaluated anew
    evaluation = run / "sae_eval" / "mlp_out.1.json"
    data = json.loads(evaluation.read_text())
    data["report"]["fve"] = 0.5 * data["report"]["fve"]
    evaluation.write_text(json.dumps(data))
    build_model_report(run, progress=False)
    assert built["layers"] == ["L1"] and len(built["model pages"]) == 1
    after = _site_files(run)
    assert after["L0/report/site/index.html"] == before["L0/report/site/index.html"]
    assert after["L1/report/site/index.html"] != before["L1/report/site/index.html"]
    _forget(built)
    build_model_report(run, features=[0], progress=False)  # other pages asked for: all
    assert sorted(built["layers"]) == [f"L{ell}" for ell in LAYERS]
