"""What a process killed mid-swap leaves beside a report (its aside `.old` folder, its
staged `.tmp` folder, perhaps no report at all) is cleared by the next swap, and only
where that process is dead: another writer's folders are never touched."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from coact.report.model import build_model_report
from coact.rundir.files import remove_leftovers, staged_dir
from tests.test_report_rebuild import build_fast_model_run, record_builds


def dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def leave(folder: Path, name: str) -> Path:
    """A leftover folder `name` beside `folder`, holding one page."""
    path = folder.parent / name
    path.mkdir()
    (path / "index.html").write_text(name)
    return path


def leftovers(final: Path) -> dict[str, list[Path]]:
    """Folders as a killed swap of a dead process leaves them, and as writers that may
    still run hold them (this process, another host's, one whose name has no owner)."""
    host, dead, me = socket.gethostname(), dead_pid(), os.getpid()
    return {
        "dead": [
            leave(final, f".{final.name}.{dead}@{host}.k3j9x_ab.old"),
            leave(final, f".{final.name}.{dead}@{host}.q0w2e4r5.tmp"),
        ],
        "kept": [
            leave(final, f".{final.name}.{me}@{host}.zz9y8x7w.old"),
            leave(final, f".{final.name}.{me}@{host}.aa1b2c3d.tmp"),
            leave(final, f".{final.name}.{dead}@elsewhere.example.org.m1n2b3v4.old"),
            leave(final, f".{final.name}.zx81qwer.old"),
        ],
    }


def _pages(site: Path) -> list[str]:
    return sorted(str(p.relative_to(site)) for p in site.rglob("*.html"))


KILLED_MID_SWAP = """
import os, sys
from pathlib import Path
from coact.rundir import files

replace, calls = os.replace, []


def killed_on_the_second(source, target):  # the old folder moved aside, the new not in
    calls.append(source)
    if len(calls) == 2:
        os.kill(os.getpid(), 9)
    replace(source, target)


files.os.replace = killed_on_the_second
with files.staged_dir(Path(sys.argv[1])) as staging:
    (staging / "new.md").write_text("new")
"""


def test_a_swap_removes_only_a_dead_processs_folders(tmp_path: Path) -> None:
    final = tmp_path / "report"
    final.mkdir()
    (final / "old.md").write_text("old")
    killed = subprocess.Popen([sys.executable, "-c", KILLED_MID_SWAP, str(final)])
    assert killed.wait() == -9
    dead = sorted(p.name for p in tmp_path.iterdir())
    assert not final.exists() and len(dead) == 2, dead  # its aside and staged folders
    owner = f".report.{killed.pid}@{socket.gethostname()}."
    assert all(name.startswith(owner) for name in dead), dead
    left = leftovers(final)
    stray = tmp_path / f".{final.name}.{dead_pid()}@{socket.gethostname()}.x1y2z3w4.tmp"
    stray.write_text("a file, not a folder of ours")
    with staged_dir(final) as staging:
        (staging / "new.md").write_text("new")
        assert all((tmp_path / name).is_dir() for name in dead)  # cleared once it is in
    assert sorted(p.name for p in final.iterdir()) == ["new.md"]
    assert not any(p.exists() for p in left["dead"])
    assert all((p / "index.html").read_text() == p.name for p in left["kept"])
    kept = {p.name for p in left["kept"]}
    assert {p.name for p in tmp_path.iterdir()} == {"report", stray.name, *kept}
    assert remove_leftovers(final) == []


def test_a_report_killed_mid_swap_is_rebuilt_whole(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "model"
    shutil.copytree(build_fast_model_run(tmp_path_factory), run)
    layer = run / "L1" / "report"
    pages = _pages(layer / "site")
    left = leftovers(layer)
    # killed between its two renames: the old report aside, the new one staged, none in place
    aside = left["dead"][0]
    shutil.rmtree(aside)
    aside.mkdir()
    layer.rename(aside / "0")
    built = record_builds(monkeypatch)
    build_model_report(run, progress=False)
    # no report: rebuilt from the same inputs (so the model page, which links it, is kept)
    assert built == {"layers": ["L1"], "model pages": []}
    assert _pages(layer / "site") == pages and len(pages) > 3
    assert (layer / ".inputs.sha256").is_file()
    assert not any(p.exists() for p in left["dead"])
    assert all((p / "index.html").read_text() == p.name for p in left["kept"])
