"""Verify before reuse, validate before touching: option ranges, stage stamps, the code
store's checks, the kept-aside rerun, config.json after a failed run, SAE pairings and fits,
the report's fingerprint, and the CLI's usage lines. Each against a hand-built answer."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest
import scipy.sparse as sp

import coact.rundir.verify as verify
from coact.calibrate.stage import CalibrateConfig
from coact.codes.store import CodeStore
from coact.connectors.exact import LassoPathConfig
from coact.errors import CoactError
from coact.evidence.outliers import OutlierConfig
from coact.linearity.table import LinearityConfig
from coact.models.sites import Site
from coact.pipeline import checks
from coact.pipeline.config import AnalyzeConfig
from coact.rundir.layout import CodesFiles, StageFiles
from coact.sae.evaluate import SaeReport
from coact.settings import Range, check_ranges, range_of


@dataclass(frozen=True)
class DemoFiles(StageFiles):
    result_name: ClassVar[str] = "demo.json"
    table_names: ClassVar[tuple[str, ...]] = ("a.parquet",)


def _stage(root: Path) -> DemoFiles:
    files = DemoFiles(root / "demo")
    files.path.mkdir(parents=True)
    (files.path / "a.parquet").write_bytes(b"table-a" * 10)
    (files.path / "sub").mkdir()
    (files.path / "sub" / "b.bin").write_bytes(b"b" * 5)
    files.result.write_text('{"key": "k"}')
    return files


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_range_holds_and_describes() -> None:
    at_least_one = Range(1)
    assert [at_least_one.holds(v) for v in (0, 1, 7, -3)] == [False, True, True, False]
    assert not at_least_one.holds(math.nan) and not at_least_one.holds(True)
    above_zero = Range(0, low_open=True)
    assert [above_zero.holds(v) for v in (0.0, 1e-9, -1.0)] == [False, True, False]
    share = Range(0, 1)
    assert [share.holds(v) for v in (0, 1, 1.5, -0.1)] == [True, True, False, False]
    assert at_least_one.describe() == "at least 1"
    assert above_zero.describe() == "above 0"
    assert share.describe() == "0 to 1"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LassoPathConfig(n_alphas=0), "LassoPathConfig.n_alphas (--n-alphas) must be"),
        (lambda: CalibrateConfig(contexts=0), "CalibrateConfig.contexts"),
        (lambda: CalibrateConfig(tolerance=0.0), "must be above 0"),
        (lambda: LinearityConfig(tau=float("nan")), "LinearityConfig.tau (--tau) must be a number"),
        (lambda: AnalyzeConfig(ctx_len=1), "AnalyzeConfig.ctx_len (--ctx-len) must be at least 2"),
        (lambda: OutlierConfig(share=1.5), "must be 0 to 1, got 1.5"),
    ],
)
def test_configs_reject_values_outside_their_ranges(build: Any, message: str) -> None:
    with pytest.raises(CoactError, match=None) as caught:
        build()
    assert message in str(caught.value)


def test_configs_accept_their_bounds() -> None:
    assert LassoPathConfig(n_alphas=1).n_alphas == 1
    assert LinearityConfig(tau=0.0).tau == 0.0
    assert LinearityConfig(tau=-1.4e-08).tau < 0  # a calibrated τ under every d(j)
    assert OutlierConfig(share=0.0).share == 0.0 and OutlierConfig(share=1.0).share == 1.0
    assert AnalyzeConfig(ctx_len=2, layer=0).ctx_len == 2
    assert range_of(AnalyzeConfig, "ctx_len") == Range(2)
    assert range_of(AnalyzeConfig, "model") is None
    check_ranges(AnalyzeConfig())  # the defaults are inside


def test_stamp_finds_missing_resized_and_changed_files(tmp_path: Path) -> None:
    files = _stage(tmp_path)
    assert verify.problem(files) is None  # no stamp (a run from before stamps): trusted
    verify.stamp(files)
    assert set(verify.read_stamp(files)) == {"a.parquet", "demo.json", "sub/b.bin"}
    assert verify.problem(files) is None
    table = files.path / "a.parquet"
    os.utime(table, ns=(1, 1))  # a new time, the same bytes: the checksum still holds
    assert verify.problem(files) is None
    table.write_bytes(b"table-A" * 10)  # same size, new bytes
    assert "a.parquet changed since its stage wrote it" in str(verify.problem(files))
    table.write_bytes(b"short")
    assert "a.parquet is 5 bytes, 70 when its stage wrote it" in str(verify.problem(files))
    (files.path / "sub" / "b.bin").unlink()
    table.write_bytes(b"table-a" * 10)
    assert str(verify.problem(files)).endswith("b.bin is missing")
    with pytest.raises(CoactError, match="rerun `coact demo`"):
        verify.require(files, "`coact demo`")


def test_a_missing_table_is_a_problem_even_without_a_stamp(tmp_path: Path) -> None:
    files = _stage(tmp_path)
    (files.path / "a.parquet").unlink()
    assert str(verify.problem(files)).endswith("a.parquet is missing")
    files.result.unlink()  # not finished: nothing to verify
    assert verify.problem(files) is None


def _store(root: Path) -> Path:
    store = CodeStore.open_for_writing(root / "codes", fingerprint="f", sites={"s.0": 8})
    for index in range(2):
        tokens = {c: np.arange(4) for c in ("context", "position", "token_id", "doc")}
        codes = sp.csr_matrix(np.eye(4, 8, dtype=np.float32) * (index + 1.0))
        store.write_shard(index, tokens, {"s.0": codes})
    return root / "codes"


def test_codes_are_hashed_once_then_checked_by_size_and_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    codes = _store(tmp_path)
    verify.require_codes(codes)
    stamp = CodesFiles(codes).stamp
    assert stamp.is_file() and len(verify.read_json(stamp) or {}) == 4  # 2 shards × 2 folders
    hashed: list[Path] = []
    real = verify.sha256_file

    def counted(path: Path) -> str:
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(verify, "sha256_file", counted)
    verify.require_codes(codes)
    assert hashed == []  # sizes and times unchanged: no checksum needed
    shard = codes / CodesFiles.shard("s.0", 1)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CoactError, match="does not match its checksum"):
        verify.require_codes(codes, "`redo`")
    assert hashed == [shard]
    shard.write_bytes(bytes(data[:-3]))
    with pytest.raises(CoactError, match=r"is \d+ bytes, \d+ when it was collected"):
        verify.require_codes(codes)
    shard.unlink()
    with pytest.raises(CoactError, match="is missing from the code store; rerun `redo`"):
        verify.require_codes(codes, "`redo`")


def test_a_failed_rerun_puts_the_previous_results_back(tmp_path: Path) -> None:
    files = _stage(tmp_path)
    verify.stamp(files)
    before = _tree(files.path)
    with pytest.raises(RuntimeError), verify.guarded(files):
        files.result.unlink()
        (files.path / "a.parquet").write_bytes(b"half-written")  # in place, even
        raise RuntimeError("the stage failed")
    assert _tree(files.path) == before and not files.backup.exists()


def test_a_finished_rerun_drops_the_kept_copy_and_stamps(tmp_path: Path) -> None:
    files = _stage(tmp_path)
    with verify.guarded(files):
        tmp = files.path / "a.new"
        tmp.write_bytes(b"new table")
        os.replace(tmp, files.path / "a.parquet")  # stages write by replacing
        assert (files.backup / "a.parquet").read_bytes() == b"table-a" * 10
    assert not files.backup.exists()
    assert verify.read_stamp(files)["a.parquet"][0] == len(b"new table")


def test_a_corrupt_finished_result_is_recomputed_not_reused(tmp_path: Path) -> None:
    files = _stage(tmp_path)
    verify.stamp(files)
    (files.path / "a.parquet").write_bytes(b"x" * 70)
    with verify.guarded(files):
        assert not files.result.exists()  # the stage finds no finished result: recomputes
        files.result.write_text('{"key": "k"}')


def test_a_killed_rerun_is_recovered(tmp_path: Path) -> None:
    files = _stage(tmp_path)
    before = _tree(files.path)
    shutil.copytree(files.path, files.backup)
    files.result.unlink()  # killed mid-stage: no headline
    verify._recover(files)
    assert _tree(files.path) == before and not files.backup.exists()
    shutil.copytree(files.path, files.backup)
    (files.path / "a.parquet").write_bytes(b"finished")  # killed after it finished
    verify._recover(files)
    assert (files.path / "a.parquet").read_bytes() == b"finished"
    assert not files.backup.exists()


def test_config_is_left_as_found_when_a_run_fails(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    with pytest.raises(CoactError), checks.config_kept_on_failure(config):
        config.write_text("fresh")
        raise CoactError("failed")
    assert not config.exists()
    config.write_text("earlier")
    with pytest.raises(CoactError), checks.config_kept_on_failure(config):
        config.write_text("fresh")
        raise CoactError("failed")
    assert config.read_text() == "earlier"
    with pytest.raises(KeyboardInterrupt), checks.config_kept_on_failure(config):
        config.write_text("resumable")
        raise KeyboardInterrupt
    assert config.read_text() == "resumable"  # a run stopped by hand resumes from it


def test_run_dir_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(CoactError, match="is a file, not a run directory"):
        checks.check_run_dir(afile)
    checks.check_run_dir(tmp_path / "new" / "run")  # probes the nearest existing folder
    assert not (tmp_path / "new").exists() and sorted(os.listdir(tmp_path)) == ["afile"]

    def refuse(**_: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checks.tempfile, "mkstemp", refuse)
    with pytest.raises(CoactError, match=r"cannot write in .*Permission denied"):
        checks.check_run_dir(tmp_path / "run")


def _report(fve: float) -> SaeReport:
    return SaeReport("mlp_out[1]", 124, fve, 8.0, 0.1, 3.0, 3.2, 5.0)


def test_fits_and_pairings() -> None:
    site = Site("mlp_out", 1)
    assert checks.fit_problems({site: _report(0.7)}) == []
    assert checks.fit_problems({site: _report(0.0)}) == []
    bad = checks.fit_problems({site: _report(-0.18), Site("mlp_resid", 1): _report(math.nan)})
    assert len(bad) == 2 and "FVE -0.18" in bad[0] and "FVE nan" in bad[1]
    with pytest.raises(CoactError, match="pass --allow-mismatch"):
        checks.stop_or_warn(bad, allow_mismatch=False)
    assert checks.stop_or_warn(bad, allow_mismatch=True)[0].startswith("proceeded with")
    assert checks.same_model("EleutherAI/pythia-70m-deduped", "pythia-70m-deduped")
    assert not checks.same_model("gpt2", "tiny-llama")
    lm = SimpleNamespace(name="tiny-llama")
    trained = SimpleNamespace(metadata={"model_name": "gpt2"})
    unknown = SimpleNamespace(metadata={})
    found = checks.pairing_problems({site: trained}, lm, {site: "sae/x"})  # type: ignore[arg-type]
    assert found == ["sae/x was trained on gpt2, not tiny-llama (at mlp_out[1])"]
    assert checks.pairing_problems({site: unknown}, lm, {}) == []  # type: ignore[arg-type]


def test_settings_checked_against_the_model() -> None:
    lm = SimpleNamespace(
        name="m",
        model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64)),
        adapter=SimpleNamespace(n_layers=2, d_model=8),
    )
    checks.check_against_model(AnalyzeConfig(layer=1, ctx_len=64), lm)  # type: ignore[arg-type]
    with pytest.raises(CoactError, match="--ctx-len 65 is longer than m's 64 positions"):
        checks.check_against_model(AnalyzeConfig(layer=1, ctx_len=65), lm)  # type: ignore[arg-type]
    with pytest.raises(CoactError, match="layer 2 is out of range"):
        checks.check_against_model(AnalyzeConfig(layer=2), lm)  # type: ignore[arg-type]
    big_k = AnalyzeConfig(layer=0, ctx_len=8, sae=AnalyzeConfig().sae.__class__(k=33))
    with pytest.raises(CoactError, match="--k 33 is above the SAE's width 32"):
        checks.check_against_model(big_k, lm)  # type: ignore[arg-type]


def test_report_is_rebuilt_only_when_its_inputs_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import coact.report.build as build
    from coact.report.fingerprint import build_report_if_changed

    run = tmp_path / "run"
    (run / "connect").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "summary.json").write_text('{"layer": 1, "timings": {"total_s": 1.0}}')
    (run / "connect" / "features.parquet").write_bytes(b"table")
    builds: list[Any] = []

    def fake_build(run_dir: Path, out_dir: Any = None, **kw: Any) -> Path:
        index = Path(run_dir) / "report" / "site" / "index.html"
        index.parent.mkdir(parents=True, exist_ok=True)
        index.write_text(f"built {len(builds)}")
        builds.append(kw)
        return index

    monkeypatch.setattr(build, "build_report", fake_build)
    build_report_if_changed(run, features=3)
    build_report_if_changed(run, features=3)
    assert len(builds) == 1
    (run / "summary.json").write_text('{"layer": 1, "timings": {"total_s": 9.0}}')
    build_report_if_changed(run, features=3)  # only the timings moved
    assert len(builds) == 1
    (run / "connect" / "features.parquet").write_bytes(b"tablE")
    build_report_if_changed(run, features=3)
    assert len(builds) == 2
    build_report_if_changed(run, features=4)  # other pages asked for
    assert len(builds) == 3


def test_usage_lines() -> None:
    from coact.cli import app
    from coact.usage import usage_lines

    try:
        app(["connect", "--bogus", "x"], standalone_mode=False, prog_name="coact")
    except Exception as error:
        lines = usage_lines(error)
    assert lines == [
        "coact: error: No such option: --bogus",
        "Usage: coact connect [OPTIONS] RUN",
        "Try 'coact connect --help' for help.",
    ]
    assert usage_lines(ValueError("not a usage error")) is None


def test_layer_warnings_stop_or_record_what_was_allowed() -> None:
    site = Site("mlp_out", 1)
    other = SimpleNamespace(metadata={"model_name": "gpt2"})
    shared = SimpleNamespace(
        saes={Site("mlp_resid", 1): SimpleNamespace(metadata={}), site: other},
        given={site: "saes/gpt2"},
        reports={Site("mlp_resid", 1): _report(0.8), site: _report(-0.18)},
    )
    lm = SimpleNamespace(name="tiny-llama")
    with pytest.raises(CoactError, match="saes/gpt2 was trained on gpt2, not tiny-llama"):
        checks.layer_warnings(AnalyzeConfig(layer=1), lm, shared)  # type: ignore[arg-type]
    allowed = AnalyzeConfig(layer=1, allow_mismatch=True)
    warnings = checks.layer_warnings(allowed, lm, shared, say=False)  # type: ignore[arg-type]
    assert len(warnings) == 2 and "trained on gpt2" in warnings[0] and "FVE -0.18" in warnings[1]


def test_a_failed_run_that_wrote_nothing_leaves_no_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(CoactError), checks.config_kept_on_failure(run / "config.json"):
        (run / ".claims").mkdir(parents=True)
        (run / ".claims" / "shared.lock").write_text("")
        raise CoactError("the corpus is empty")
    assert not run.exists()
    with pytest.raises(CoactError), checks.config_kept_on_failure(run / "config.json"):
        (run / "sae").mkdir(parents=True)
        (run / "sae" / "weights").write_text("trained: kept for a resume")
        raise CoactError("later stage failed")
    assert (run / "sae" / "weights").is_file()
