"""A model run's layers on a local Ray cluster, and two processes on one run directory:
every way ends with the files of a serial run (timings and the run's own path aside).
Each run is the cheapest with every layer stage and a report (`tests/fast_model_run.py`);
every process runs one thread, as Ray's workers do, so the floats agree to the bit.
The runs take minutes, not seconds: those tests are marked slow."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import coact.pipeline.run as pipeline
from coact.errors import CoactError
from coact.pipeline.executor import Execution
from coact.pipeline.run import analyze
from coact.pipeline.summary import ModelSummary
from coact.rundir.claims import Claim
from coact.rundir.layout import RunLayout
from tests.fast_model_run import LAYERS, differences, fast_model_config, run_tree

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SHARED = ("config.json", "sae", "sae_eval", "codes")  # what a model run's layers share
# one process of a two-process trial: the fast model run into argv[1] (argv[2]: wait or not)
ANALYZE = """
import sys
from coact.errors import CoactError
from coact.errors import CoactError
from coact.pipeline.executor import Execution
from coact.pipeline.run import analyze
from coact.pipeline.summary import ModelSummary
from tests.fast_model_run import fast_model_config
try:
    analyze(fast_model_config(sys.argv[1]), Execution(wait=sys.argv[2] == "wait"))
except CoactError as error:
    print(f"declined: {error}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the fast model run, serially, in a one-thread process."""
    run = tmp_path_factory.mktemp("serial") / "run"
    code, output = _finished(_process(run, "wait"))
    assert code == 0 and (run / "report" / "site" / "index.html").is_file(), output[-3000:]
    return run


Started = tuple[subprocess.Popen[bytes], Path]  # a process and the file of its output


def _process(run: Path, mode: str) -> Started:
    """A one-thread process running the fast model run into `run` (`mode`: wait or not);
    its output goes to a file beside `run` (a pipe nobody reads could stall it)."""
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO)}
    log = run.parent / f"{run.name}-{mode}-{len(list(run.parent.glob('*.log')))}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", ANALYZE, str(run), mode],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return process, log


def _finished(started: Started) -> tuple[int, str]:
    """The exit status and output of a `_process`."""
    process, log = started
    return process.wait(timeout=900), log.read_text()


def _shared_copy(serial: Path, run: Path) -> None:
    """A run directory holding the serial run's SAEs, their evaluations and codes: what is
    left is the layers' stages and the reports."""
    run.mkdir(parents=True)
    for name in SHARED:
        source = serial / name
        if source.is_dir():
            shutil.copytree(source, run / name)
        else:
            shutil.copy2(source, run / name)


def _dies_once_holding(layer: int, marker: Path) -> Callable[[Any, int], Any]:
    """The Ray workers' work, except that the first worker given `layer` takes its claim
    and is killed (SIGKILL) holding it."""
    real = pipeline._layer_on_worker

    def work(state: Any, at: int) -> Any:
        if at == layer and not marker.exists():
            marker.touch()
            model = state[3]
            Claim(model.claims, RunLayout.layer_name.format(layer=at)).acquire()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(state, at)

    return work


@pytest.mark.slow
def test_ray_workers_write_the_serial_files_and_redo_a_killed_workers_layer(
    serial: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    _shared_copy(serial, run)
    marker = tmp_path / "killed-once"
    monkeypatch.setattr(pipeline, "_layer_on_worker", _dies_once_holding(1, marker))
    for name, value in ONE_THREAD.items():  # the driver's one-thread reading of the shared codes
        monkeypatch.setenv(name, value)
    summary = analyze(fast_model_config(run), Execution(executor="ray", workers=2))
    err = capfd.readouterr().err
    assert marker.exists(), "no worker was killed"
    assert "coact: the worker on layer 1 died; a new worker redoes it" in err
    assert "coact: taking over layer 1 of " in err  # the dead worker's claim, taken over
    assert isinstance(summary, ModelSummary) and list(summary.layers) == list(LAYERS)
    assert differences(run_tree(serial), run_tree(run)) == []


def _trial(run: Path, second_waits: bool) -> list[tuple[int, str]]:
    """Two processes started together on one run directory: (exit status, output) each."""
    processes = [_process(run, mode) for mode in ("wait", "wait" if second_waits else "no-wait")]
    return [_finished(process) for process in processes]


@pytest.mark.slow
@pytest.mark.parametrize("second_waits", [True, False], ids=["both-wait", "one-may-decline"])
def test_two_processes_on_one_run_directory_end_with_the_serial_files(
    serial: Path, tmp_path: Path, second_waits: bool
) -> None:
    """Both processes finish (the layers shared out between them), or the one told not to
    wait declines in one line; the run ends complete, with a serial run's files."""
    run = tmp_path / "run"
    _shared_copy(serial, run)
    (first, first_output), (second, second_output) = _trial(run, second_waits)
    assert first == 0, first_output[-3000:]
    if second != 0:
        assert not second_waits and second == 2, second_output[-3000:]
        declined = [line for line in second_output.splitlines() if line.startswith("declined")]
        # the holder named by pid, or (caught before it wrote its record) as another process
        assert len(declined) == 1 and " is being written by " in declined[0]
    assert differences(run_tree(serial), run_tree(run)) == []
    assert not list(run.rglob("*.holder.json"))  # every claim was released


def test_workers_need_a_model_run_and_sane_settings(tmp_path: Path) -> None:
    """Checked before anything loads or is written."""
    with pytest.raises(CoactError, match=r"run a model run's layers: give --layers"):
        analyze(fast_model_config(tmp_path / "run", layers=None), Execution(workers=2))
    assert not (tmp_path / "run").exists()
    with pytest.raises(CoactError, match="unknown executor 'dask'"):
        Execution(executor="dask")
    with pytest.raises(CoactError, match="--workers must be at least 1, got 0"):
        Execution(workers=0)
    assert not Execution().on_ray and Execution(workers=2).on_ray
    assert Execution(executor="ray").on_ray and Execution(address="auto").on_ray
