"""Stage commands on a finished run write under the claim `coact analyze` takes for that
stage: while another process holds it, `--no-wait` stops with one line naming the holder
and leaves the run as it was; by default the command waits, then runs."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from coact.api import analyze
from coact.connectors.config import MLP_FIT, ConnectConfig
from coact.connectors.exact import LassoPathConfig
from coact.pipeline.commands import GRAPH_CLAIM
from coact.pipeline.run import SHARED, SUMMARY
from coact.pipeline.stages import STAGES
from tests.cli_calls import invoke
from tests.tiny_run import tiny_config

REPO = Path(__file__).resolve().parents[1]
# a second process that takes claim argv[2] of run argv[1], says so, and holds it until a
# line arrives on its stdin
HOLD = """
import sys
from pathlib import Path
from coact.rundir.claims import Claim
from coact.rundir.layout import RunLayout
run = Path(sys.argv[1])
claim = Claim(RunLayout(run, run).claims, sys.argv[2])
claim.acquire()
print("held", flush=True)
sys.stdin.readline()
claim.release()
"""
FAST_CONNECT = ConnectConfig(
    path=LassoPathConfig(n_alphas=3),
    mlp=dataclasses.replace(MLP_FIT, hidden=16, epochs=1),
    stability=False,
    progress=False,
)
SAME_CONNECT = ["--n-alphas", "3", "--mlp-epochs", "1", "--no-stability"]  # the run's own
# each stage command, the claim it takes and how its message names it
COMMANDS = [
    (["connect", "{run}", *SAME_CONNECT], "connect", "stage connect of"),
    (["logic", "{run}"], "logic", "stage logic of"),
    (["ablate", "{run}", "--feature", "3"], "ablate", "stage ablate of"),
    (["outliers", "{run}"], "outliers", "stage outliers of"),
    (["report", "{run}"], SUMMARY, "the summary and report of"),
    (["graph", "{run}", "mlp_out[1]", "0"], GRAPH_CLAIM, "the feature graphs of"),
    (["calibrate", "{run}"], SHARED, "the SAEs and codes of"),  # analyze's own claims
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run of the connect stage (its SAEs, codes and summary)."""
    run = tmp_path_factory.mktemp("stage_claims") / "run"
    config = tiny_config(
        run, stages=("connect",), connect=FAST_CONNECT, tokens=1_000, sae_tokens=1_500
    )
    analyze(config)
    return run


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished), str(copy)], check=True)  # times kept
    return copy


class Holder:
    """Another process holding claim `name` of `run` until `release`."""

    def __init__(self, run: Path, name: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(run), name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "held\n"

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        assert self.process.wait(timeout=30) == 0


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file's bytes, the claims' lock and holder files included."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_stage_commands_take_the_claims_analyze_takes() -> None:
    stages = {stage.name for stage in STAGES}
    for _, name, _ in COMMANDS:
        assert name in stages | {SUMMARY, SHARED, GRAPH_CLAIM}, name


@pytest.mark.parametrize(("argv", "name", "what"), COMMANDS, ids=[c[0][0] for c in COMMANDS])
def test_no_wait_stops_naming_the_holder_and_touches_nothing(
    run: Path, capsys: pytest.CaptureFixture[str], argv: list[str], name: str, what: str
) -> None:
    holder = Holder(run, name)
    try:
        before = _snapshot(run)
        code, said = invoke([str(run) if a == "{run}" else a for a in argv] + ["--no-wait"], capsys)
        after = _snapshot(run)
    finally:
        holder.release()
    assert code == 2, said
    lines = [line for line in said.splitlines() if line.strip()]
    assert len(lines) == 1, said
    assert lines[0].startswith(f"coact: error: {what} {run} is being written by "), said
    assert f"pid {holder.process.pid} on " in lines[0] and "--no-wait" in lines[0]
    assert after == before


@pytest.mark.parametrize(
    ("argv", "name", "what"),
    [COMMANDS[0], COMMANDS[3]],
    ids=["connect", "outliers"],
)
def test_by_default_a_command_waits_for_the_holder_then_runs(
    run: Path, capsys: pytest.CaptureFixture[str], argv: list[str], name: str, what: str
) -> None:
    holder = Holder(run, name)
    released: list[float] = []

    def release() -> None:
        released.append(time.monotonic())
        holder.release()

    timer = threading.Timer(1.5, release)
    timer.start()
    try:
        code, said = invoke([str(run) if a == "{run}" else a for a in argv], capsys)
        finished = time.monotonic()
    finally:
        timer.join()
    assert code == 0, said
    assert f"coact: waiting for {what} {run}: it is being written by pid " in said
    assert f"pid {holder.process.pid} on " in said
    assert released and finished > released[0]  # it ran once the holder let go
    claims = run / ".claims"
    assert not (claims / f"{name}.holder.json").exists()  # and released its claim in turn
