"""Writers that cannot collide: claims on a run directory (a second writer waits, or stops
with one line naming the holder; a dead holder's claim is taken over), unique temporary
files, and folders swapped in whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from coact.rundir.claims import Claim, ClaimHeld, claimed
from coact.rundir.files import atomic_write, staged_dir, swap_in
from coact.rundir.layout import RunLayout

REPO = Path(__file__).resolve().parents[1]
# a second process that takes claim "connect" of a run, says so, then holds it
HOLD = """
import sys, time
from pathlib import Path
from coact.rundir.claims import Claim
from coact.rundir.layout import RunLayout
claim = Claim(RunLayout(Path(sys.argv[1]), Path(sys.argv[1])).claims, "connect")
claim.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
claim.release()
"""


def _holder(run: Path, seconds: float) -> subprocess.Popen[str]:
    """A process holding claim "connect" of `run` for `seconds` (returns once it holds it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run), str(seconds)],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert process.stdout is not None and process.stdout.readline() == "held\n"
    return process


def test_a_second_writer_stops_with_one_line_naming_the_holder(tmp_path: Path) -> None:
    files = RunLayout(tmp_path, tmp_path).claims
    first, second = Claim(files, "connect", "stage connect"), Claim(files, "connect")
    said: list[str] = []
    assert first.try_acquire(say=said.append)
    holder = first.holder()
    assert holder is not None and holder.pid == os.getpid() and holder.host
    assert not second.try_acquire(say=said.append)
    with pytest.raises(ClaimHeld) as stopped:
        Claim(files, "connect", "stage connect").acquire(wait=False)
    message = str(stopped.value)
    assert "\n" not in message
    assert message.startswith("stage connect is being written by ")
    assert f"pid {os.getpid()} on {holder.host} since {holder.started}" in message
    first.release()
    assert first.holder() is None  # a clean release leaves no record
    assert second.try_acquire(say=said.append)
    second.release()
    assert said == []  # nothing was taken over


def test_claims_of_other_names_and_runs_are_independent(tmp_path: Path) -> None:
    run, other = (
        RunLayout(tmp_path / "a", tmp_path / "a"),
        RunLayout(tmp_path / "b", tmp_path / "b"),
    )
    with claimed(run.claims, "connect"):
        with claimed(run.claims, "calibrate"), claimed(other.claims, "connect"):
            assert not Claim(run.claims, "connect").try_acquire()
        assert Claim(other.claims, "connect").try_acquire()


def test_a_second_process_waits_saying_who_holds_the_claim(tmp_path: Path) -> None:
    process = _holder(tmp_path, 1.5)
    said: list[str] = []
    started = time.perf_counter()
    with claimed(RunLayout(tmp_path, tmp_path).claims, "connect", "stage connect", say=said.append):
        waited = time.perf_counter() - started
    assert process.wait(timeout=30) == 0
    assert waited > 0.5  # it waited for the holder to finish
    assert len(said) == 1 and said[0].startswith("coact: waiting for stage connect: it is being ")
    assert f"pid {process.pid} on " in said[0]


def test_the_claim_of_a_killed_holder_is_taken_over(tmp_path: Path) -> None:
    process = _holder(tmp_path, 60)
    files = RunLayout(tmp_path, tmp_path).claims
    assert not Claim(files, "connect").try_acquire()
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    said: list[str] = []
    claim = Claim(files, "connect", "stage connect")
    claim.acquire(wait=False, say=said.append)  # free at once: the kernel dropped the lock
    assert len(said) == 1 and said[0].startswith("coact: taking over stage connect from ")
    assert f"pid {process.pid} on " in said[0]
    holder = claim.holder()
    assert holder is not None and holder.pid == os.getpid()
    claim.release()


def test_concurrent_atomic_writes_of_one_file_never_mix(tmp_path: Path) -> None:
    """Eight threads write one file 25 times each with their own bytes: every write lands
    whole (unique temporary names), the last one stays, no temporary file is left."""
    target = tmp_path / "table.bin"
    payloads = [bytes([k]) * 200_000 for k in range(8)]
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for _ in range(25):
                atomic_write(target, lambda tmp: tmp.write_bytes(payloads[k]))
                assert target.read_bytes() in payloads
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_bytes() in payloads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.bin"]


def test_a_staged_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "report"
    final.mkdir()
    (final / "old.md").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(final) as staging:
        (staging / "half.md").write_text("half")
        raise RuntimeError("the build failed")
    assert sorted(p.name for p in final.iterdir()) == ["old.md"]
    with staged_dir(final) as staging:
        assert staging.parent == tmp_path and staging != final
        (staging / "new.md").write_text("new")
        assert (final / "old.md").is_file()  # readers see the old folder until the swap
    assert sorted(p.name for p in final.iterdir()) == ["new.md"]
    assert oct(final.stat().st_mode & 0o777) == oct(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # nothing left aside


def test_concurrent_swaps_leave_one_whole_folder(tmp_path: Path) -> None:
    final = tmp_path / "report"
    errors: list[BaseException] = []

    def builder(k: int) -> None:
        try:
            for round_ in range(40):
                with staged_dir(final) as staging:
                    for page in range(5):
                        (staging / f"{page}.md").write_text(f"{k}-{round_}")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=builder, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    texts = {p.read_text() for p in final.iterdir()}
    assert len(list(final.iterdir())) == 5 and len(texts) == 1  # one builder's whole folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_swap_in_a_folder_where_none_was(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "a").write_text("a")
    swap_in(staging, tmp_path / "final")
    assert (tmp_path / "final" / "a").read_text() == "a" and not staging.exists()


def test_an_atomic_write_leaves_the_mode_a_plain_write_would(tmp_path: Path) -> None:
    import os

    from coact.rundir.files import atomic_write

    (tmp_path / "plain.txt").write_text("x")
    atomic_write(tmp_path / "atomic.txt", lambda p: p.write_text("x"))
    modes = [os.stat(tmp_path / name).st_mode & 0o777 for name in ("plain.txt", "atomic.txt")]
    assert modes[0] == modes[1]  # not mkstemp's 0600: others sharing the run can read it
