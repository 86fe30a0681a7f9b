"""The Python API: every name `coact` exports resolves, and `coact.analyze` runs the
pipeline as `coact analyze` does (the run directory checked first, config.json kept as it
was when a run fails)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest

import coact
from coact.cli import main
from coact.codes import scratch as scratch_module
from coact.codes.collect import CollectConfig
from coact.connectors.config import MLP_FIT, ConnectConfig
from coact.connectors.exact import LassoPathConfig
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.summary import RunSummary
from coact.sae.base import Sae
from tests.tiny_run import tiny_config

FAST_CONNECT = ConnectConfig(
    path=LassoPathConfig(n_alphas=3),
    mlp=dataclasses.replace(MLP_FIT, hidden=16, epochs=1),
    stability=False,
    progress=False,
)


def _config(run: Path, **overrides: Any) -> AnalyzeConfig:
    """A tiny run of the connect stage alone: seconds."""
    settings: dict[str, Any] = {
        "stages": ("connect",),
        "connect": FAST_CONNECT,
        "tokens": 1_000,
        "sae_tokens": 1_500,
        **overrides,
    }
    return tiny_config(run, **settings)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunSummary]:
    """A finished tiny run made through `coact.analyze`, and the summary it returned."""
    run = tmp_path_factory.mktemp("api") / "run"
    summary = coact.analyze(_config(run))
    assert isinstance(summary, RunSummary)
    return run, summary


def test_every_exported_name_resolves() -> None:
    for name in coact.__all__:
        assert getattr(coact, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        _ = coact.nosuch


def test_analyze_returns_the_runs_summary(finished: tuple[Path, RunSummary]) -> None:
    run, summary = finished
    assert summary.layer == 1 and summary.model == "tiny-llama"
    assert Path(summary.run_dir) == run
    assert summary.connect is not None
    assert RunSummary.read(run / "summary.json") == summary  # what it returned is what it wrote


def test_a_failed_analyze_leaves_config_json_as_it_was(
    finished: tuple[Path, RunSummary], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun with other connect settings rewrites config.json, then its connect stage
    fails: the earlier config.json is put back byte for byte."""
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    before = (run / "config.json").read_bytes()
    seen: list[bytes] = []

    def broken(*args: Any, **kwargs: Any) -> None:
        seen.append((run / "config.json").read_bytes())
        raise RuntimeError("the connect stage failed")

    monkeypatch.setattr("coact.pipeline.stages.connect", broken)
    other = dataclasses.replace(FAST_CONNECT, path=LassoPathConfig(n_alphas=4))
    with pytest.raises(RuntimeError, match="the connect stage failed"):
        coact.analyze(_config(run, connect=other))
    assert len(seen) == 1 and seen[0] != before  # the failed run had written its own
    assert (run / "config.json").read_bytes() == before


def test_a_rejected_analyze_leaves_config_json_as_it_was(
    finished: tuple[Path, RunSummary], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    before = (run / "config.json").read_bytes()
    with pytest.raises(coact.CoactError, match="layer 9 is out of range"):
        coact.analyze(_config(run, layer=9))
    assert (run / "config.json").read_bytes() == before


def test_the_cli_runs_the_apis_analyze(
    finished: tuple[Path, RunSummary],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`coact analyze` and `coact calibrate` hand their config to `coact.api.analyze`."""
    calls: list[AnalyzeConfig] = []

    def recorded(config: AnalyzeConfig, execution: Any = None) -> RunSummary:
        calls.append(config)
        return finished[1]

    monkeypatch.setattr("coact.api.analyze", recorded)
    run = tmp_path / "run"
    argv = ["analyze", "--model", "tiny-llama", "--layer", "1", "--run-dir", str(run)]
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--tokens", "1000", "--sae-tokens", "1500"])
    assert stopped.value.code == 0
    assert len(calls) == 1 and calls[0].run_dir == str(run) and calls[0].tokens == 1000
    assert str(finished[0]) in capsys.readouterr().out  # the summary it returned, printed


def test_collect_writes_the_codes_and_releases_its_buffers(tmp_path: Path) -> None:
    """`coact.collect` with an SAE object: the store holds every token it was asked for,
    and the collection's reused buffers are gone afterwards."""
    sae = Sae(64, 256, activation="topk", k=8, site="mlp_out[1]").eval()
    config = CollectConfig(forward_batch=4, shard_contexts=8, screen="bf16")
    store = coact.collect(
        {"mlp_out.1": sae}, out=tmp_path, model="tiny-llama", tokens=600, ctx_len=32,
        config=config,
    )  # fmt: skip
    assert store.manifest["n_tokens"] > 0 and store.sites == {"mlp_out.1": 256}
    assert store.meta["screen"] == "bf16"
    assert not getattr(scratch_module._LOCAL, "buffers", {})
