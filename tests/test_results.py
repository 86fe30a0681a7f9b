"""Typed results: JSON round trips of nested results, reuse of a finished result only
when its key and tables match, and a clear error for a file of another shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from coact.errors import CoactError
from coact.pipeline.config import AnalyzeConfig
from coact.rundir.layout import RunLayout, StageFiles
from coact.rundir.results import Result, Timings, from_dict


@dataclass(frozen=True, kw_only=True)
class Inner(Result):
    share: float
    counts: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Outer(Result):
    key: str
    inner: Inner
    maybe: Inner | None = None
    by_site: dict[str, Inner] = field(default_factory=dict)
    listed: list[Inner] = field(default_factory=list)


@dataclass(frozen=True)
class Files(StageFiles):
    result_name: ClassVar[str] = "head.json"
    table_names: ClassVar[tuple[str, ...]] = ("table.parquet",)


def test_nested_results_round_trip(tmp_path: Path) -> None:
    result = Outer(
        key="k", inner=Inner(share=0.5, counts=(1, 2)), maybe=None,
        by_site={"mlp_out[3]": Inner(share=1.0)}, listed=[Inner(share=0.25)],
    )  # fmt: skip
    result.write(tmp_path / "r.json")
    again = Outer.read(tmp_path / "r.json")
    assert again == result and isinstance(again.by_site["mlp_out[3]"], Inner)
    assert again.inner.counts == (1, 2)  # JSON lists come back as the declared tuples
    assert Outer.read(tmp_path / "missing.json") is None


def test_unknown_keys_are_ignored_and_missing_ones_are_an_error(tmp_path: Path) -> None:
    assert from_dict(Inner, {"share": 0.1, "added_later": 3}) == Inner(share=0.1)
    (tmp_path / "r.json").write_text('{"key": "k"}')
    with pytest.raises(CoactError, match="is not a Outer"):
        Outer.read(tmp_path / "r.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CoactError, match="corrupt"):
        Outer.read(tmp_path / "bad.json")


def test_a_flag_where_settings_stand_is_refused() -> None:
    with pytest.raises(TypeError, match="Inner settings expected, found True"):
        from_dict(Outer, {"key": "k", "inner": True})
    with pytest.raises(CoactError, match="another version of coact"):
        AnalyzeConfig.from_dict({"logic": {"sae_connector": True}})


def test_a_finished_result_is_reused_only_with_its_key_and_tables(tmp_path: Path) -> None:
    files = Files(tmp_path / "stage")
    files.path.mkdir()
    Outer(key="k1", inner=Inner(share=0.5)).write(files.result)
    assert Outer.finished(files, "k1") is None  # its table is missing: redone
    assert not files.result.exists()  # and the stale headline is gone
    Outer(key="k1", inner=Inner(share=0.5)).write(files.result)
    (files.path / "table.parquet").write_bytes(b"")
    assert Outer.finished(files, "k1") == Outer(key="k1", inner=Inner(share=0.5))
    assert Outer.finished(files, "k2") is None and not files.result.exists()


def test_timings_time_each_part() -> None:
    timings = Timings({"before_s": 1.0})
    with timings.part("work"):
        sum(range(1000))
    assert set(timings) == {"before_s", "work_s"} and timings["work_s"] >= 0


def test_the_layout_names_every_stage_folder(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "run", tmp_path / "shared")
    assert layout.connect.features == tmp_path / "run" / "connect" / "features.parquet"
    assert (
        layout.positions.result == tmp_path / "run" / "attention" / "positions" / "positions.json"
    )
    assert layout.codes == tmp_path / "shared" / "codes"
    assert layout.layer_dir(4) == tmp_path / "run" / "L4"
    assert [p.name for p in layout.connect.tables][:2] == ["sweep.parquet", "weights.parquet"]
